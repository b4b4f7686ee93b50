"""Every figure the project draws with matplotlib, written to files (never shown on a display).

Training, evaluation, the learning-rate finder, `predict --plot` and the reports draw here; serving
(the app, the Predictor, `predict` without --plot) never imports this module, so it never loads
matplotlib. Each function takes plain data (lists, arrays, PIL images), not datasets, and returns
or writes a PNG.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Lay out, write (creating the folder) and close a figure; every plot of the project ends here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_confusion_matrix(matrix, classes: Sequence[str], path: str | os.PathLike) -> Path:
    cm = np.asarray(matrix, dtype=np.float64)
    row_sums = cm.sum(1, keepdims=True)
    normalised = np.divide(cm, row_sums, out=np.zeros_like(cm), where=row_sums > 0)
    n = len(classes)
    size = max(5.0, 0.55 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix\n(counts; colour = share of the true class)")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if normalised[i, j] > 0.5 else "black")
    return save_figure(fig, path, dpi=110)


def plot_history(history: list[dict] | dict[str, list[dict]], path: str | os.PathLike) -> Path | None:
    """Loss and accuracy per epoch, train and validation, side by side; for several runs (the
    models a soup averages), a {name: history} with one pair of lines per run."""
    runs = history if isinstance(history, dict) else {"": history}
    runs = {name: records for name, records in runs.items() if records}
    if not runs:
        return None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name, records in runs.items():
        epochs = [r["epoch"] for r in records]
        for split in ("train", "val"):
            label = f"{name} {split}".strip()
            ax_loss.plot(epochs, [r[f"{split}_loss"] for r in records], marker="o", label=label)
            ax_acc.plot(epochs, [r[f"{split}_acc"] for r in records], marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7 if len(runs) > 1 else None)
    return save_figure(fig, path)


def plot_sample_grid(images: Sequence[Image.Image], samples: Sequence[dict], path: str | os.PathLike,
                     columns: int = 8) -> Path:
    """Images with their predictions as titles: green when right, red when wrong. `samples` are
    dicts with "true", "predicted" and "p" (the predicted class's probability), one per image."""
    rows = math.ceil(len(samples) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, s in zip(axes.flat, images, samples):
        ax.imshow(image, cmap="gray" if image.mode == "L" else None)
        right = s["predicted"] == s["true"]
        label = f"{s['predicted']} ({s['p']:.0%})" if right else f"{s['predicted']} ({s['p']:.0%})\nnot {s['true']}"
        ax.set_title(label, fontsize=7, color="green" if right else "red")
    return save_figure(fig, path)


def plot_lr_finder(result, path: str | os.PathLike, title: str | None = None) -> Path:
    """Loss against learning rate on a log axis, the raw loss faint, the suggestions marked
    (`result`: a classifier.lr_finder.LRFinderResult)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(result.lrs, result.losses, color="tab:blue", alpha=0.2, linewidth=0.8, label="loss per step")
    ax.plot(result.lrs, result.smoothed, color="tab:blue", linewidth=2, label="smoothed loss")
    ax.set_xscale("log")
    markers = {"auto": ("tab:purple", "D"), "valley": ("tab:green", "o"), "steepest": ("tab:orange", "s"),
               "minimum": ("tab:red", "^")}
    for name, (colour, marker) in markers.items():
        lr = getattr(result, name, float("nan"))
        if not np.isfinite(lr):  # a curve saved before there was an "auto" suggestion
            continue
        y = float(np.interp(np.log10(lr), np.log10(result.lrs), result.smoothed))
        chosen = name == result.method
        ax.plot(lr, y, marker=marker, color=colour, markersize=10 if chosen else 7, linestyle="none",
                label=f"{name}: {lr:.2g}" + ("  (suggested)" if chosen else ""))
        if chosen:
            ax.axvline(lr, color=colour, linestyle="--", alpha=0.6)
    # The explosion can be orders of magnitude above the useful range: clip the y axis to keep the
    # interesting part readable.
    keep = result.settled()
    low, high = min(keep), max(result.smoothed[0], min(max(keep), 4 * min(keep)))
    ax.set_ylim(low - 0.05 * (high - low), high + 0.15 * (high - low) + 1e-9)
    ax.set(xlabel="learning rate (log scale)", ylabel="training loss",
           title=title or f"Learning-rate range test: suggested {result.suggestion:.2g}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=110)


def plot_predictions(rows: Sequence[tuple[str, Image.Image, dict[str, float]]], path: str | os.PathLike) -> Path:
    """One row per image: the image on the left (titled with its name), its top classes as
    horizontal bars on the right. `rows`: (name, image, {class: probability} most likely first)."""
    fig, axes = plt.subplots(len(rows), 2, figsize=(9, 2.6 * len(rows)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.6]})
    for (ax_image, ax_bars), (name, image, predictions) in zip(axes, rows):
        ax_image.imshow(image, cmap="gray" if image.mode == "L" else None)
        ax_image.set_title(name, fontsize=9)
        ax_image.axis("off")
        names, probs = list(predictions)[::-1], list(predictions.values())[::-1]
        bars = ax_bars.barh(names, probs, color=["tab:blue"] * (len(names) - 1) + ["tab:green"])
        ax_bars.bar_label(bars, labels=[f"{p:.1%}" for p in probs], padding=3, fontsize=8)
        ax_bars.set_xlim(0, 1.15)
        ax_bars.set_xlabel("probability")
        ax_bars.spines[["top", "right"]].set_visible(False)
    return save_figure(fig, path, dpi=100)
