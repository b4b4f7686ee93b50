#!/usr/bin/env python
"""The Train tab's speed and accuracy: seconds to a ready model and how right it is, on this machine.

    python benchmarks/teach.py                                  # the 3 x 3 grid, head only (~10 min, 2-core CPU)
    python benchmarks/teach.py --longer-upto 30                 # and "train longer" for sets of up to 30 a class
    python benchmarks/teach.py --real /tmp/offdata/real         # also a folder of real photos, <split>/<class>/*

For 2, 3 and 5 classes of 10, 30 and 100 images each, it builds a set from CIFAR-10's test images
upscaled to photo size (1600x1200 JPEG, quality 90: the decoding cost of a real 2-megapixel photo, with
the detail of a 32 px one), teaches it as the app does (classifier.teach.teach, a fresh embedding
cache each time, so every image is decoded and embedded) and reports:

- seconds: from the files on disk to a written bundle (embedding, cross-validation, head, eval/ and
  card); the backbone's one-off load (once per app, not per training) is reported apart;
- cross-validated accuracy: what the Train tab shows (each image predicted by a head fitted without it);
- held-out accuracy: the written bundle through the Predictor (as /classify serves it) on 100 other
  images a class that teaching never saw, with its 95% interval;
- with --longer-upto N, "train longer" (3 epochs of the whole network) for sets of up to N a class:
  its seconds, whether it was kept, and the kept model's held-out accuracy.

--real takes a folder with train/ and val/ (or test/) class folders of real photos: taught on train/,
held-out accuracy on the other split.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from classifier.data import _unpack_archive  # noqa: E402
from classifier.images import IMAGE_EXTENSIONS  # noqa: E402
from classifier.intervals import wilson_interval  # noqa: E402
from classifier.predict import Predictor  # noqa: E402
from classifier.teach import Embedder, teach, train_longer  # noqa: E402

CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"  # from a worktree elsewhere: --cifar PATH
CLASS_SETS = {2: ["cat", "ship"], 3: ["cat", "dog", "ship"], 5: ["airplane", "bird", "cat", "dog", "ship"]}
SIZES = (10, 30, 100)
HELD_OUT = 100
PHOTO_SIZE = (1600, 1200)


def build(cifar_test: Path, out: Path, classes: list[str], per_class: int, offset: int) -> dict[str, list[str]]:
    images = {}
    for name in classes:
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        files = sorted((cifar_test / name).iterdir())[offset:offset + per_class]
        images[name] = []
        for f in files:
            target = folder / f"{f.stem}.jpg"
            Image.open(f).convert("RGB").resize(PHOTO_SIZE, Image.BICUBIC).save(target, quality=90)
            images[name].append(str(target))
    return images


def held_out_accuracy(bundle: Path, images: dict[str, list[str]]) -> tuple[float, list[float], int]:
    predictor = Predictor(bundle)
    right = total = 0
    for name, paths in images.items():
        for start in range(0, len(paths), 32):
            for probs in predictor.predict_batch(paths[start:start + 32]):
                right += next(iter(probs)) == name
                total += 1
    return right / total, list(wilson_interval(right, total)), total


def folder_set(root: Path) -> dict[str, list[str]]:
    return {c.name: sorted(str(p) for p in c.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            for c in sorted(root.iterdir()) if c.is_dir()}


def run_one(label: str, images, held, work: Path, longer: bool, longer_epochs: int) -> list[str]:
    embedder = Embedder()  # a fresh cache: every image decoded and embedded
    taught = teach(images, work / "head", embedder)
    acc, ci, n = held_out_accuracy(work / "head", held)
    m = taught.metrics
    row = [label, f"{taught.seconds:.1f}", f"{m['accuracy']:.1%} (n={m['num_samples']})",
           f"{acc:.1%} ({ci[0]:.1%}-{ci[1]:.1%}, n={n})"]
    if longer:
        started = time.perf_counter()  # its own wall time (a Taught that kept the head keeps the head's seconds)
        more = train_longer(images, work / "longer", work / "work", embedder, taught, epochs=longer_epochs)
        kept = more.method == "fine-tuned"
        row += [f"{time.perf_counter() - started:.0f}", "fine-tuned" if kept else "head kept"]
        if kept:
            acc2, ci2, n2 = held_out_accuracy(work / "longer", held)
            row.append(f"{acc2:.1%} ({ci2[0]:.1%}-{ci2[1]:.1%})")
        else:
            row.append("(as head)")
    else:
        row += ["-", "-", "-"]
    print(" | ".join(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", default=str(CIFAR))
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--classes", default="2,3,5", help="which class sets: 2, 3, 5 ('' for none)")
    parser.add_argument("--longer-upto", type=int, default=0, help="train longer for sets of up to N a class")
    parser.add_argument("--longer-epochs", type=int, default=3)
    parser.add_argument("--real", type=Path, default=None, help="a folder of real photos: train/ and val/ or test/")
    parser.add_argument("--results", type=Path, default=None, help="write the table here (markdown)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    work = Path(tempfile.mkdtemp(prefix="teach-bench-"))
    started = time.perf_counter()
    Embedder()
    load_s = time.perf_counter() - started
    header = ["set", "seconds to a ready model", "cross-validated accuracy", "held-out accuracy (95% interval)",
              "train longer: seconds", "kept", "its held-out accuracy"]
    rows = []
    print(" | ".join(header), flush=True)
    try:
        if args.real:
            splits = {p.name: p for p in args.real.iterdir() if p.is_dir()}
            train = folder_set(splits["train"])
            held = folder_set(splits.get("val") or splits["test"])
            label = (f"real photos: {', '.join(f'{k} {len(v)}' for k, v in train.items())} "
                     f"({args.real.name})")
            rows.append(run_one(label, train, held, work / "real", args.longer_upto > 0, args.longer_epochs))
        class_sets = [int(k) for k in args.classes.split(",") if k.strip()]
        cifar = (_unpack_archive(Path(args.cifar)) if str(args.cifar).endswith(".tar.gz") else Path(args.cifar)) \
            if class_sets else None
        for k in class_sets:
            for n in map(int, args.sizes.split(",")):
                folder = work / f"{k}x{n}"
                images = build(cifar / "test", folder / "teach", CLASS_SETS[k], n, 0)
                held = build(cifar / "test", folder / "held", CLASS_SETS[k], HELD_OUT, 500)
                rows.append(run_one(f"{k} classes x {n} ({', '.join(CLASS_SETS[k])})", images, held, folder,
                                    n <= args.longer_upto, args.longer_epochs))
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()[0]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join([
        "# Teaching new classes (the Train tab): seconds to a ready model, and how right it is", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; load average {load:.1f} at the end (shared machine).",
        f"Backbone load, once per app: {load_s:.1f} s. Command: `python {' '.join(sys.argv)}`.", "",
        "CIFAR-10 sets: test images upscaled to 1600x1200 JPEG (photo-sized files with 32 px detail); held-out "
        f"accuracy on {HELD_OUT} other test images a class through the Predictor. Train longer: "
        f"{args.longer_epochs} epochs of the whole network, kept only if better on 20% of each class held out.", "",
        *table, ""])
    print("\n" + text)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(text)


if __name__ == "__main__":
    random.seed(0)
    main()
