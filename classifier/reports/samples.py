"""A bundle's predictions on random images of a split, as a picture: green when right, red when wrong.

Given the data as the bundle's training split it (classifier.reevaluate.bundle_data: its recorded
classes, fractions and seed), "test" here is the same held-out set its metrics were measured on.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import DataLoader

from classifier.bundle import Bundle
from classifier.data import DataSplits, ImageDataset, collate_skipping_broken, load_pil
from classifier.errors import BundleError
from classifier.evaluate import predict_logits, sample_predictions
from classifier.plots import plot_sample_grid


def samples_report(bundle: Bundle, data: DataSplits, path: str | os.PathLike, split: str = "test",
                   count: int = 32, seed: int = 0, batch_size: int = 128) -> dict:
    """Predict the whole split, draw `count` random predictions; returns accuracy and the samples."""
    part = getattr(data, split)
    dataset = ImageDataset(part, bundle.eval_transform(), bundle.in_chans)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_skipping_broken)
    device = next(bundle.model.parameters()).device
    logits, targets, indices = predict_logits(bundle.model, loader, device)
    if len(targets) == 0:
        raise BundleError(f"the {split} split has no readable images")
    samples = sample_predictions(logits, targets, indices, data.classes, bundle.temperature, count, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_sample_grid([load_pil(part.items[s["index"]], bundle.in_chans) for s in samples], samples, path)
    correct = int((logits.argmax(1) == targets).sum())
    return {"split": split, "images": int(len(targets)), "accuracy": correct / len(targets),
            "shown": len(samples), "shown_wrong": sum(s["predicted"] != s["true"] for s in samples),
            "plot": str(path), "samples": samples}
