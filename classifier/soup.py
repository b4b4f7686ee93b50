"""Model soups: one model whose weights are the average of several (`python -m classifier soup`).

A model soup (Wortsman et al., 2022, https://arxiv.org/abs/2203.05482): models fine-tuned from the
same weights with different settings (another stage with CutMix, say) stay in one basin of the
loss, and the average of their weights is often more accurate than each of them, for the cost of
one model at prediction time. timm's avg_checkpoints.py averages the epochs of one run; this
averages bundles (or a run's last checkpoint) and makes the result a bundle again.

An ingredient is a bundle folder, or a run's OUT/last.pt: its final epoch, which its bundle may not
hold (a bundle keeps the epoch of lowest validation loss); the run's OUT/bundle then says what the
run was. The soup is written as a bundle and evaluated as training evaluates
(classifier.reevaluate, as `python -m classifier evaluate --write`), so its figures are measured,
none inherited.

    python -m classifier soup runs/a/bundle runs/b/last.pt --out runs/soup --tta flip
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from classifier.bundle import (CURVES_PNG, EVAL_DIR, HISTORY_FILE, Bundle, library_versions, load_bundle, save_bundle,
                               stage_record)
from classifier.errors import BundleError
from classifier.loop import LAST_CHECKPOINT
from classifier.plots import plot_history
from classifier.reevaluate import DATA_FIELDS
from classifier.run import RUN_BUNDLE_DIR

# The fields of a run's `training` record that its evaluation reads again: which data, split how,
# and with which precision; the optimiser settings of one ingredient would misdescribe the soup.
_KEPT_TRAINING = DATA_FIELDS + ("model", "image_size", "amp", "mistakes")
# The fields of a bundle's project record that describe one trained run rather than the data and
# the architecture; the soup's own come from its evaluation.
_DROPPED_PROJECT = ("metrics", "temperature", "tta", "command", "evaluation_command", "started_from", "soup")


@dataclass
class Ingredient:
    bundle: Bundle  # for a checkpoint: its run's bundle, with the checkpoint's weights loaded
    record: dict  # what the soup's config keeps of it (bundle.stage_record, plus the epoch of a checkpoint)
    history: list[dict]  # its run's epochs (up to the checkpoint's), for the soup's training curves


def run_bundle_of(location: str) -> Path | None:
    """For a training checkpoint (OUT/last.pt, or any .pt), its run's bundle OUT/bundle; else None."""
    path = Path(location)
    return path.parent / RUN_BUNDLE_DIR if path.suffix == Path(LAST_CHECKPOINT).suffix else None


def load_ingredient(location: str) -> Ingredient:
    """A bundle folder, or a training checkpoint OUT/last.pt beside its run's OUT/bundle."""
    path, run_bundle = Path(location), run_bundle_of(location)
    if run_bundle is None:
        bundle = load_bundle(location)
        history = bundle.eval_path(HISTORY_FILE)
        return Ingredient(bundle, stage_record(bundle, location),
                          json.loads(history.read_text()) if history.is_file() else [])
    if not path.is_file():
        raise BundleError(f"{path}: no such checkpoint")
    if not run_bundle.is_dir():
        raise BundleError(f"{path}: a checkpoint is used beside its run's bundle ({run_bundle}), which is missing")
    bundle = load_bundle(run_bundle)
    # Our own run's checkpoint, read as tensors and plain data only (weights_only refuses code).
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    try:
        # A run with a moving average delivers (and validated) the average, not the raw weights.
        bundle.model.load_state_dict(checkpoint.get("ema", checkpoint["model"]), strict=True)
    except (KeyError, RuntimeError) as exc:
        raise BundleError(f"{path}: its weights do not fit the {bundle.architecture} of {run_bundle}") from exc
    history = checkpoint.get("history", [])
    record = stage_record(bundle, location)
    # The bundle's test accuracy is that of its best epoch, not of these weights.
    record.update(accuracy=None, epoch=int(checkpoint["epoch"]) + 1,
                  val_accuracy=history[-1].get("val_acc") if history else None,
                  train_seconds=sum(epoch.get("seconds", 0.0) for epoch in history) or None)
    return Ingredient(bundle, record, list(history))


def short_name(location: str) -> str:
    """A legend's name for an ingredient: its run's folder (runs/NAME/bundle, runs/NAME/last.pt), else its own."""
    path = Path(location)
    return path.parent.name if run_bundle_of(location) or path.name == RUN_BUNDLE_DIR else path.name


def check_compatible(ingredients: list[Ingredient]) -> None:
    """Weights average meaningfully only across one architecture, one set of classes and one input."""
    first = ingredients[0]
    for other in ingredients[1:]:
        for what, value in (("architecture", lambda b: b.architecture), ("classes", lambda b: b.label_names),
                            ("model arguments", lambda b: b.config.get("model_args", {})),
                            ("input size", lambda b: b.pretrained_cfg["input_size"]),
                            ("normalisation", lambda b: (b.pretrained_cfg["mean"], b.pretrained_cfg["std"]))):
            if value(first.bundle) != value(other.bundle):
                raise BundleError(f"{other.record['bundle']} and {first.record['bundle']} differ in {what} "
                                  f"({value(other.bundle)} vs {value(first.bundle)}): their weights cannot be averaged")


def average_weights(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of each floating-point tensor (batch-norm statistics included); integer ones, such
    as batch norm's step counter, are the first ingredient's."""
    averaged = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            total = sum(state[name].double() for state in states)
            averaged[name] = (total / len(states)).to(first.dtype)
        else:
            averaged[name] = first.clone()
    return averaged


def soup_config(ingredients: list[Ingredient], command: str) -> dict:
    """The first ingredient's config, its run-specific fields replaced by the list of ingredients."""
    config = dict(ingredients[0].bundle.config)
    project = {k: v for k, v in ingredients[0].bundle.project.items() if k not in _DROPPED_PROJECT}
    training = project.get("training", {})
    project["training"] = {k: training[k] for k in _KEPT_TRAINING if k in training}
    project.update(versions=library_versions(), command=command,
                   soup={"method": "uniform weight average", "ingredients": [i.record for i in ingredients]})
    config["classifier"] = project
    return config


def make_soup(locations: list[str], out: str | os.PathLike, command: str) -> Path:
    """Average the ingredients at `locations` into a bundle at `out` (not yet evaluated)."""
    if len(locations) < 2:
        raise BundleError("a soup needs two ingredients or more")
    ingredients = [load_ingredient(location) for location in locations]
    check_compatible(ingredients)
    model = ingredients[0].bundle.model
    model.load_state_dict(average_weights([i.bundle.model.state_dict() for i in ingredients]))
    # A soup written over an earlier one must not keep that one's evaluation.
    shutil.rmtree(Path(out) / EVAL_DIR, ignore_errors=True)
    save_bundle(out, model, soup_config(ingredients, command))
    # The soup was not trained; its Model tab and card show how its ingredients were (the
    # evaluation that follows writes the rest of eval/ and leaves this plot).
    (Path(out) / EVAL_DIR).mkdir()
    plot_history({f"{n}: {short_name(i.record['bundle'])}": i.history for n, i in enumerate(ingredients, start=1)},
                 Path(out) / EVAL_DIR / CURVES_PNG)
    return Path(out)
