#!/usr/bin/env python
"""Out-of-distribution scores for a bundle: how well can the app tell "none of my classes"?

    CLASSIFIER_CACHE=/tmp/research-cache OMP_NUM_THREADS=2 \
        python benchmarks/ood_scores.py                       # the shipped lite0, ~4 min on 2 cores
    python benchmarks/ood_scores.py --bundle assets/models/cifar10-cnn --n-test 1000 --n-val 1000

Every image goes through the bundle's Predictor as the app sends it (open_image, the bundle's
transform: shrink to the 32 px source size, resize to 160 px; its test-time augmentation, mirror
averaging for lite0). From each image's TTA-averaged logits and penultimate features (the pooled
1280-d vector: model.forward_head(model.forward_features(x), pre_logits=True), averaged over the
same views; the logits are that average through the classifier, checked equal to tta_logits), six
scores, higher meaning "more like the training data":

- msp: the largest calibrated probability, softmax(logits / T), T from the bundle (what the app shows);
- msp_raw: the same at T = 1;
- max_logit: the largest logit;
- energy: logsumexp(logits) (the negative free energy, T = 1);
- neg_feature_norm: minus the length of the penultimate feature vector. The literature's direction
  (a longer vector = more familiar) is the wrong one for this model: out-of-domain images give it
  *longer* features (AUROC 0-15% that way round), so the sign is flipped; check it per bundle;
- cosine: the largest cosine similarity between the features and the ten class means (computed on
  --n-means CIFAR-10 train images; the one score that needs a stored 10 x 1280 matrix).

In-domain sets: CIFAR-10 val (the bundle's own validation split, held out of its training: the
thresholds are fitted here), CIFAR-10 test (the thresholds are checked here), assets/examples/*.jpg,
and real photographs of the ten classes found offline (benchmarks/offline_datasets.py). Out of domain:
Fashion-MNIST, scikit-learn's 8x8 digits, real photographs of other animals ("near") and of anything
else ("far"), rendered text screenshots and matplotlib plots, and synthetic uniform colours, noise,
gradients and patterns. Sets whose source is missing are left out and named.

Metrics per score: AUROC (CIFAR test against each set), FPR at 95% TPR (the share of a set that
passes the threshold that keeps 95% of CIFAR test), the thresholds that keep 95% and 99% of CIFAR
*val*, what they keep of CIFAR test and flag of each set, and the per-image latency of the scores.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import offline_datasets as od  # noqa: E402
from classifier.predict import Predictor  # noqa: E402
from classifier.tta import tta_logits  # noqa: E402

SCORES = ["msp", "msp_raw", "max_logit", "energy", "neg_feature_norm", "cosine"]
DEFAULT_BUNDLE = ROOT / "assets" / "models" / "cifar10-efficientnet-lite0"


# ------------------------------------------------------------------------------------ model side

def views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The batches tta_logits averages, in its weights: none -> [x]; flip -> [x, mirror]."""
    if mode == "none":
        return [x]
    if mode == "flip":
        return [x, x.flip(-1)]
    raise ValueError(f"TTA mode {mode!r}: this benchmark handles none and flip")


@torch.inference_mode()
def logits_and_features(predictor: Predictor, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TTA-averaged (logits, penultimate features) of a preprocessed batch. The head after pooling is
    linear, so the classifier of the averaged features is the average of the views' logits."""
    model = predictor.model
    batch = batch.to(predictor.device)
    if predictor.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    feats = torch.stack([model.forward_head(model.forward_features(v), pre_logits=True)
                         for v in views(batch, predictor.tta)]).mean(0)
    return model.get_classifier()(feats).float(), feats.float()


def scores_from(logits: torch.Tensor, feats: torch.Tensor, temperature: float,
                class_means: torch.Tensor | None) -> dict[str, np.ndarray]:
    out = {
        "msp": (logits / temperature).softmax(-1).amax(-1),
        "msp_raw": logits.softmax(-1).amax(-1),
        "max_logit": logits.amax(-1),
        "energy": torch.logsumexp(logits, -1),
        "neg_feature_norm": -feats.norm(dim=-1),
    }
    if class_means is not None:
        out["cosine"] = (torch.nn.functional.normalize(feats, dim=-1) @ class_means.T).amax(-1)
    return {k: v.cpu().numpy().astype(np.float64) for k, v in out.items()}


def run_set(predictor: Predictor, images: list, batch_size: int) -> dict[str, np.ndarray]:
    """logits, features and top class of each image (any ImageSource), in batches."""
    logits, feats = [], []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([predictor.preprocess(im) for im in images[start:start + batch_size]])
        lg, ft = logits_and_features(predictor, batch)
        logits.append(lg)
        feats.append(ft)
    return {"logits": torch.cat(logits), "features": torch.cat(feats)}


# --------------------------------------------------------------------------------------- metrics

def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of an in-domain image > score of an OOD one), ties counted half (Mann-Whitney U)."""
    both = np.concatenate([pos, neg])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(len(both))
    ranks[order] = np.arange(1, len(both) + 1)
    # average the ranks of ties
    sorted_vals = both[order]
    i = 0
    while i < len(both):
        j = i
        while j + 1 < len(both) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        if j > i:
            ranks[order[i:j + 1]] = (i + j + 2) / 2
        i = j + 1
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def keep_threshold(scores: np.ndarray, keep: float) -> float:
    """The score at or above which `keep` of `scores` lie (lower-tail quantile)."""
    return float(np.quantile(scores, 1 - keep, method="lower"))


# ------------------------------------------------------------------------------------- the sets

def font(size: int) -> ImageFont.FreeTypeFont:
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return ImageFont.truetype(str(path), size) if path.exists() else ImageFont.load_default()


WORDS = ("the model data train image class error file open save python run test value loss accuracy "
         "epoch batch return import def self print config path folder upload result label score "
         "settings window help view edit tools report table total invoice date name address").split()


def text_screenshots(n: int, rng: np.random.Generator) -> list[Image.Image]:
    """Screenshot-like images: lines of words in DejaVu Sans, light or dark theme, some with a title bar."""
    images = []
    for i in range(n):
        w, h = int(rng.integers(320, 900)), int(rng.integers(240, 700))
        dark = i % 4 == 3
        bg = tuple(int(v) for v in (rng.integers(20, 50, 3) if dark else rng.integers(225, 256, 3)))
        fg = tuple(int(v) for v in (rng.integers(180, 256, 3) if dark else rng.integers(0, 70, 3)))
        image = Image.new("RGB", (w, h), bg)
        draw = ImageDraw.Draw(image)
        y = 6
        if i % 3 == 0:  # a window title bar
            draw.rectangle([0, 0, w, 28], fill=tuple(int(v) for v in rng.integers(60, 200, 3)))
            y = 36
        size = int(rng.integers(11, 30))
        f = font(size)
        while y < h - size:
            line = " ".join(rng.choice(WORDS, int(rng.integers(2, 12))))
            draw.text((int(rng.integers(4, 40)), y), line, fill=fg, font=f)
            y += int(size * rng.uniform(1.2, 1.8))
        images.append(image)
    return images


def plots(n: int, rng: np.random.Generator) -> list[Image.Image]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = []
    for i in range(n):
        fig, ax = plt.subplots(figsize=(rng.uniform(3, 7), rng.uniform(2.5, 5)), dpi=80)
        kind = i % 4
        x = np.linspace(0, 10, 200)
        if kind == 0:
            for _ in range(int(rng.integers(1, 4))):
                ax.plot(x, np.cumsum(rng.normal(size=200)))
        elif kind == 1:
            ax.scatter(rng.normal(size=150), rng.normal(size=150), s=8, c=rng.uniform(size=150))
        elif kind == 2:
            ax.bar(range(8), rng.uniform(1, 10, 8))
        else:
            ax.hist(rng.normal(size=500), bins=30)
        ax.set_title(" ".join(rng.choice(WORDS, 3)))
        ax.set_xlabel("x")
        ax.grid(i % 2 == 0)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        images.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return images


def synthetic(kind: str, n: int, rng: np.random.Generator, size: int = 256) -> list[np.ndarray]:
    out = []
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    for i in range(n):
        c1, c2 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if kind == "uniform":
            img = np.broadcast_to(c1, (size, size, 3))
        elif kind == "noise":  # half iid Gaussian pixels, half smooth (upsampled) noise
            if i % 2 == 0:
                img = rng.normal(128, rng.uniform(20, 80), (size, size, 3))
            else:
                low = rng.normal(128, 60, (int(rng.integers(2, 12)),) * 2 + (3,)).clip(0, 255).astype(np.uint8)
                img = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC))
        elif kind == "gradient":
            if i % 3 == 2:  # radial
                t = np.sqrt((xx - rng.uniform()) ** 2 + (yy - rng.uniform()) ** 2)
                t = t / t.max()
            else:
                a = rng.uniform(0, 2 * math.pi)
                t = xx * math.cos(a) + yy * math.sin(a)
                t = (t - t.min()) / (t.max() - t.min())
            img = c1 * (1 - t[..., None]) + c2 * t[..., None]
        elif kind == "pattern":  # checkerboards and stripes of random period and colours
            period = int(rng.integers(4, 64))
            if i % 2 == 0:
                mask = ((np.arange(size)[:, None] // period + np.arange(size)[None] // period) % 2).astype(bool)
            else:
                a = rng.uniform(0, math.pi)
                mask = (((xx * math.cos(a) + yy * math.sin(a)) * size / period) % 2) < 1
            img = np.where(mask[..., None], c1, c2)
        else:
            raise ValueError(kind)
        out.append(np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8)))
    return out


def sklearn_digits(n: int, rng: np.random.Generator, wheels: Path) -> list[np.ndarray]:
    reader = od.package_file("scikit-learn", "sklearn/datasets/data/digits.csv.gz", wheels)
    if reader is None:
        return []
    rows = np.loadtxt(io.BytesIO(gzip.decompress(reader())), delimiter=",")
    pick = rng.choice(len(rows), n, replace=False)
    # 0..16 ink levels, ink light on dark as in MNIST
    return [(rows[i, :64].reshape(8, 8) * (255 / 16)).astype(np.uint8) for i in sorted(pick)]


def build_sets(args, rng: np.random.Generator) -> tuple[dict[str, list], dict[str, list], list[str], dict]:
    """(in-domain sets, out-of-domain sets, notes on what is missing, photo records by set)."""
    files = od.cifar_files(args.cifar)
    from classifier.data import load_data

    data = load_data("cifar10", data_dir=args.cifar, download=False)  # the bundle's own val split (seed 0)
    val_pairs = sorted((str(p), data.classes[int(t)]) for p, t in zip(data.val.items, data.val.targets))
    val_set = set(p for p, _ in val_pairs)
    train_pairs = [p for p in files["train"] if p[0] not in val_set]
    per = lambda n: max(1, n // 10)  # noqa: E731
    ind = {
        "cifar-means": od.pick_per_class(train_pairs, od.CIFAR_CLASSES, per(args.n_means), rng),
        "cifar-val": od.pick_per_class(val_pairs, od.CIFAR_CLASSES, per(args.n_val), rng),
        "cifar-test": od.pick_per_class(files["test"], od.CIFAR_CLASSES, per(args.n_test), rng),
        "examples": [(str(p), p.stem) for p in sorted((ROOT / "assets" / "examples").glob("*.jpg"))],
    }
    photos = od.offline_photos(args.wheels, args.debs, args.gcompris)
    records = {"photos-cifar": [p for p in photos if p.relation == "cifar"],
               "photos-near": [p for p in photos if p.relation == "near"],
               "photos-far": [p for p in photos if p.relation == "far"]}
    ind["photos-cifar"] = [(p.load(), p.label) for p in records["photos-cifar"]]
    notes = []
    ood: dict[str, list] = {}
    raw = od.fashion_mnist_raw(args.fashion, args.debs)
    if raw is None:
        notes.append("Fashion-MNIST: not found (apt-get install dataset-fashion-mnist)")
    else:
        images = od.read_idx(raw["t10k-images-idx3-ubyte"])
        ood["fashion-mnist"] = [images[i] for i in sorted(rng.choice(len(images), args.n_fashion, replace=False))]
    digits = sklearn_digits(args.n_synthetic * 2, rng, args.wheels)
    if digits:
        ood["digits-8px"] = digits
    else:
        notes.append("scikit-learn digits: no scikit-learn installed nor its wheel in --wheels")
    for name in ("photos-near", "photos-far"):
        if records[name]:
            ood[name] = [p.load() for p in records[name]]
        else:
            notes.append(f"{name}: no photographs found")
    ood["text"] = text_screenshots(args.n_synthetic, rng)
    ood["plots"] = plots(max(20, args.n_synthetic // 2), rng)
    for kind in ("uniform", "noise", "gradient", "pattern"):
        ood[kind] = synthetic(kind, args.n_synthetic, rng)
    return ind, ood, notes, records


# ------------------------------------------------------------------------------------------ main

def fmt(x: float, pct: bool = True) -> str:
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def latency(predictor: Predictor, image_path: Path, class_means, repeats: int = 30) -> dict[str, float]:
    """Per-image milliseconds: Predictor.probabilities (what the app runs now) against the features
    path plus all six scores, on one preprocessed image; and the scores alone from logits."""
    x = predictor.preprocess(image_path).unsqueeze(0)
    for _ in range(3):
        predictor.probabilities(x)
        logits_and_features(predictor, x)

    def clock(fn) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1000 * float(np.median(times))

    lg, ft = logits_and_features(predictor, x)
    return {
        "probabilities": clock(lambda: predictor.probabilities(x)),
        "features_and_scores": clock(lambda: scores_from(*logits_and_features(predictor, x),
                                                         predictor.temperature, class_means)),
        "scores_only": clock(lambda: scores_from(lg, ft, predictor.temperature, class_means)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--cifar", default=str(od.DEFAULT_CIFAR))
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--n-val", type=int, default=2000)
    parser.add_argument("--n-means", type=int, default=1000)
    parser.add_argument("--n-fashion", type=int, default=1000)
    parser.add_argument("--n-synthetic", type=int, default=100, help="images of each synthetic kind")
    parser.add_argument("--fashion", default=None)
    parser.add_argument("--gcompris", default=None)
    parser.add_argument("--wheels", type=Path, default=od.DEFAULT_WHEELS)
    parser.add_argument("--debs", type=Path, default=od.DEFAULT_DEBS)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ood_scores_cpu",
                        help="writes OUT.md, OUT.json and OUT_photos.csv (per-photo scores)")
    parser.add_argument("--save-scores", action="store_true", help="also OUT_scores.npz: every image's scores")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    predictor = Predictor(args.bundle)
    labels = predictor.labels

    ind, ood, notes, records = build_sets(args, rng)
    # the features path reproduces the Predictor's logits
    check = torch.stack([predictor.preprocess(p) for p, _ in ind["cifar-test"][:8]])
    with torch.inference_mode():
        ref = tta_logits(predictor.model, check.contiguous(memory_format=torch.channels_last)
                         if predictor.channels_last else check, predictor.tta).float()
    assert torch.allclose(logits_and_features(predictor, check)[0], ref, atol=1e-4), "features path != tta_logits"

    outputs = {}
    for name, items in {**ind, **ood}.items():
        t = time.perf_counter()
        images = [item[0] if isinstance(item, tuple) else item for item in items]
        outputs[name] = run_set(predictor, images, args.batch_size)
        print(f"{name}: {len(images)} images, {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)

    means_out = outputs.pop("cifar-means")
    targets = torch.tensor([od.CIFAR_CLASSES.index(c) for _, c in ind["cifar-means"]])
    feats = torch.nn.functional.normalize(means_out["features"], dim=-1)
    class_means = torch.nn.functional.normalize(torch.stack([feats[targets == k].mean(0) for k in range(10)]), dim=-1)
    scores = {name: scores_from(o["logits"], o["features"], predictor.temperature, class_means)
              for name, o in outputs.items()}
    preds = {name: o["logits"].argmax(-1).numpy() for name, o in outputs.items()}

    val, test = scores["cifar-val"], scores["cifar-test"]
    test_true = np.array([od.CIFAR_CLASSES.index(c) for _, c in ind["cifar-test"]])
    test_right = preds["cifar-test"] == test_true
    ood_names = list(ood)
    result: dict = {"bundle": str(args.bundle), "tta": predictor.tta, "temperature": predictor.temperature,
                    "sizes": {k: len(v["logits"]) for k, v in outputs.items()} | {"cifar-means": len(targets)},
                    "test_accuracy": float(test_right.mean()), "notes": notes, "scores": {}}
    for s in SCORES:
        t95, t99 = keep_threshold(val[s], 0.95), keep_threshold(val[s], 0.99)
        t95_test = keep_threshold(test[s], 0.95)
        entry = {"threshold_95": t95, "threshold_99": t99,
                 "test_kept_95": float((test[s] >= t95).mean()), "test_kept_99": float((test[s] >= t99).mean()),
                 "test_acc_kept_95": float(test_right[test[s] >= t95].mean()),
                 "test_errors_flagged_95": float((test[s][~test_right] < t95).mean()),
                 "sets": {}}
        pooled = np.concatenate([scores[n][s] for n in ood_names])
        for name in ood_names + ["examples", "photos-cifar", "pooled"]:
            x = pooled if name == "pooled" else scores[name][s]
            entry["sets"][name] = {"auroc": auroc(test[s], x), "fpr95": float((x >= t95_test).mean()),
                                   "flagged_95": float((x < t95).mean()), "flagged_99": float((x < t99).mean()),
                                   "n": int(len(x))}
        result["scores"][s] = entry
    result["latency_ms"] = latency(predictor, ROOT / "assets" / "examples" / "cat.jpg", class_means)
    result["seconds"] = time.perf_counter() - started

    # per-photo detail: what the model calls each real photograph, and whether it is flagged
    rows = []
    for name in ("examples", "photos-cifar", "photos-near", "photos-far"):
        if name not in scores:
            continue
        recs = ([(Path(p).name, "cifar", c, "assets/examples") for p, c in ind["examples"]] if name == "examples"
                else [(r.name, r.relation, r.label, r.what) for r in records[name]])
        probs = (outputs[name]["logits"] / predictor.temperature).softmax(-1)
        for i, (photo, relation, label, what) in enumerate(recs):
            top = int(probs[i].argmax())
            rows.append({"set": name, "photo": photo, "relation": relation, "label": label, "what": what,
                         "predicted": labels[top], "probability": round(float(probs[i, top]), 4),
                         **{s: round(float(scores[name][s][i]), 4) for s in SCORES},
                         "flagged_msp_95": bool(scores[name]["msp"][i] < result["scores"]["msp"]["threshold_95"]),
                         "flagged_energy_95": bool(scores[name]["energy"][i] < result["scores"]["energy"]["threshold_95"])})

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    with open(args.out.with_name(args.out.name + "_photos.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if args.save_scores:
        np.savez_compressed(args.out.with_name(args.out.name + "_scores.npz"),
                            **{f"{name}/{s}": v for name, sc in scores.items() for s, v in sc.items()})
    report = markdown(result, ood_names, " ".join([Path(sys.executable).name] + sys.argv))
    args.out.with_suffix(".md").write_text(report)
    print(report)
    return 0


def markdown(result: dict, ood_names: list[str], command: str) -> str:
    sizes = result["sizes"]
    lines = [f"# OOD scores: {Path(result['bundle']).name} (TTA {result['tta']}, T = {result['temperature']:.3f})", "",
             f"`{command}` — {result['seconds']:.0f} s; CIFAR-10 test accuracy on this subset "
             f"{100 * result['test_accuracy']:.2f}%.", "",
             "Sets (images): " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + ".", ""]
    if result["notes"]:
        lines += ["Left out: " + "; ".join(result["notes"]), ""]
    lines += ["## AUROC (%) against CIFAR-10 test", "",
              "| set | n | " + " | ".join(SCORES) + " |", "|---|---|" + "---|" * len(SCORES)]
    for name in ood_names + ["pooled", "photos-cifar", "examples"]:
        n = result["scores"]["msp"]["sets"][name]["n"]
        lines.append(f"| {name} | {n} | " + " | ".join(fmt(result["scores"][s]["sets"][name]["auroc"])
                                                      for s in SCORES) + " |")
    lines += ["", "## FPR at 95% TPR (%): share of the set that passes the threshold keeping 95% of CIFAR-10 test", "",
              "| set | " + " | ".join(SCORES) + " |", "|---|" + "---|" * len(SCORES)]
    for name in ood_names + ["pooled"]:
        lines.append(f"| {name} | " + " | ".join(fmt(result["scores"][s]["sets"][name]["fpr95"]) for s in SCORES) + " |")
    for keep in ("95", "99"):
        lines += ["", f"## Threshold keeping {keep}% of CIFAR-10 *val*: the share (%) of each set flagged", "",
                  "| | " + " | ".join(SCORES) + " |", "|---|" + "---|" * len(SCORES),
                  "| threshold | " + " | ".join(fmt(result["scores"][s][f"threshold_{keep}"], False) for s in SCORES) + " |",
                  "| CIFAR-10 test kept | " + " | ".join(fmt(result["scores"][s][f"test_kept_{keep}"]) for s in SCORES) + " |"]
        for name in ood_names + ["pooled", "photos-cifar", "examples"]:
            lines.append(f"| {name} flagged | " + " | ".join(fmt(result["scores"][s]["sets"][name][f"flagged_{keep}"])
                                                           for s in SCORES) + " |")
    lines += ["", "## At the 95% threshold: the test images kept, and the test mistakes caught", "",
              "| | " + " | ".join(SCORES) + " |", "|---|" + "---|" * len(SCORES),
              "| accuracy on kept test images | " + " | ".join(fmt(result["scores"][s]["test_acc_kept_95"]) for s in SCORES) + " |",
              "| test mistakes flagged | " + " | ".join(fmt(result["scores"][s]["test_errors_flagged_95"]) for s in SCORES) + " |",
              "", "## Latency per image (ms, median of 30, one image)", "",
              "| Predictor.probabilities (now) | features path + all six scores | six scores from logits alone |",
              "|---|---|---|",
              "| {probabilities:.1f} | {features_and_scores:.1f} | {scores_only:.3f} |".format(**result["latency_ms"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
