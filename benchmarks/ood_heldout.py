#!/usr/bin/env python
"""The "none of the model's classes" flag on CIFAR-10 classes held out of teaching: near out-of-distribution.

    python benchmarks/ood_heldout.py --cifar ../shared/data/cifar10-jpeg.tar.gz          # 3 splits, ~6 min, 2-core CPU
    python benchmarks/ood_heldout.py --cifar PATH --splits cat+dog --per-class 30         # one quick split
    python benchmarks/ood_heldout.py --cifar PATH --results benchmarks/results/ood_heldout_cpu.md

docs/ood_study.md and docs/app.md measured the flag (classifier.ood: energy of the calibrated logits
below the bundle's threshold, fitted to pass 95% of never-trained-on images) on junk: noise, gradients,
text, Fashion-MNIST. This measures the hard case: photos of things that look like the model's classes
but are none of them. For each split (two CIFAR-10 classes held out, by default {cat, dog},
{airplane, ship} and {automobile, truck}), a model is taught as the app's Train tab does
(classifier.teach.teach: frozen ImageNet tf_efficientnet_lite0, logistic-regression head,
cross-validated, OOD threshold fitted on the out-of-fold logits) on the other 8 classes from
--per-class CIFAR-10 *train* images each (default 100: 800 images, within the tab's limits). Then the
written bundle, through the Predictor as the app serves it (predict_scored's preprocess and
scored_probabilities, batched; out_of_domain), is run on
CIFAR-10 *test* images that teaching never saw:

- in domain: --in-domain images (default 200) of the 8 taught classes, spread evenly: top-1 accuracy,
  the share flagged (false positives) and the share the "Not sure" headline catches (top probability
  below classifier.app_logic.UNSURE_BELOW);
- held out: --held-out images (default 200) of each held-out class: the share flagged (true positives),
  the share "Not sure" catches (the baseline), and the share that gets either message (the headline
  shows one or the other, so this is what a person sees as "not an answer");
- AUROC of each score (energy; top probability) separating the held-out from the in-domain images.

Every share has its 95% Wilson interval (classifier.intervals.wilson_interval). Images are upscaled
from 32 px to --size px square (default 224, the backbone's input size; bicubic) and saved as JPEG
quality 90: the Train tab refuses images under 64 px, and benchmarks/teach.py's 1600x1200 (decode cost
of a real photo) is not needed here, where speed is not the question. Seconds: teaching (from files to
written bundle, fresh embedding cache) and measuring (the Predictor, batches of 32).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ood_scores import auroc  # noqa: E402  (the Mann-Whitney AUROC the OOD study used)
from classifier.app_logic import UNSURE_BELOW  # noqa: E402
from classifier.data import _unpack_archive  # noqa: E402
from classifier.intervals import wilson_interval  # noqa: E402
from classifier.predict import Predictor  # noqa: E402
from classifier.ood import SYNTHETIC_KINDS  # noqa: E402
from classifier.teach import OOD_PER_KIND, Embedder, teach  # noqa: E402
from classifier.teach_set import LIMITS, Limits  # noqa: E402

CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"  # from a worktree elsewhere: --cifar PATH
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLITS = "cat+dog,airplane+ship,automobile+truck"
PER_CLASS = 100
IN_DOMAIN = 200
HELD_OUT = 200
SIZE = 224


def build(source: Path, out: Path, count: int, size: int) -> list[str]:
    """The first `count` images of `source` (sorted), upscaled to size x size JPEG."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in sorted(source.iterdir())[:count]:
        target = out / f"{f.stem}.jpg"
        Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC).save(target, quality=90)
        paths.append(str(target))
    return paths


def share(hits: int, total: int) -> str:
    low, high = wilson_interval(hits, total)
    return f"{hits / total:.1%} ({low:.0%}-{high:.0%})"


def measure(predictor: Predictor, paths: list[str], truth: list[str | None], batch: int = 32) -> dict:
    """Each image as predict_scored sees it (its preprocess, scored_probabilities: the same forward pass
    and energy), in batches of `batch` for speed: flagged, "Not sure", right (for in-domain truth), scores."""
    flagged, unsure, right, energy, top = [], [], [], [], []
    for start in range(0, len(paths), batch):
        chunk = paths[start:start + batch]
        probs, scores = predictor.scored_probabilities(predictor.stack([predictor.preprocess(p) for p in chunk]))
        for row, score, label in zip(probs, scores, truth[start:start + batch]):
            first, p = next(iter(predictor.top_classes(row, 1).items()))
            flagged.append(predictor.out_of_domain(float(score)))
            unsure.append(p < UNSURE_BELOW)
            right.append(first == label)
            energy.append(float(score))
            top.append(p)
    return {k: np.array(v) for k, v in dict(flagged=flagged, unsure=unsure, right=right, energy=energy,
                                            top=top).items()}


def run_split(cifar: Path, held: list[str], args, work: Path) -> dict:
    taught_classes = [c for c in CLASSES if c not in held]
    images = {c: build(cifar / "train" / c, work / "teach" / c, args.per_class, args.size)
              for c in taught_classes}
    per_in = [args.in_domain // len(taught_classes) + (i < args.in_domain % len(taught_classes))
              for i in range(len(taught_classes))]
    in_paths, in_truth = [], []
    for c, n in zip(taught_classes, per_in):
        in_paths += build(cifar / "test" / c, work / "in" / c, n, args.size)
        in_truth += [c] * n
    out_paths = {c: build(cifar / "test" / c, work / "held" / c, args.held_out, args.size) for c in held}

    limits = Limits(max_images=max(LIMITS.max_images, args.per_class * len(taught_classes)),
                    max_images_per_class=max(LIMITS.max_images_per_class, args.per_class))
    embedder = Embedder()  # a fresh cache: every image decoded and embedded
    taught = teach(images, work / "bundle", embedder, limits=limits)
    started = time.perf_counter()
    predictor = Predictor(work / "bundle")
    ind = measure(predictor, in_paths, in_truth)
    ood = {c: measure(predictor, p, [None] * len(p)) for c, p in out_paths.items()}
    measure_s = time.perf_counter() - started
    pooled = {k: np.concatenate([o[k] for o in ood.values()]) for k in ind}
    record = taught.metrics.get("ood", {})
    return {"held": held, "ind": ind, "ood": ood, "pooled": pooled, "teach_s": taught.seconds,
            "measure_s": measure_s, "cv_accuracy": taught.metrics["accuracy"],
            "num_taught": taught.metrics["num_samples"], "threshold": predictor.ood_threshold,
            "synthetic": (record.get("out_of_domain") or {}).get("pooled", {}).get("flagged")}


def rows_for(r: dict) -> tuple[list[str], list[list[str]]]:
    ind, pooled = r["ind"], r["pooled"]
    n_in, n_out = len(ind["right"]), len(pooled["flagged"])
    main = [" + ".join(r["held"]),
            f"{r['cv_accuracy']:.1%} (n={r['num_taught']})",
            f"{share(int(ind['right'].sum()), n_in)}",
            f"{share(int(ind['flagged'].sum()), n_in)}",
            f"{share(int(ind['unsure'].sum()), n_in)}",
            f"{share(int(pooled['flagged'].sum()), n_out)}",
            f"{share(int(pooled['unsure'].sum()), n_out)}",
            f"{share(int((pooled['flagged'] | pooled['unsure']).sum()), n_out)}",
            f"{auroc(-pooled['energy'], -ind['energy']):.3f} / {auroc(-pooled['top'], -ind['top']):.3f}",
            f"{r['threshold']:.3f}",
            "-" if r["synthetic"] is None else f"{r['synthetic']:.0%}",
            f"{r['teach_s']:.0f} + {r['measure_s']:.0f}"]
    per_class = []
    for c, o in r["ood"].items():
        n = len(o["flagged"])
        per_class.append([c, " + ".join(r["held"]), share(int(o["flagged"].sum()), n), share(int(o["unsure"].sum()), n),
                          share(int((o["flagged"] | o["unsure"]).sum()), n),
                          f"{auroc(-o['energy'], -ind['energy']):.3f} / {auroc(-o['top'], -ind['top']):.3f}"])
    return main, per_class


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", default=str(CIFAR), help="the CIFAR-10 JPEG tarball (or its unpacked folder)")
    parser.add_argument("--splits", default=SPLITS, help="comma-separated held-out sets, classes joined by +")
    parser.add_argument("--per-class", type=int, default=PER_CLASS, help="training images taught per class")
    parser.add_argument("--in-domain", type=int, default=IN_DOMAIN, help="in-domain test images, spread evenly")
    parser.add_argument("--held-out", type=int, default=HELD_OUT, help="test images of each held-out class")
    parser.add_argument("--size", type=int, default=SIZE, help="upscale the 32 px images to this square size")
    parser.add_argument("--results", type=Path, default=None, help="write the tables here (markdown)")
    args = parser.parse_args()
    splits = [s.split("+") for s in args.splits.split(",") if s.strip()]
    for held in splits:
        unknown = [c for c in held if c not in CLASSES]
        if unknown:
            parser.error(f"unknown class {unknown[0]!r}: one of {', '.join(CLASSES)}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1)

    cifar = _unpack_archive(Path(args.cifar)) if str(args.cifar).endswith(".tar.gz") else Path(args.cifar)
    work = Path(tempfile.mkdtemp(prefix="ood-heldout-"))
    header = ["held out", "cross-validated accuracy (8 classes)", "in-domain top-1", "in-domain flagged (false positives)",
              "in-domain \"Not sure\"", "held-out flagged (true positives)", "held-out \"Not sure\" (baseline)",
              "held-out flagged or \"Not sure\"", "AUROC energy / top probability", "threshold (energy)",
              f"synthetic junk flagged (n={len(SYNTHETIC_KINDS) * OOD_PER_KIND})", "seconds: teach + measure"]
    class_header = ["held-out class", "split", "flagged", "\"Not sure\"", "either", "AUROC energy / top probability"]
    results, rows, class_rows = [], [], []
    started = time.perf_counter()
    try:
        for held in splits:
            folder = work / "+".join(held)
            r = run_split(cifar, held, args, folder)
            results.append(r)
            main_row, per_class = rows_for(r)
            rows.append(main_row)
            class_rows += per_class
            print(" | ".join(main_row), flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if len(results) > 1:  # all splits together: counts summed
        ind = {k: np.concatenate([r["ind"][k] for r in results]) for k in results[0]["ind"]}
        pooled = {k: np.concatenate([r["pooled"][k] for r in results]) for k in results[0]["pooled"]}
        n_in, n_out = len(ind["right"]), len(pooled["flagged"])
        rows.append(["**all splits**", "-", share(int(ind["right"].sum()), n_in), share(int(ind["flagged"].sum()), n_in),
                     share(int(ind["unsure"].sum()), n_in), share(int(pooled["flagged"].sum()), n_out),
                     share(int(pooled["unsure"].sum()), n_out),
                     share(int((pooled["flagged"] | pooled["unsure"]).sum()), n_out), "-", "-", "-",
                     f"{sum(r['teach_s'] + r['measure_s'] for r in results):.0f}"])
    total_s = time.perf_counter() - started

    def table(head, body):
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in body]

    n_in = len(results[0]["ind"]["right"]) if results else 0
    text = "\n".join([
        "# The \"none of the model's classes\" flag on CIFAR-10 classes held out of teaching (near OOD)", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared CPU, no GPU), torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f} at the end. "
        f"Date: {datetime.date.today().isoformat()}. Total {total_s:.0f} s.",
        f"Command: `{' '.join(['python'] + [Path(sys.argv[0]).as_posix()] + sys.argv[1:])}`.", "",
        f"Per split: classifier.teach.teach (the Train tab: frozen tf_efficientnet_lite0, logistic-regression head, "
        f"OOD threshold fitted on the out-of-fold logits) on the other 8 classes, {args.per_class} CIFAR-10 train "
        f"images each; then the written bundle through the Predictor (predict_scored's preprocess and scores, batched by 32; out_of_domain) on CIFAR-10 test "
        f"images never taught: {n_in} of the 8 taught classes (spread evenly) and {args.held_out} of each held-out "
        f"class. Images upscaled from 32 px to {args.size}x{args.size} (bicubic, JPEG quality 90). \"Not sure\": "
        f"top probability below UNSURE_BELOW = {UNSURE_BELOW} (the app's headline shows the flag first, else "
        f"\"Not sure\"). Shares with their 95% Wilson intervals. AUROC: held-out against in-domain test images, "
        f"low score = out of distribution. Synthetic junk: teach's own {len(SYNTHETIC_KINDS) * OOD_PER_KIND} images "
        f"(classifier.ood kinds, {OOD_PER_KIND} each), "
        f"on the model card.", "",
        *table(header, rows), "",
        "## Each held-out class", "",
        *table(class_header, class_rows), ""])
    print("\n" + text)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(text)


if __name__ == "__main__":
    main()
