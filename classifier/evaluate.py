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

import torch
from PIL import Image
from torch import nn

from classifier import distributed
from classifier.bundle import (CONFUSION_JSON, CONFUSION_PNG, CURVES_PNG, HISTORY_FILE, METRICS_FILE, MISTAKES_DIR,
                               MISTAKES_FILE, SAMPLES_PNG)
from classifier.data import DataSplits, Split, load_pil
from classifier.plots import plot_confusion_matrix, plot_history, plot_sample_grid
from classifier.tta import TTA, tta_mode

MIN_TEMPERATURE, MAX_TEMPERATURE = 0.1, 10.0


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
                  "f1": float(f1[i]), "support": int(support[i]), "accuracy": float(recall[i])}
                 for i, c in enumerate(classes)]
    return {
        "num_samples": int(len(targets)),
        "loss": float(nn.functional.cross_entropy(scaled, targets)),
        "accuracy": float((predicted == targets).double().mean()),
        "macro_precision": float(precision[present].mean()),
        "macro_recall": float(recall[present].mean()),
        "macro_f1": float(f1[present].mean()),
        "ece": expected_calibration_error(probs, targets),
        "temperature": float(temperature),
        "per_class": per_class,
        "confusion_matrix": cm.long().tolist(),
    }


def calibrated_metrics(test_logits, test_targets, val_logits, val_targets, classes) -> dict:
    """Test metrics at the temperature fitted on validation, with the uncalibrated figures beside."""
    temperature = fit_temperature(val_logits, val_targets) if len(val_targets) else 1.0
    metrics = compute_metrics(test_logits, test_targets, classes, temperature)
    raw = compute_metrics(test_logits, test_targets, classes, 1.0)
    metrics["calibration"] = {"temperature": temperature, "fitted_on": "validation",
                              "ece_before": raw["ece"], "ece_after": metrics["ece"],
                              "nll_before": raw["loss"], "nll_after": metrics["loss"]}
    return metrics


# ----------------------------------------------------------------------------------------------
# Mistakes and the eval/ folder


def rank_mistakes(logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor,
                  classes: Sequence[str], temperature: float = 1.0, limit: int = 200) -> list[dict]:
    """The misclassified samples, worst (highest loss) first, with their top probabilities."""
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
    """A model's calibrated test metrics (temperature fitted on the validation split) and the test
    logits the mistakes and samples of eval/ are drawn from."""
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
        return {"temperature": self.temperature, "tta": m["tta"],
                "metrics": {k: m[k] for k in ("accuracy", "loss", "macro_f1", "ece", "num_samples")}
                           | {"ece_before_calibration": m["calibration"]["ece_before"], "split": m["split"]}}

    def save(self, eval_dir: str | os.PathLike, data: DataSplits, in_chans: int, mistakes: int,
             history: list[dict] | None = None) -> None:
        """eval/: metrics, confusion matrix, the `mistakes` most confident mistakes, samples, curves."""
        classes = data.classes
        ranked = rank_mistakes(self.test_logits, self.test_targets, self.test_indices, classes, self.temperature,
                               mistakes)
        samples = sample_predictions(self.test_logits, self.test_targets, self.test_indices, classes, self.temperature)
        save_report(eval_dir, self.metrics, ranked, data.test, classes, in_chans, history=history, samples=samples)


def evaluate_model(model: torch.nn.Module, val_loader, test_loader, classes: list[str], device: torch.device,
                   dtype=None, tta: str = "none") -> Evaluation:
    """Test metrics of `model` with the test-time augmentation `tta` (classifier.tta), the
    temperature fitted on the validation logits of that same augmentation, as Predictor will apply
    both."""
    evaluated = TTA(model, tta)
    val_logits, val_targets, _ = predict_logits(evaluated, val_loader, device, dtype)
    test_logits, test_targets, test_indices = predict_logits(evaluated, test_loader, device, dtype)
    metrics = calibrated_metrics(test_logits, test_targets, val_logits, val_targets, classes)
    # The validation split's accuracy too, so that models (soups, say) can be chosen without the test set.
    metrics.update(split="test", tta=tta_mode(tta),
                   val_accuracy=float((val_logits.argmax(1) == val_targets).float().mean()) if len(val_targets) else None)
    return Evaluation(metrics, test_logits, test_targets, test_indices)


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
