#!/usr/bin/env python
"""Your own photos: the zero-flag command against the best hand-tuned one, on data built offline.

    python benchmarks/own_photos.py                          # build the data, run the table (~15 min, 2-core CPU)
    python benchmarks/own_photos.py --only photos,real       # some of the rows
    python benchmarks/own_photos.py --lr-study               # the learning-rate rule: --lr auto against a grid

For each dataset it runs, one after the other on the same machine, the zero-flag command

    python training/finetune.py --data DATA --out OUT

and the best hand-tuned command found for that data (HAND_TUNED, with how it was found), then prints
one table: the split each accuracy is measured on, its size and 95% interval, the learning rate,
input size and epochs each command used, its wall-clock seconds and training images/s. Zero flags
must come within 1 point of the hand-tuned command. Both accuracies are measured on the same images,
so their difference is less uncertain than either interval, but a point on 100 images is one image.

The data (benchmarks/offline_datasets.py builds it; docs/offline_data.md says where it comes from):

- photos: CIFAR-10 airplane and bird images upscaled to mixed photo sizes (200-640 px, aspect
  0.6-1.6, JPEG quality 85-95) in train/ and val/ class folders: 300 train, 100 val. The stand-in for
  "a folder of a few hundred photos in two classes": their detail is still that of 32 px images.
- cifar32: the same 400 images at their native 32 px.
- grey-csv: 1,000 Fashion-MNIST images (100 a class, from Debian's dataset-fashion-mnist), 28 px grey
  PNGs named by an id,label CSV: ten classes.
- real: real photographs from Debian's gcompris-qt-data (CC-licensed, credits in their READMEs): 57
  animals and 76 monuments, as found (webp/jpeg, mixed sizes), 70% of each class in train/, 30% in val/.
- hf: the photos as a Hugging Face DatasetDict saved with save_to_disk (zero flags only: the source).

Times are wall-clock seconds of the whole command (start-up, data, training, evaluation, bundle) on
whatever else the machine runs: the load average when each run starts is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

import offline_datasets as offline  # noqa: E402

from classifier.intervals import describe_accuracy  # noqa: E402

FINETUNE = ROOT / "training" / "finetune.py"


@dataclass
class Dataset:
    name: str
    what: str
    data: str  # relative to the data folder
    hand: list[str] = field(default_factory=list)  # the best hand-tuned flags found (empty: zero flags only)
    found: str = ""  # how the hand-tuned flags were found


# The hand-tuned commands, each the best of a grid run on this data with this code (benchmarks/
# results/own_photos_grid_cpu.md lists every point): fine-tuning tf_efficientnet_lite0 with SGD.
DATASETS = {
    "photos": Dataset("photos", "CIFAR-10 airplane/bird as mixed-size JPEG photos, train/ + val/ folders",
                      "cifar-airplane-bird-photos",
                      ["--model", "tf_efficientnet_lite0", "--image-size", "128", "--epochs", "8", "--batch-size", "32",
                       "--lr", "0.02"], "lr 0.005-0.1, 96-160 px, 4-8 epochs, freezing the body for an epoch or not"),
    "cifar32": Dataset("cifar32", "the same images at their native 32 px", "cifar-airplane-bird-32px",
                       ["--model", "tf_efficientnet_lite0", "--image-size", "96", "--epochs", "10", "--batch-size", "32",
                        "--lr", "0.02"], "lr 0.01-0.05, 64-128 px, fast_cnn from scratch"),
    "grey-csv": Dataset("grey-csv", "Fashion-MNIST, 1,000 grey 28 px PNGs and an id,label CSV, 10 classes",
                        "fashion-mnist-csv/train.csv",
                        ["--model", "tf_efficientnet_lite0", "--image-size", "64", "--epochs", "8", "--batch-size", "32",
                         "--lr", "0.02"], "lr 0.01-0.05, 64-96 px, fast_cnn from scratch"),
    "real": Dataset("real", "real photographs (GCompris): animals vs monuments, train/ + val/ folders",
                    "gcompris-animals-monuments",
                    ["--model", "tf_efficientnet_lite0", "--image-size", "224", "--epochs", "6", "--batch-size", "16",
                     "--lr", "0.01"], "lr 0.01-0.02, 160-224 px"),
    "hf": Dataset("hf", "the photos as a Hugging Face dataset saved on disk", "hf-cifar-airplane-bird-photos"),
}
CLASSES = ["airplane", "bird"]


# -------------------------------------------------------------------------------------- data


def build_real_photos(out: Path, seed: int = 0, debs: Path = offline.DEFAULT_DEBS) -> Path | None:
    """out/gcompris-animals-monuments/{train,val}/{animal,monument}/*: GCompris's animal photos (erase,
    explore_*_animals) and monument photos, as their files are, 70% of each class to train."""
    photos = offline.gcompris_photos(debs=debs)
    if not photos:
        return None
    groups = {"animal": [p for p in photos if "animals" in p.path or "/erase/" in p.path],
              "monument": [p for p in photos if "monuments" in p.path]}
    root = out / "gcompris-animals-monuments"
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for label, members in groups.items():
        order = rng.permutation(len(members))
        cut = int(round(0.7 * len(members)))
        for rank, i in enumerate(order):
            photo = members[i]
            split = "train" if rank < cut else "val"
            target = root / split / label / f"{photo.name}{Path(photo.path).suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(photo.load())
    return root


def build_data(root: Path, wanted: set[str]) -> None:
    """Everything the rows in `wanted` need, built once into `root` (kept between runs)."""
    root.mkdir(parents=True, exist_ok=True)
    native = root / "cifar-airplane-bird-32px"
    photos = root / "cifar-airplane-bird-photos"
    if wanted & {"cifar32", "photos", "hf"} and not native.is_dir():
        offline.build_cifar_subset(root, CLASSES, 150, 50)
    if wanted & {"photos", "hf"} and not photos.is_dir():
        offline.build_mixed_photos(native, root)
    if "hf" in wanted and not (root / f"hf-{photos.name}").is_dir():
        offline.build_hf_dataset(photos, root)
    if "grey-csv" in wanted and not (root / "fashion-mnist-csv").is_dir():
        offline.build_grey_csv(root, 100, raw=offline.fashion_mnist_raw())
    if "real" in wanted and not (root / "gcompris-animals-monuments").is_dir():
        if build_real_photos(root) is None:
            print("real: no gcompris-qt-data .deb found (apt-get download gcompris-qt-data into "
                  f"{offline.DEFAULT_DEBS}); the row is left out", file=sys.stderr)


# -------------------------------------------------------------------------------------- runs


@dataclass
class Row:
    dataset: str
    kind: str  # "zero flags" or "hand-tuned"
    command: str
    seconds: float
    load: float
    metrics: dict
    config: dict

    def cells(self) -> list[str]:
        m, project = self.metrics, self.config.get("classifier", {})
        training = project.get("training", {})
        shown = f"{m['split']} (n={m['num_samples']:,})"
        accuracy = describe_accuracy(m["accuracy"], m.get("accuracy_ci95"), m["num_samples"]).split(" (")[0]
        low, high = m.get("accuracy_ci95", (0, 1))
        finder = project.get("lr_finder")
        lr = f"{m.get('lr', training.get('lr')):.3g}" + (" (finder)" if finder else "")
        size = self.config["pretrained_cfg"]["input_size"][-1]
        n_train = project.get("num_train", 0)
        per_second = n_train * m.get("epochs_trained", 0) / max(m.get("train_seconds", 0), 1e-9)
        return [self.dataset, self.kind, self.config["architecture"], shown, accuracy, f"{low:.1%}-{high:.1%}",
                lr, f"{size} px", str(m.get("epochs_trained")), f"{self.seconds:.0f}", f"{per_second:.0f}",
                f"{self.load:.1f}"]


HEADER = ["data", "command", "model", "split (n)", "accuracy", "95% interval", "lr", "input", "epochs", "seconds",
          "train img/s", "load"]


def run_command(dataset: Dataset, kind: str, data_root: Path, runs: Path, extra: list[str]) -> Row | None:
    out = runs / f"{dataset.name}-{'zero' if kind == 'zero flags' else 'hand'}"
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, str(FINETUNE), "--data", str(data_root / dataset.data), "--out", str(out), *extra]
    shown = " ".join(["python training/finetune.py", "--data", dataset.data, "--out", "OUT", *extra])
    load = os.getloadavg()[0]
    started = time.perf_counter()
    print(f"\n[{dataset.name}, {kind}] {shown}  (load average {load:.1f})", flush=True)
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - started
    summary = [line for line in done.stdout.splitlines() if "accuracy" in line or line.startswith("chose ")]
    print("\n".join(f"    {line}" for line in summary), flush=True)
    if done.returncode != 0:
        print(f"    failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    bundle = out / "bundle"
    metrics = json.loads((bundle / "eval" / "metrics.json").read_text())
    config = json.loads((bundle / "config.json").read_text())
    return Row(dataset.name, kind, shown, seconds, load, metrics, config)


def markdown(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def verdicts(rows: list[Row]) -> list[str]:
    """Zero flags against hand-tuned, per dataset: the gap in points on the same split."""
    out = []
    for name in dict.fromkeys(r.dataset for r in rows):
        zero = next((r for r in rows if r.dataset == name and r.kind == "zero flags"), None)
        hand = next((r for r in rows if r.dataset == name and r.kind == "hand-tuned"), None)
        if zero and hand and zero.metrics["split"] == hand.metrics["split"]:
            gap = 100 * (hand.metrics["accuracy"] - zero.metrics["accuracy"])
            verdict = "within 1 point" if gap <= 1 else "MORE than 1 point behind"
            out.append(f"- {name}: zero flags {zero.metrics['accuracy']:.1%}, hand-tuned {hand.metrics['accuracy']:.1%} "
                       f"on the same {zero.metrics['split']} split: {verdict} ({gap:+.1f} points for hand-tuning)")
    return out


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
            f"load average at the start {os.getloadavg()[0]:.1f}")


# ----------------------------------------------------------------------------- the LR study

LR_GRID = (0.005, 0.01, 0.02, 0.04, 0.08)
# What each dataset is trained with in the study: the zero-flag run's own choices on a quiet 2-core CPU.
LR_STUDY = {"photos": ["--image-size", "128", "--epochs", "8", "--batch-size", "32"],
            "cifar32": ["--image-size", "96", "--epochs", "10", "--batch-size", "32"],
            "grey-csv": ["--image-size", "64", "--epochs", "8", "--batch-size", "32"]}


def lr_study(data_root: Path, runs: Path, only: list[str]) -> str:
    """Per dataset: the range test's suggestion (--lr auto), and the accuracy at it and at a grid of
    fixed rates around the default, with the same settings otherwise."""
    lines = []
    for name in only:
        if name not in LR_STUDY:
            continue
        dataset = DATASETS[name]
        results = []
        for lr in ("auto", *LR_GRID):
            row = run_command(Dataset(f"{name}-lr{lr}", "", dataset.data), "hand-tuned", data_root, runs,
                              ["--model", "tf_efficientnet_lite0", *LR_STUDY[name], "--lr", str(lr)])
            if row:
                results.append((lr, row))
        if not results:
            continue
        best = max(results, key=lambda r: r[1].metrics["accuracy"])
        auto = next((r for lr, r in results if lr == "auto"), None)
        finder = auto.config["classifier"].get("lr_finder", {}) if auto else {}
        cells = [[str(lr), f"{r.metrics.get('lr'):.3g}", f"{r.metrics['split']} (n={r.metrics['num_samples']})",
                  describe_accuracy(r.metrics["accuracy"], r.metrics.get("accuracy_ci95"), r.metrics["num_samples"]),
                  f"{r.metrics['loss']:.3f}", f"{r.seconds:.0f}"] for lr, r in results]
        lines += [f"### {name}: {dataset.what}", "", f"`{' '.join(LR_STUDY[name])}`; the range test: "
                  f"{finder.get('note', 'did not run')}", "",
                  markdown(cells, ["--lr", "rate used", "split (n)", "accuracy", "loss", "seconds"]), "",
                  f"best of the grid: --lr {best[0]} ({best[1].metrics['accuracy']:.1%})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="photos,cifar32,grey-csv,real",
                        help=f"comma-separated rows of {', '.join(DATASETS)}")
    parser.add_argument("--data-root", type=Path, default=Path("/tmp/own-photos-data"),
                        help="where the data is built (kept, so that a second run starts at once)")
    parser.add_argument("--runs", type=Path, default=Path("/tmp/own-photos-runs"))
    parser.add_argument("--zero-only", action="store_true", help="leave out the hand-tuned commands")
    parser.add_argument("--lr-study", action="store_true", help="the learning-rate study instead of the table")
    parser.add_argument("--results", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in DATASETS]
    if unknown:
        parser.error(f"unknown row(s) {unknown}; choose from {', '.join(DATASETS)}")
    os.environ.setdefault("CLASSIFIER_CACHE", str(args.data_root / ".cache"))
    os.environ.setdefault("HF_HOME", str(args.data_root / ".hf-home"))
    build_data(args.data_root, set(only))
    header = f"Measured on {machine()}, {time.strftime('%Y-%m-%d %H:%M')}.\n"
    if args.lr_study:
        report = header + "\n" + lr_study(args.data_root, args.runs, only)
    else:
        rows = []
        for name in only:
            dataset = DATASETS[name]
            if not (args.data_root / dataset.data).exists():
                continue
            rows.append(run_command(dataset, "zero flags", args.data_root, args.runs, []))
            if dataset.hand and not args.zero_only:
                rows.append(run_command(dataset, "hand-tuned", args.data_root, args.runs, dataset.hand))
        rows = [r for r in rows if r]
        commands = "\n".join(f"- {r.dataset}, {r.kind}: `{r.command}`" for r in rows)
        found = "\n".join(f"- {d.name}: the best of {d.found}" for d in map(DATASETS.get, only) if d.hand)
        report = "\n\n".join([header, markdown([r.cells() for r in rows], HEADER), "\n".join(verdicts(rows)),
                              "Commands:\n\n" + commands, "Hand-tuned flags, each:\n\n" + found])
    print("\n" + report)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(f"# `python benchmarks/own_photos.py {' '.join(argv or sys.argv[1:])}`\n\n{report}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
