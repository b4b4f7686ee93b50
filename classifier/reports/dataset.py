"""The dataset report: what is in the data before any model sees it.

Class counts per split (with a warning when the classes are imbalanced), per-channel mean and std,
the image sizes, modes and formats, the files that cannot be read, and a picture of random samples
of each class. Looking at this first catches the usual surprises: a class with a tenth of the
images, grey-scale files among colour ones, thumbnails among photos, broken downloads.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from classifier.data import DataSplits, Split, channel_stats, load_pil
from classifier.errors import ImageError
from classifier.images import open_image
from classifier.plots import plt, save_figure

SPLITS = ("train", "val", "test")
IMBALANCE_RATIO = 1.5  # largest / smallest training class above this gets a warning
FEW_IMAGES = 10  # a class with fewer training images than this gets a warning


@dataclass
class DatasetReport:
    name: str
    classes: list[str]
    channels: int
    counts: dict[str, list[int]]  # split -> images per class, in class order
    mean: tuple[float, ...]
    std: tuple[float, ...]
    sizes: Counter  # "WxH" -> images, over the inspected images
    modes: Counter  # PIL mode as stored on disk ("RGB", "L", "P", ...) -> images
    formats: Counter  # "JPEG", "PNG", ... ("array" for data held in memory)
    inspected: int  # how many images sizes/modes/formats were read from (a sample of large data)
    unreadable: list[str] = field(default_factory=list)  # "path: reason"
    warnings: list[str] = field(default_factory=list)

    @property
    def imbalance(self) -> float:
        """Largest over smallest training class (inf when a class has no training image)."""
        train = self.counts["train"]
        return max(train) / min(train) if min(train) else float("inf")

    def to_dict(self) -> dict:
        return {"name": self.name, "classes": self.classes, "channels": self.channels, "counts": self.counts,
                "imbalance": self.imbalance, "mean": list(self.mean), "std": list(self.std),
                "sizes": dict(self.sizes.most_common()), "modes": dict(self.modes), "formats": dict(self.formats),
                "inspected": self.inspected, "unreadable": self.unreadable, "warnings": self.warnings}


def _inspect(split: Split, indices: np.ndarray, channels: int, sizes: Counter, modes: Counter,
             formats: Counter, unreadable: list[str]) -> None:
    """Size, mode and format of the chosen images as stored; a full decode finds truncated files."""
    if split.in_memory:
        height, width = split.items.shape[1:3]
        sizes[f"{width}x{height}"] += len(indices)
        modes["L" if split.items.ndim == 3 else "RGB"] += len(indices)
        formats["array"] += len(indices)
        return
    for i in indices:
        path = split.items[i]
        try:
            with Image.open(path) as image:
                size, mode, fmt = image.size, image.mode, image.format or "?"
            open_image(path, channels)  # decodes every byte: what the header check let through
        except (ImageError, OSError, ValueError) as exc:
            unreadable.append(f"{path}: {exc}" if str(path) not in str(exc) else str(exc))
            continue
        sizes[f"{size[0]}x{size[1]}"] += 1
        modes[mode] += 1
        formats[fmt] += 1


def dataset_report(data: DataSplits, max_inspect: int = 2000, seed: int = 0,
                   imbalance_ratio: float = IMBALANCE_RATIO) -> DatasetReport:
    """Counts, statistics and problems of `data` (as classifier.data.load_data returns it).

    Sizes, modes and formats come from up to `max_inspect` images per split, chosen at random;
    pass a large number to check every file.
    """
    rng = np.random.default_rng(seed)
    counts = {s: np.bincount(getattr(data, s).targets, minlength=data.num_classes).tolist() for s in SPLITS}
    sizes, modes, formats = Counter(), Counter(), Counter()
    unreadable = list(data.skipped)  # the files load_data already left out
    inspected = 0
    for s in SPLITS:
        split = getattr(data, s)
        chosen = rng.permutation(len(split))[:max_inspect]
        _inspect(split, chosen, data.channels, sizes, modes, formats, unreadable)
        inspected += len(chosen)
    mean, std = channel_stats(data.train, data.channels, seed=seed)
    report = DatasetReport(data.name, list(data.classes), data.channels, counts, mean, std, sizes, modes,
                           formats, inspected, unreadable)
    report.warnings = _warnings(report, imbalance_ratio)
    return report


def _warnings(report: DatasetReport, imbalance_ratio: float) -> list[str]:
    warnings = []
    train = report.counts["train"]
    if report.imbalance > imbalance_ratio:
        big, small = int(np.argmax(train)), int(np.argmin(train))
        warnings.append(
            f"class imbalance: '{report.classes[big]}' has {train[big]} training images, '{report.classes[small]}' "
            f"{train[small]} ({report.imbalance:.1f}x); accuracy will favour the large classes, so compare "
            f"models by macro F1 and consider collecting more of the small ones")
    few = [c for c, n in zip(report.classes, train) if n < FEW_IMAGES]
    if few:
        warnings.append(f"fewer than {FEW_IMAGES} training images for: {', '.join(few)}")
    for s in ("val", "test"):
        empty = [c for c, n in zip(report.classes, report.counts[s]) if n == 0]
        if empty and sum(report.counts[s]):
            warnings.append(f"no {s} images for: {', '.join(empty)} (their {s} scores cannot be measured)")
    if len(report.sizes) > 1:
        warnings.append(f"{len(report.sizes)} different image sizes; they are resized to one input size "
                        f"(most common: {', '.join(s for s, _ in report.sizes.most_common(3))})")
    odd_modes = sorted(set(report.modes) - {"RGB", "L"})
    if odd_modes or len(report.modes) > 1:
        warnings.append(f"mixed image modes {dict(report.modes)}; all are converted to "
                        f"{'RGB' if report.channels == 3 else 'grey-scale (L)'} when loaded")
    if report.unreadable:
        warnings.append(f"{len(report.unreadable)} unreadable file(s), left out of training (listed below)")
    return warnings


def plot_class_samples(data: DataSplits, path: str | os.PathLike, per_class: int = 8, seed: int = 0,
                       max_classes: int = 20) -> Path:
    """A grid: one row per class (the first `max_classes`), `per_class` random training images each."""
    rng = np.random.default_rng(seed)
    classes = data.classes[:max_classes]
    fig, axes = plt.subplots(len(classes), per_class, figsize=(per_class * 1.2, len(classes) * 1.3), squeeze=False)
    for row, (label, name) in enumerate(zip(range(len(classes)), classes)):
        members = np.flatnonzero(data.train.targets == label)
        chosen = rng.permutation(members)[:per_class]
        for col, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if col < len(chosen):
                try:
                    image = load_pil(data.train.items[chosen[col]], data.channels)
                except ImageError:
                    ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=6, color="red")
                else:
                    ax.imshow(image, cmap="gray" if data.channels == 1 else None)
            if col == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(f"{data.name}: random training images per class", fontsize=10)
    return save_figure(fig, path, dpi=100)


def plot_class_counts(report: DatasetReport, path: str | os.PathLike) -> Path:
    """Images per class, stacked by split."""
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(report.classes) + 2), 3.6))
    bottom = np.zeros(len(report.classes))
    for s in SPLITS:
        values = np.asarray(report.counts[s])
        ax.bar(report.classes, values, bottom=bottom, label=s)
        bottom += values
    ax.set_ylabel("images")
    ax.set_title(f"{report.name}: images per class")
    ax.legend()
    ax.tick_params(axis="x", rotation=45)
    for label in ax.get_xticklabels():
        label.set_ha("right")
    return save_figure(fig, path, dpi=100)


def to_markdown(report: DatasetReport, unreadable_limit: int = 20) -> str:
    lines = [f"# Dataset report: {report.name}", "",
             f"{len(report.classes)} classes, {sum(map(sum, report.counts.values())):,} images "
             f"({', '.join(f'{sum(report.counts[s]):,} {s}' for s in SPLITS)})", "",
             "| class | train | val | test |", "|---|---:|---:|---:|"]
    for i, name in enumerate(report.classes):
        lines.append(f"| {name} | " + " | ".join(str(report.counts[s][i]) for s in SPLITS) + " |")
    lines.append("| **total** | " + " | ".join(f"**{sum(report.counts[s])}**" for s in SPLITS) + " |")
    lines += ["", f"Largest / smallest training class: {report.imbalance:.2f}x", "",
              "Per-channel statistics of the training images (pixel values in [0, 1]):", ""]
    names = ["grey"] if report.channels == 1 else ["red", "green", "blue"]
    lines += ["| channel | mean | std |", "|---|---:|---:|"]
    lines += [f"| {n} | {m:.4f} | {s:.4f} |" for n, m, s in zip(names, report.mean, report.std)]
    lines += ["", f"Inspected {report.inspected:,} images:", "",
              "- sizes (WxH): " + ", ".join(f"{s} ({n:,})" for s, n in report.sizes.most_common(8))
              + (f", and {len(report.sizes) - 8} more" if len(report.sizes) > 8 else ""),
              "- modes: " + ", ".join(f"{m} ({n:,})" for m, n in report.modes.most_common()),
              "- formats: " + ", ".join(f"{f} ({n:,})" for f, n in report.formats.most_common())]
    if report.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report.warnings]
    if report.unreadable:
        lines += ["", "## Unreadable files", ""] + [f"- {u}" for u in report.unreadable[:unreadable_limit]]
        if len(report.unreadable) > unreadable_limit:
            lines.append(f"- ... and {len(report.unreadable) - unreadable_limit} more (see unreadable.txt)")
    return "\n".join(lines) + "\n"
