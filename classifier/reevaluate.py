"""Evaluate a saved bundle again, as its training run did, or on a user's own labelled images.

Like timm's validate.py, for this project's bundles: the test split of the data the bundle was
trained on (as its config records it), through the same loaders and preprocessing as training's
own evaluation, with the temperature fitted again on the validation split (and kept only if it
helps). `python -m classifier evaluate` and `python -m classifier soup` both go through here.

Other labelled data (`evaluate_labelled`): every image of a folder (root/<class>/*), CSV or
dataset, or its own test split where it has one, through the bundle's own preprocessing and
temperature. Its classes may be a subset of the model's: a folder of cats and dogs tests a
ten-class model on those two.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from classifier.bundle import EVAL_DIR, Bundle, write_config
from classifier.config import RunConfig
from classifier.data import DataSplits, ImageDataset, Split, collate_skipping_broken, load_data
from classifier.errors import BundleError, DataError
from classifier.evaluate import Evaluation, compute_metrics, evaluate_model, predict_logits
from classifier.model_card import write_model_card
from classifier.run import load_run_data, prepare
from classifier.runtime import autocast_dtype, pick_device
from classifier.tta import TTA, tta_mode

# The data fields of a run's config that decide which images end up in the test split.
DATA_FIELDS = ("data", "data_dir", "image_dir", "image_column", "label_column", "classes", "val_fraction", "test_fraction",
               "seed")
# Images per forward pass (evaluation loaders take twice this): smaller than training's batch, as
# evaluating a bundle again often runs beside other work on a CPU.
EVAL_BATCH_SIZE = 64
# Images of another data set measured as out-of-domain (--ood-data): its test split's first ones,
# enough for a rate to a couple of points, few enough to keep a CPU evaluation short.
OOD_OTHER_LIMIT = 1000


@dataclass
class DataChoice:
    """Other data to evaluate on than the bundle's own (None: the data its training recorded)."""

    data: str | None = None
    data_dir: str | None = None
    image_dir: str | None = None


def rerun_config(bundle: Bundle, location: str, other: DataChoice | None = None, *,
                 batch_size: int = EVAL_BATCH_SIZE, loader: str = RunConfig.loader, workers: int = RunConfig.workers,
                 device: str = RunConfig.device) -> RunConfig:
    """The RunConfig that prepares the bundle's data as its training run did, the model from the bundle."""
    recorded = bundle.project.get("training", {})
    values = {k: recorded[k] for k in DATA_FIELDS if k in recorded}
    if other is not None and other.data:  # other data: its own splits, not the recorded subset of classes
        values = {"data": other.data, "data_dir": other.data_dir, "image_dir": other.image_dir}
    if "data" not in values:
        raise BundleError(f"{location} does not record the data it was trained on: name it with --data")
    return RunConfig(**values, model=bundle.architecture, init_from=str(bundle.path),
                     image_size=int(bundle.pretrained_cfg["input_size"][-1]), batch_size=batch_size,
                     loader=loader, workers=workers, device=device)


def bundle_data(bundle: Bundle, cfg: RunConfig) -> DataSplits:
    """cfg's data (rerun_config), split as the bundle's training split it: the same test set."""
    data = load_run_data(cfg)
    if data.classes != bundle.label_names:
        raise BundleError(f"the data's classes {data.classes} are not the bundle's {bundle.label_names}")
    return data


def ood_images(other: DataChoice, seed: int = 0) -> dict[str, Split]:
    """{name: the first OOD_OTHER_LIMIT images of its test split}: images of none of the model's
    classes for measuring the out-of-distribution flag (Evaluation.measure_ood)."""
    data = load_data(other.data, data_dir=other.data_dir, image_dir=other.image_dir, seed=seed)
    test = data.test
    return {data.name: Split(test.items[:OOD_OTHER_LIMIT], test.targets[:OOD_OTHER_LIMIT])}


def evaluate_bundle(bundle: Bundle, cfg: RunConfig, tta: str | None = None,
                    ood_data: DataChoice | None = None) -> tuple[Evaluation, DataSplits]:
    """The bundle's test metrics on cfg's data (rerun_config), with `tta` (None: the bundle's own),
    and its out-of-distribution threshold's rates on synthetic images and `ood_data`."""
    device = pick_device(cfg.device)
    data = bundle_data(bundle, cfg)
    setup = prepare(cfg, device, data=data, source=bundle)
    amp = bundle.project.get("training", {}).get("amp", "auto")
    evaluation = evaluate_model(setup.model, _progress(setup.val_loader, "validation"),
                                _progress(setup.test_loader, "test"), data.classes, device,
                                autocast_dtype(device, amp), bundle.tta if tta is None else tta, carved=data.carved)
    evaluation.measure_ood(setup.model, bundle.eval_transform(), bundle.in_chans, device, autocast_dtype(device, amp),
                           others=ood_images(ood_data) if ood_data else None)
    return evaluation, data


class _progress:
    """A loader iterated with a progress bar (on stderr), drawn when its pass starts: evaluating can
    take minutes on a CPU."""

    def __init__(self, loader, what: str):
        self.loader, self.what = loader, what

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        yield from tqdm(self.loader, desc=f"evaluating {self.what}", unit="batch", leave=False)


def _concatenate(splits: list[Split]) -> Split:
    splits = [s for s in splits if len(s)]
    if all(s.in_memory for s in splits):
        return Split(np.concatenate([s.items for s in splits]), np.concatenate([s.targets for s in splits]))
    return Split([item for s in splits for item in s.items], np.concatenate([s.targets for s in splits]))


def labelled_images(other: DataChoice, labels: list[str], seed: int = 0) -> tuple[DataSplits, str]:
    """The images of `other` to evaluate on, labelled with indices into the model's `labels`, and a
    description of them: its own test split where the data has one (test/ folder, a built-in test
    set, a dataset's test split), else every image it holds. Its classes must be among `labels`."""
    data = load_data(other.data, data_dir=other.data_dir, image_dir=other.image_dir, seed=seed)
    unknown = [c for c in data.classes if c not in labels]
    if unknown:
        raise DataError(f"{other.data}: class(es) {', '.join(unknown)} are not the model's; it knows "
                        f"{', '.join(labels)}")
    if "test" in data.carved:
        split, what = _concatenate([data.train, data.val, data.test]), f"all {len(data.train) + len(data.val) + len(data.test):,} images"
    else:
        split, what = data.test, f"its test split ({len(data.test):,} images)"
    to_model = np.asarray([labels.index(c) for c in data.classes], dtype=np.int64)
    split = Split(split.items, to_model[split.targets])
    present = [labels[i] for i in sorted(set(split.targets.tolist()))]
    subset = f", {len(present)} of the model's {len(labels)} classes" if len(present) < len(labels) else ""
    empty = Split(split.items[:0], split.targets[:0])
    return (DataSplits(data.name, list(labels), empty, empty, split, data.channels, data.skipped),
            f"{other.data}: {what}{subset}")


@torch.no_grad()
def evaluate_labelled(bundle: Bundle, data: DataSplits, *, tta: str | None = None, batch_size: int = 64,
                      workers: int = 0, device: str = "cpu") -> Evaluation:
    """The bundle on labelled images it was not trained on (labelled_images): its own preprocessing,
    test-time augmentation and temperature, as Predictor applies them; nothing is fitted on them."""
    device = pick_device(device)
    mode = bundle.tta if tta is None else tta_mode(tta)
    loader = DataLoader(ImageDataset(data.test, bundle.eval_transform(), bundle.in_chans), batch_size=batch_size,
                        num_workers=workers, collate_fn=collate_skipping_broken)
    model = bundle.model.to(device)
    amp = bundle.project.get("training", {}).get("amp", "auto")
    logits, targets, indices = predict_logits(TTA(model, mode), _progress(loader, "labelled images"), device,
                                              autocast_dtype(device, amp))
    metrics = compute_metrics(logits, targets, data.classes, bundle.temperature)
    metrics.update(split="test", tta=mode, evaluated_on=data.name,
                   calibration={"temperature": bundle.temperature, "fitted_on": "the bundle's own validation split",
                                "kept": bundle.temperature != 1.0, "reason": "the bundle's temperature, as Predictor applies it",
                                "ece_before": compute_metrics(logits, targets, data.classes)["ece"], "ece_after": metrics["ece"]})
    return Evaluation(metrics, logits, targets, indices)


def write_evaluation(bundle: Bundle, evaluation: Evaluation, data: DataSplits, mistakes: int | None,
                     command: str) -> None:
    """The bundle's eval/, config.json and model card from `evaluation`; its weights are untouched
    and its training figures (epochs, time) carried over."""
    previous = bundle.eval_metrics() or {}
    for key in ("best_epoch", "epochs_trained", "stopped_early", "train_seconds"):
        if key in previous:
            evaluation.metrics[key] = previous[key]
    evaluation.save(bundle.path / EVAL_DIR, data, bundle.in_chans, mistakes)
    config = dict(bundle.config)
    config["classifier"] = bundle.project | evaluation.project_fields() | {"evaluation_command": command}
    write_config(bundle.path, config)
    write_model_card(bundle.path)
