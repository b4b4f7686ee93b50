#!/usr/bin/env python
"""Data loading alone, side by side on the same folder of JPEGs; prints a markdown table of images/s.

    python benchmarks/loader_speed.py --data-dir ../shared/data/cifar10-jpeg.tar.gz
    python benchmarks/loader_speed.py --generate 2000 --generate-size 256 --image-size 224

Rows, each over the same training images, batches of --batch-size, no model:
- a plain torchvision ImageFolder DataLoader (the tutorials' way: default settings, workers restarted
  every pass);
- the project's DataLoader path (classifier.data.ImageDataset with the run's transform, pinned memory
  on CUDA, persistent workers, prefetch 4: what `--loader workers` trains with);
- for small images, the in-memory path (classifier.fastdata.DeviceLoader, `--loader memory`), after
  a one-time decode into memory whose cost is shown on its own row (the disk cache then makes it
  a file read).
Each loader makes --passes passes over --limit images; the first pass pays for starting the worker
processes, later passes show what persistent workers save. With --generate N, a folder of N larger
JPEGs (CIFAR-10 images upscaled, or random pictures without --data-dir) stands in for photos.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision import datasets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from classifier.data import (ImageDataset, Split, _find_split_dirs, _resolve_dir,  # noqa: E402
                             channel_stats, load_data, materialize)
from classifier.config import RunConfig  # noqa: E402
from classifier.run import _loader  # noqa: E402  (the DataLoader that runs build)
from classifier.fastdata import DeviceLoader  # noqa: E402
from classifier.transforms import train_transform  # noqa: E402


def train_folder(args) -> Path:
    """The ImageFolder root of the training images: the unpacked CIFAR-10 train/, or a generated one."""
    if args.generate:
        return generate_folder(Path(tempfile.mkdtemp(prefix="loader-speed-")), args)
    root = _resolve_dir(args.data_dir)
    return _find_split_dirs(root).get("train", root)


def generate_folder(root: Path, args) -> Path:
    """--generate N JPEGs of --generate-size px in 10 class folders (quality 90, as cameras save)."""
    rng = np.random.default_rng(0)
    source = None
    if args.data_dir:
        source = materialize(load_data("cifar10", data_dir=args.data_dir).train, 3)[0]
    for i in range(args.generate):
        label = i % 10
        if source is not None:
            image = Image.fromarray(source.items[i % len(source)]).resize((args.generate_size,) * 2, Image.BICUBIC)
        else:
            small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((args.generate_size,) * 2, Image.BICUBIC)
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:06d}.jpg", quality=90)
    return root


def rate(loader, passes: int, device: torch.device) -> list[float]:
    """images/s of each pass; batches are moved to `device` as training would."""
    rates = []
    for epoch in range(passes):
        for obj in (loader, getattr(loader, "sampler", None)):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
        begun, seen = time.perf_counter(), 0
        for batch in loader:
            x = batch[0].to(device, non_blocking=True)
            seen += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(seen / (time.perf_counter() - begun))
    return rates


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="../shared/data/cifar10-jpeg.tar.gz", help="an ImageFolder (or .tar.gz) with train/")
    p.add_argument("--generate", type=int, default=0, help="use N generated larger JPEGs instead")
    p.add_argument("--generate-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=None, help="the model's input size (default: the images')")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, default=10000, help="images per pass")
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--workers", default="0,2", help="comma-separated worker counts for the DataLoader rows")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)

    folder = train_folder(args)
    # One list of images for every row: a random --limit of the folder's, in ImageFolder's labelling.
    samples = datasets.ImageFolder(str(folder)).samples
    pick = np.sort(np.random.default_rng(0).permutation(len(samples))[: args.limit])
    split = Split([samples[i][0] for i in pick], np.asarray([samples[i][1] for i in pick], dtype=np.int64))
    with Image.open(split.items[0]) as first:
        native = max(first.size)
    small = native <= 64
    size = args.image_size or native
    mean, std = channel_stats(split, 3, max_images=1000)
    rows = []

    # The tutorials' loader: ImageFolder, the same augmentation, default DataLoader settings.
    plain_transform = train_transform({"input_size": (3, size, size), "mean": mean, "std": std,
                                       "interpolation": "bilinear"}, small=small)
    for workers in [int(w) for w in args.workers.split(",")]:
        subset = Subset(datasets.ImageFolder(str(folder), transform=plain_transform), pick.tolist())
        loader = DataLoader(subset, batch_size=args.batch_size, shuffle=True, num_workers=workers)
        rows.append((f"torchvision ImageFolder DataLoader, {workers} workers", rate(loader, args.passes, device)))

    # The project's DataLoader path, as `--loader workers` builds it.
    for workers in [int(w) for w in args.workers.split(",")]:
        dataset = ImageDataset(split, plain_transform, 3)
        loader = _loader(dataset, args.batch_size, train=True, cfg=RunConfig(workers=workers), device=device)
        rows.append((f"project DataLoader path (persistent, prefetch 4), {workers} workers",
                     rate(loader, args.passes, device)))
        del loader

    if small:
        # One-time decode into memory (what materialize_small does; its disk cache makes it a read).
        with tempfile.TemporaryDirectory() as cache:
            os.environ["CLASSIFIER_CACHE"] = cache
            begun = time.perf_counter()
            decoded, _ = materialize(split, 3)
            decode_rate = len(split) / (time.perf_counter() - begun)
            begun = time.perf_counter()
            materialize(split, 3)
            cached_rate = len(split) / (time.perf_counter() - begun)
        rows.append(("one-time decode into memory (first run)", [decode_rate]))
        rows.append(("one-time decode into memory (from its disk cache)", [cached_rate]))
        loader = DeviceLoader.from_split(decoded, batch_size=args.batch_size, train=True, mean=mean, std=std,
                                         device=device, size=size)
        rows.append((f"in-memory DeviceLoader on {device.type}", rate(loader, args.passes, device)))

    print(f"# Loader speed: {len(split)} training images of {native} px from {folder}, to {size} px, "
          f"batch {args.batch_size}, device {device}, {os.cpu_count()} CPU cores\n")
    print("| loader | " + " | ".join(f"pass {i + 1} img/s" for i in range(args.passes)) + " |")
    print("|---|" + "---|" * args.passes)
    for name, rates in rows:
        cells = [f"{r:,.0f}" for r in rates] + [""] * (args.passes - len(rates))
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
