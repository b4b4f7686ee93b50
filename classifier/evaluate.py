"""Honest evaluation: metrics, calibration, the misclassified examples, and the plots of them.

Everything is computed from the logits of a full pass over a split; nothing is estimated or typed
in. `save_report` writes the bundle's eval/ folder that the app and the model card read (its
pictures drawn by classifier.plots).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from classifier import distributed, ood
from classifier.bundle import (CONFUSION_JSON, CONFUSION_PNG, CURVES_PNG, HISTORY_FILE, METRICS_FILE, MISTAKES_DIR,
                               MISTAKES_FILE, OOD_FIELD, SAMPLES_PNG)
from classifier.data import DataSplits, ImageDataset, Split, collate_skipping_broken, load_pil
from classifier.intervals import wilson_interval
from classifier.plots import plot_confusion_matrix, plot_history, plot_sample_grid
from classifier.tta import TTA, tta_mode

MIN_TEMPERATURE, MAX_TEMPERATURE = 0.1, 10.0
# Calibrate only when it helps: a temperature is kept only if, fitted on part of the validation
# split, it lowers the expected calibration error on the part it did not see (CALIBRATION_FOLDS-fold
# cross-validation). Below CALIBRATION_MIN_SAMPLES validation images there is too little to tell.
CALIBRATION_FOLDS = 5
CALIBRATION_MIN_SAMPLES = 20
# Which split eval/ (the headline figures, the confusion matrix and the mistakes gallery) shows.
SPLIT_RULE = ("eval/ shows the test split when the data has its own; when the test split was carved out of "
              "the training images, it shows whichever of that carved test split and the validation split is "
              "larger (the test split on a tie)")


@torch.no_grad()
def predict_logits(model: nn.Module, loader: Iterable, device: torch.device, dtype=None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [N, C] float32 on CPU, targets [N], dataset indices [N]) for every readable sample.

    Batches are (x, y, index) as ImageDataset yields them. Under DDP each rank passes over its own
    shard and the results are gathered, so every rank returns the whole split.
    """
    model.eval()
    logits, targets, indices = [], [], []
    for batch in loader:
        if batch is None:
            continue
        x, y, idx = batch
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(x.to(device, non_blocking=True))
        logits.append(out.float().cpu())
        targets.append(torch.as_tensor(y).cpu())
        indices.append(torch.as_tensor(idx).cpu())
    result = (torch.cat(logits), torch.cat(targets), torch.cat(indices))
    if distributed.is_distributed():
        result = distributed.gather_predictions(*result)
    return result


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) (Guo et al., 2017)."""
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")
    logits, targets = logits.detach().float(), targets.detach().long()

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature):
        return 1.0
    # A validation set the model gets entirely right has its NLL optimum at T -> 0 (every
    # probability 100%); real models land well inside these bounds, so they only stop that.
    return min(max(temperature, MIN_TEMPERATURE), MAX_TEMPERATURE)


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> float:
    """ECE: the gap between confidence and accuracy, averaged over equal-width confidence bins."""
    confidence, predicted = probs.max(1)
    correct = (predicted == targets).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    ece = torch.zeros(())
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.float().mean() * (confidence[in_bin].mean() - correct[in_bin].mean()).abs()
    return float(ece)


def confusion_matrix(predicted: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[true, predicted]."""
    return torch.bincount(targets * num_classes + predicted, minlength=num_classes**2).reshape(
        num_classes, num_classes)


def compute_metrics(logits: torch.Tensor, targets: torch.Tensor, classes: Sequence[str],
                    temperature: float = 1.0) -> dict:
    """Loss, accuracy, per-class precision/recall/F1/support, macro averages, confusion matrix, ECE."""
    num_classes = len(classes)
    scaled = logits / temperature
    probs = scaled.softmax(1)
    predicted = probs.argmax(1)
    cm = confusion_matrix(predicted, targets, num_classes).double()
    tp = cm.diag()
    support, predicted_count = cm.sum(1), cm.sum(0)
    precision = torch.where(predicted_count > 0, tp / predicted_count.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(tp))
    present = support > 0  # macro averages over the classes this split has
    per_class = [{"class": c, "precision": float(precision[i]), "recall": float(recall[i]),
                  "f1": float(f1[i]), "support": int(support[i]), "accuracy": float(recall[i]),
                  "accuracy_ci95": list(wilson_interval(int(tp[i]), int(support[i])))}
                 for i, c in enumerate(classes)]
    correct = int((predicted == targets).sum())
    return {
        "num_samples": int(len(targets)),
        "loss": float(nn.functional.cross_entropy(scaled, targets)),
        "accuracy": float((predicted == targets).double().mean()),
        "accuracy_ci95": list(wilson_interval(correct, int(len(targets)))),
        "macro_precision": float(precision[present].mean()),
        "macro_recall": float(recall[present].mean()),
        "macro_f1": float(f1[present].mean()),
        "ece": expected_calibration_error(probs, targets),
        "temperature": float(temperature),
        "per_class": per_class,
        "confusion_matrix": cm.long().tolist(),
    }


def _negative_log_likelihood(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(nn.functional.cross_entropy(logits.float(), targets.long()))


def choose_temperature(val_logits: torch.Tensor, val_targets: torch.Tensor, folds: int = CALIBRATION_FOLDS,
                       seed: int = 0) -> dict:
    """Calibrate only when it helps: the temperature fitted on the validation split, and whether to
    keep it.

    Fitting T on a split and checking it on the same split always looks like a gain, so the check
    is held out: the validation images are dealt into `folds` folds, each fold scaled by the T
    fitted on the others, and the pooled held-out expected calibration error (ECE) compared with
    the unscaled one. T (fitted on the whole split) is kept only if it lowers that held-out ECE; the
    held-out NLL is recorded beside it. Returns the record metrics.json keeps as "calibration"
    (its "temperature" is 1.0 when T is not kept).
    """
    n = int(len(val_targets))
    record = {"fitted_on": "validation", "criterion": "held-out ECE", "kept": False, "temperature": 1.0}
    if n < CALIBRATION_MIN_SAMPLES:
        return record | {"fitted_temperature": None, "held_out": None,
                         "reason": f"the validation split (n={n}) is too small to check that a temperature helps; "
                                   f"probabilities are the model's own (T = 1)"}
    fitted = fit_temperature(val_logits, val_targets)
    k = max(2, min(folds, n // 10))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    scaled = torch.empty_like(val_logits, dtype=torch.float32)
    for fold in range(k):
        held = order[fold::k]
        rest = torch.cat([order[f::k] for f in range(k) if f != fold])
        scaled[held] = val_logits[held].float() / fit_temperature(val_logits[rest], val_targets[rest])
    raw = val_logits.float()
    held_out = {"method": f"{k}-fold cross-validation on the validation split", "num_samples": n,
                "ece_before": expected_calibration_error(raw.softmax(1), val_targets),
                "ece_after": expected_calibration_error(scaled.softmax(1), val_targets),
                "nll_before": _negative_log_likelihood(raw, val_targets),
                "nll_after": _negative_log_likelihood(scaled, val_targets)}
    kept = held_out["ece_after"] < held_out["ece_before"]
    nll = "and" if held_out["nll_after"] < held_out["nll_before"] else "though not"
    reason = (f"T = {fitted:.3g} lowered the held-out ECE from {held_out['ece_before']:.4f} to "
              f"{held_out['ece_after']:.4f} ({nll} the NLL, {held_out['nll_before']:.4f} -> {held_out['nll_after']:.4f})"
              if kept else
              f"T = {fitted:.3g} would have raised the held-out ECE from {held_out['ece_before']:.4f} to "
              f"{held_out['ece_after']:.4f}: not applied, probabilities are the model's own (T = 1)")
    return record | {"kept": kept, "temperature": fitted if kept else 1.0, "fitted_temperature": fitted,
                     "held_out": held_out, "reason": reason}


def calibrated_metrics(test_logits, test_targets, val_logits, val_targets, classes) -> dict:
    """Metrics of the test logits at the temperature choose_temperature keeps (fitted on the
    validation logits), with the uncalibrated figures beside them."""
    calibration = choose_temperature(val_logits, val_targets)
    metrics = compute_metrics(test_logits, test_targets, classes, calibration["temperature"])
    raw = compute_metrics(test_logits, test_targets, classes, 1.0)
    metrics["calibration"] = calibration | {"ece_before": raw["ece"], "ece_after": metrics["ece"],
                                            "nll_before": raw["loss"], "nll_after": metrics["loss"]}
    return metrics


def shown_split(num_val: int, num_test: int, carved: Sequence[str] = ()) -> str:
    """The split eval/ shows ("test" or "validation"): see SPLIT_RULE."""
    if "test" not in carved:
        return "test"
    return "validation" if num_val > num_test else "test"


def split_summary(logits: torch.Tensor, targets: torch.Tensor, origin: str) -> dict:
    """A split's accuracy with its 95% interval and size, and where the split came from."""
    correct = int((logits.argmax(1) == targets).sum()) if len(targets) else 0
    low, high = wilson_interval(correct, int(len(targets)))
    return {"accuracy": correct / len(targets) if len(targets) else None, "accuracy_ci95": [low, high],
            "num_samples": int(len(targets)), "origin": origin}


# ----------------------------------------------------------------------------------------------
# Mistakes and the eval/ folder


def rank_mistakes(logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor,
                  classes: Sequence[str], temperature: float = 1.0, limit: int | None = None) -> list[dict]:
    """The misclassified samples, worst (highest loss) first, with their top probabilities; the
    first `limit` of them, or all (None)."""
    probs = (logits / temperature).softmax(1)
    predicted = probs.argmax(1)
    wrong = torch.nonzero(predicted != targets).flatten()
    losses = -probs[wrong, targets[wrong]].clamp(min=1e-12).log()
    order = wrong[losses.argsort(descending=True)][:limit]
    mistakes = []
    for i in order.tolist():
        top = probs[i].topk(min(3, len(classes)))
        mistakes.append({
            "index": int(indices[i]), "true": classes[int(targets[i])], "predicted": classes[int(predicted[i])],
            "p_predicted": float(probs[i, predicted[i]]), "p_true": float(probs[i, targets[i]]),
            "loss": float(-probs[i, targets[i]].clamp(min=1e-12).log()),
            "top": {classes[int(c)]: float(p) for p, c in zip(top.values, top.indices)},
        })
    return mistakes


@dataclass
class Evaluation:
    """A model's calibrated metrics on the split eval/ shows (metrics["split"]: the test split, or the
    validation split where the test split is a small carve-out; see SPLIT_RULE), the temperature
    fitted on the validation split and kept only if it helps, and that split's logits, which the
    mistakes and samples of eval/ are drawn from (test_*: named when it was always the test split)."""
    metrics: dict
    test_logits: torch.Tensor
    test_targets: torch.Tensor
    test_indices: torch.Tensor

    @property
    def temperature(self) -> float:
        return self.metrics["calibration"]["temperature"]

    def project_fields(self) -> dict:
        """What config.json's "classifier" section keeps of it: what the Predictor needs (temperature,
        TTA) and a summary for readers of the config alone."""
        m = self.metrics
        fields = {"temperature": self.temperature, "tta": m["tta"],
                  "metrics": {k: m[k] for k in ("accuracy", "accuracy_ci95", "loss", "macro_f1", "ece", "num_samples")}
                             | {"ece_before_calibration": m["calibration"]["ece_before"], "split": m["split"]}}
        if m.get("ood"):  # what the Predictor needs to say "this may be none of the classes" (bundle.OOD_FIELD)
            fields[OOD_FIELD] = {k: m["ood"][k] for k in ("score", "threshold", "keep")}
        return fields

    @torch.no_grad()
    def measure_ood(self, model: nn.Module, transform, channels: int, device: torch.device, dtype=None,
                    others: dict[str, Split] | None = None, per_kind: int = ood.SYNTHETIC_PER_KIND) -> None:
        """The share of out-of-domain images the stored threshold flags (its true-positive rate):
        classifier.ood's synthetic kinds, then `others` (name: a split of images of none of the
        classes), and all pooled, into metrics["ood"]["out_of_domain"]; through `transform` (the
        bundle's eval transform) and the evaluation's own TTA and temperature, as Predictor sees
        an upload. Nothing to do without a threshold (no validation split to fit it on)."""
        record = self.metrics.get("ood")
        if not record:
            return
        sets = {kind: Split(ood.synthetic_images(kind, per_kind), np.zeros(per_kind, dtype=np.int64))
                for kind in ood.SYNTHETIC_KINDS}
        sets.update(others or {})
        evaluated, scores = TTA(model, self.metrics["tta"]), {}
        for name, split in sets.items():
            loader = DataLoader(ImageDataset(split, transform, channels), batch_size=64,
                                collate_fn=collate_skipping_broken)
            logits, _, _ = predict_logits(evaluated, loader, device, dtype)
            scores[name] = ood.energy(logits, self.temperature)
        record["out_of_domain"] = {name: ood.flagged(s, record["threshold"]) for name, s in scores.items()}
        record["out_of_domain"]["pooled"] = ood.flagged(torch.cat(list(scores.values())), record["threshold"])

    def save(self, eval_dir: str | os.PathLike, data: DataSplits, in_chans: int, mistakes: int | None = None,
             history: list[dict] | None = None) -> None:
        """eval/: metrics, confusion matrix, the mistakes (the `mistakes` most confident ones, or
        every one: None), samples, curves."""
        classes = data.classes
        shown = data.val if self.metrics.get("split") == "validation" else data.test
        ranked = rank_mistakes(self.test_logits, self.test_targets, self.test_indices, classes, self.temperature,
                               mistakes)
        samples = sample_predictions(self.test_logits, self.test_targets, self.test_indices, classes, self.temperature)
        save_report(eval_dir, self.metrics, ranked, shown, classes, in_chans, history=history, samples=samples)


def evaluate_model(model: torch.nn.Module, val_loader, test_loader, classes: list[str], device: torch.device,
                   dtype=None, tta: str = "none", carved: Sequence[str] = ()) -> Evaluation:
    """Metrics of `model` with the test-time augmentation `tta` (classifier.tta), the temperature
    fitted on the validation logits of that same augmentation (and kept only if it helps), as
    Predictor will apply both. `carved`: the splits ("val", "test") that were carved out of the
    training images rather than given by the data; they decide which split eval/ shows (SPLIT_RULE)
    and are named as such in metrics["splits"]."""
    evaluated = TTA(model, tta)
    val_logits, val_targets, val_indices = predict_logits(evaluated, val_loader, device, dtype)
    test_logits, test_targets, test_indices = predict_logits(evaluated, test_loader, device, dtype)
    split = shown_split(len(val_targets), len(test_targets), carved)
    shown = (val_logits, val_targets, val_indices) if split == "validation" else (test_logits, test_targets, test_indices)
    metrics = calibrated_metrics(shown[0], shown[1], val_logits, val_targets, classes)
    origin = {name: "carved from the training images" if name in carved else "given by the data"
              for name in ("val", "test")}
    splits = {"validation": split_summary(val_logits, val_targets, origin["val"])
                            | {"used_for": ["choosing the best epoch", "fitting the temperature"]},
              "test": split_summary(test_logits, test_targets, origin["test"])}
    # The validation split's accuracy too, so that models (soups, say) can be chosen without the test set.
    metrics.update(split=split, tta=tta_mode(tta), splits=splits, split_rule=SPLIT_RULE,
                   val_accuracy=splits["validation"]["accuracy"],
                   val_accuracy_ci95=splits["validation"]["accuracy_ci95"])
    record = ood_record(val_logits, metrics["calibration"]["temperature"], shown[0], split)
    if record:
        metrics["ood"] = record
    return Evaluation(metrics, *shown)


def ood_record(val_logits: torch.Tensor, temperature: float, shown_logits: torch.Tensor, split: str) -> dict | None:
    """The out-of-distribution threshold (classifier.ood), from the validation logits as the
    temperature was, with its false-positive rate on the shown `split`; None where there are too
    few validation images (as for calibration), whose quantile would mean nothing."""
    if len(val_logits) < CALIBRATION_MIN_SAMPLES:
        return None
    record = ood.fit_threshold(val_logits, temperature)
    record["in_domain"] = {split: ood.flagged(ood.energy(shown_logits, temperature), record["threshold"])}
    return record


def _thumbnail(image: Image.Image, max_side: int = 160) -> Image.Image:
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    return image


def save_report(eval_dir: str | os.PathLike, metrics: dict, mistakes: list[dict], split: Split,
                classes: Sequence[str], channels: int = 3, history: list[dict] | None = None,
                samples: list[dict] | None = None) -> Path:
    """Write eval/: metrics.json, confusion_matrix.{json,png}, mistakes/ + mistakes.json, plots."""
    eval_dir = Path(eval_dir)
    # An evaluation written again (python -m classifier evaluate --write) must not leave the
    # earlier one's mistakes behind beside the new ones.
    shutil.rmtree(eval_dir / MISTAKES_DIR, ignore_errors=True)
    (eval_dir / MISTAKES_DIR).mkdir(parents=True, exist_ok=True)
    (eval_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    (eval_dir / CONFUSION_JSON).write_text(json.dumps(
        {"labels": list(classes), "matrix": metrics["confusion_matrix"], "rows": "true", "columns": "predicted"},
        indent=1))
    plot_confusion_matrix(metrics["confusion_matrix"], classes, eval_dir / CONFUSION_PNG)
    for n, mistake in enumerate(mistakes):
        name = f"{MISTAKES_DIR}/{n:04d}.png"
        _thumbnail(load_pil(split.items[mistake["index"]], channels)).save(eval_dir / name)
        mistake["file"] = name
        if not split.in_memory:
            mistake["source"] = str(split.items[mistake["index"]])
    (eval_dir / MISTAKES_FILE).write_text(json.dumps(mistakes, indent=1))
    if samples:
        plot_sample_grid([load_pil(split.items[s["index"]], channels) for s in samples], samples,
                         eval_dir / SAMPLES_PNG)
    if history:
        plot_history(history, eval_dir / CURVES_PNG)
        (eval_dir / HISTORY_FILE).write_text(json.dumps(history, indent=1))
    return eval_dir


def sample_predictions(logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor,
                       classes: Sequence[str], temperature: float = 1.0, count: int = 32,
                       seed: int = 0) -> list[dict]:
    """A random, seeded selection of predictions, right and wrong, for the samples grid."""
    probs = (logits / temperature).softmax(1)
    pick = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))[:count]
    return [{"index": int(indices[i]), "true": classes[int(targets[i])],
             "predicted": classes[int(probs[i].argmax())], "p": float(probs[i].max())} for i in pick.tolist()]
