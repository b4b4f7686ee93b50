"""Evaluate a saved bundle again, as its training run did, and optionally make that its evaluation.

Like timm's validate.py, for this project's bundles: the test split of the data the bundle was
trained on (as its config records it), or of other data, through the same loaders and
preprocessing as training's own evaluation, with the temperature fitted again on the validation
split. `python -m classifier evaluate` and `python -m classifier soup` both go through here.
"""

from __future__ import annotations

from dataclasses import dataclass

from classifier.bundle import EVAL_DIR, Bundle, write_config
from classifier.config import RunConfig
from classifier.data import DataSplits
from classifier.errors import BundleError
from classifier.evaluate import Evaluation, evaluate_model
from classifier.model_card import write_model_card
from classifier.run import load_run_data, prepare
from classifier.runtime import autocast_dtype, pick_device

# The data fields of a run's config that decide which images end up in the test split.
DATA_FIELDS = ("data", "data_dir", "image_dir", "classes", "val_fraction", "test_fraction", "seed")
# Images per forward pass (evaluation loaders take twice this): smaller than training's batch, as
# evaluating a bundle again often runs beside other work on a CPU.
EVAL_BATCH_SIZE = 64


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


def evaluate_bundle(bundle: Bundle, cfg: RunConfig, tta: str | None = None) -> tuple[Evaluation, DataSplits]:
    """The bundle's test metrics on cfg's data (rerun_config), with `tta` (None: the bundle's own)."""
    device = pick_device(cfg.device)
    data = bundle_data(bundle, cfg)
    setup = prepare(cfg, device, data=data, source=bundle)
    amp = bundle.project.get("training", {}).get("amp", "auto")
    evaluation = evaluate_model(setup.model, setup.val_loader, setup.test_loader, data.classes, device,
                                autocast_dtype(device, amp), bundle.tta if tta is None else tta)
    return evaluation, data


def write_evaluation(bundle: Bundle, evaluation: Evaluation, data: DataSplits, mistakes: int, command: str) -> None:
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
