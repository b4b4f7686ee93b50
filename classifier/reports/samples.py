"""A bundle's predictions on random images of a split, as a picture: green when right, red when wrong.

The split is rebuilt the way the bundle was trained (its recorded classes, fractions and seed), so
"test" here is the same held-out set that the bundle's metrics were measured on.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import DataLoader

from classifier.bundle import Bundle, BundleError
from classifier.data import DataSplits, ImageDataset, collate_skipping_broken, load_data
from classifier.evaluate import plot_sample_grid, predict_logits, sample_predictions
from classifier.predict import eval_transform


def load_bundle_data(bundle: Bundle, source: str, data_dir: str | None = None,
                     image_dir: str | None = None) -> DataSplits:
    """`source` split as `bundle` was trained: same class subset, fractions and seed."""
    training = bundle.project.get("training", {})
    data = load_data(source, data_dir=data_dir, image_dir=image_dir, classes=training.get("classes"),
                     val_fraction=training.get("val_fraction", 0.1), test_fraction=training.get("test_fraction", 0.1),
                     seed=training.get("seed", 0))
    if list(data.classes) != bundle.label_names:
        raise BundleError(f"the bundle knows the classes {bundle.label_names} but {source} has {data.classes}; "
                          f"is this the data it was trained on?")
    return data


def samples_report(bundle: Bundle, data: DataSplits, path: str | os.PathLike, split: str = "test",
                   count: int = 32, seed: int = 0, batch_size: int = 128) -> dict:
    """Predict the whole split, draw `count` random predictions; returns accuracy and the samples."""
    part = getattr(data, split)
    dataset = ImageDataset(part, eval_transform(bundle), bundle.in_chans)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_skipping_broken)
    device = next(bundle.model.parameters()).device
    logits, targets, indices = predict_logits(bundle.model, loader, device)
    if len(targets) == 0:
        raise BundleError(f"the {split} split has no readable images")
    samples = sample_predictions(logits, targets, indices, data.classes, bundle.temperature, count, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_sample_grid(samples, part, bundle.in_chans, path)
    correct = int((logits.argmax(1) == targets).sum())
    return {"split": split, "images": int(len(targets)), "accuracy": correct / len(targets),
            "shown": len(samples), "shown_wrong": sum(s["predicted"] != s["true"] for s in samples),
            "plot": str(path), "samples": samples}
