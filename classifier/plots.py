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


def _filter_mosaic(weight: np.ndarray, max_filters: int, max_inputs: int) -> np.ndarray:
    """One conv layer's weights (out, in, kh, kw) as one image: a column per output filter, a row
    per input channel (so a first layer's few inputs make a short, wide strip), with a one-pixel
    NaN gap (drawn blank) between kernels. One imshow per layer keeps the figure cheap for layers
    of thousands of kernels, where a subplot per kernel would not."""
    w = weight[:max_filters, :max_inputs]
    out, inputs, kh, kw = w.shape
    mosaic = np.full((inputs * (kh + 1) - 1, out * (kw + 1) - 1), np.nan)
    for o in range(out):
        for i in range(inputs):
            mosaic[i * (kh + 1):i * (kh + 1) + kh, o * (kw + 1):o * (kw + 1) + kw] = w[o, i]
    return mosaic


def plot_conv_filters(layers: Sequence[tuple[str, np.ndarray]], path: str | os.PathLike,
                      max_filters: int = 32, max_inputs: int = 32) -> Path:
    """The filters of every convolution layer, one panel per layer (not only the first layer's,
    whose filters alone look at pixels). `layers`: (name, weight of shape (out, in, kh, kw)), e.g.
    from classifier.models.conv_filters(model). Each panel has a column per output filter and a
    row per input channel; the colour scale is symmetric about zero per layer, so red and blue
    are a layer's positive and negative weights whatever their size. Large layers show their first
    max_filters x max_inputs kernels."""
    if not layers:
        raise ValueError("no convolution layers to draw")
    mosaics = [(name, np.asarray(w).shape, _filter_mosaic(np.asarray(w, dtype=np.float64), max_filters, max_inputs))
               for name, w in layers]
    fig, axes = plt.subplots(len(mosaics), 1, figsize=(8, sum(_panel_height(m) for _, _, m in mosaics)),
                             squeeze=False)
    for ax, (name, shape, mosaic) in zip(axes[:, 0], mosaics):
        limit = float(np.nanmax(np.abs(mosaic))) or 1.0
        image = ax.imshow(mosaic, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        shown = "" if shape[0] <= max_filters and shape[1] <= max_inputs else \
            f" (first {min(shape[0], max_filters)} x {min(shape[1], max_inputs)} shown)"
        ax.set_title(f"{name}: {shape[0]} filters x {shape[1]} inputs, {shape[2]}x{shape[3]}{shown}", fontsize=9)
        ax.set_xlabel("filter", fontsize=8)
        ax.set_ylabel("input channel", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    return save_figure(fig, path, dpi=110)


def _panel_height(mosaic: np.ndarray) -> float:
    # as tall as the mosaic's shape asks at the figure's 8-inch width, within what fits on a page
    aspect = mosaic.shape[0] / max(1, mosaic.shape[1])
    return min(8.0, max(1.6, 6.5 * aspect + 0.8))


def plot_image_channels(image: Image.Image | np.ndarray, path: str | os.PathLike, values_up_to: int = 16) -> Path:
    """An image's red, green and blue channels side by side, each a grid of its pixel values
    (0-255): what a network's first layer actually receives. Values are written in the cells
    when the image is at most `values_up_to` pixels a side (beyond that they would not be
    legible; crop or resize first), otherwise a colour bar gives the scale."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {pixels.shape}")
    h, w = pixels.shape[:2]
    write_values = max(h, w) <= values_up_to
    side = max(3.0, 0.42 * w) if write_values else 3.5
    fig, axes = plt.subplots(1, 3, figsize=(3 * side + 1, side * h / w + 0.8))
    for c, (ax, name, cmap) in enumerate(zip(axes, ("red", "green", "blue"), ("Reds", "Greens", "Blues"))):
        channel = pixels[:, :, c]
        shown = ax.imshow(channel, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"{name} channel", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        if write_values:
            _write_values(ax, channel)
        else:
            fig.colorbar(shown, ax=ax, shrink=0.8)
    return save_figure(fig, path, dpi=110)


def _write_values(ax, channel: np.ndarray) -> None:
    for (y, x), value in np.ndenumerate(channel):
        # white text on the dark half of the colour map, black on the light half
        ax.text(x, y, f"{int(value)}", ha="center", va="center", fontsize=7,
                color="white" if value > 140 else "black")


# Sobel's kernel for vertical edges: it answers where brightness changes from left to right (the
# difference of the right and left columns, the middle row weighted twice), and is 0 on flat areas.
SOBEL_VERTICAL = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def edge_response(image: Image.Image | np.ndarray, kernel: np.ndarray = SOBEL_VERTICAL) -> np.ndarray:
    """A grey image (H, W) filtered with a hand-set 3x3 kernel, same size as the image.

    torch.nn.functional.conv2d does it because it is the very operation of a network's conv layer
    (a cross-correlation: the kernel is not flipped), so the figure shows what a first-layer filter
    with these weights computes, and no SciPy is needed. The border is padded by repeating the edge
    pixels, not with zeros, which would make a false edge all round a bright image."""
    import torch  # here, not at the top: the other figures do not need torch loaded
    import torch.nn.functional as F

    grey = np.asarray(image.convert("L") if isinstance(image, Image.Image) else image, dtype=np.float32)
    weights = np.asarray(kernel, dtype=np.float32)
    if grey.ndim != 2 or weights.shape != (3, 3):
        raise ValueError(f"expected a grey image (H, W) and a 3x3 kernel, got {grey.shape} and {weights.shape}")
    x = F.pad(torch.from_numpy(grey)[None, None], (1, 1, 1, 1), mode="replicate")
    return F.conv2d(x, torch.from_numpy(weights)[None, None])[0, 0].numpy()


def plot_edge_kernel(image: Image.Image | np.ndarray, path: str | os.PathLike, kernel: np.ndarray | None = None) -> Path:
    """An image, the hand-set 3x3 kernel (Sobel's vertical-edge one unless given) with its weights
    written in, and the image filtered with it, side by side: an edge detector made by hand, before
    a network learns its own. The response's colours are symmetric about zero, so red and blue are
    the two directions of an edge (dark to bright and bright to dark) and white is no edge."""
    kernel = SOBEL_VERTICAL if kernel is None else np.asarray(kernel, dtype=np.float64)
    response = edge_response(image, kernel)
    grey = np.asarray(image.convert("L") if isinstance(image, Image.Image) else image)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 1.4, 3]})
    axes[0].imshow(grey, cmap="gray", interpolation="nearest")
    axes[0].set_title("image (grey)", fontsize=10)
    _draw_kernel(axes[1], kernel)
    limit = float(np.abs(response).max()) or 1.0
    shown = axes[2].imshow(response, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    axes[2].set_title("filtered: the kernel's response", fontsize=10)
    fig.colorbar(shown, ax=axes[2], shrink=0.8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, path, dpi=110)


def _draw_kernel(ax, kernel: np.ndarray) -> None:
    limit = float(np.abs(kernel).max()) or 1.0
    ax.imshow(kernel, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    for (y, x), value in np.ndenumerate(kernel):
        # white on the dark ends of the colour map, black in its light middle
        ax.text(x, y, f"{value:g}", ha="center", va="center", fontsize=11,
                color="white" if abs(value) > 0.6 * limit else "black")
    ax.set_title("3x3 kernel", fontsize=10)
