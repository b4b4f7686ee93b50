#!/usr/bin/env python
"""torch's Predictor beside onnxruntime's OnnxPredictor on one bundle, and what each stack weighs.

    python benchmarks/onnx_vs_torch.py                          # the shipped lite0 bundle
    python benchmarks/onnx_vs_torch.py --stack-sizes            # + install each stack in /tmp (network)

Both serve the same model the same way (classifier.export puts the bundle's test-time augmentation
and temperature in the graph, so each prediction is the same forward passes and softmax). Rows:
- batch 1, predict(image): open the photo, preprocess, forward, calibrated softmax: what the app does
  per upload;
- batch 1, probabilities(tensor): the model alone on one preprocessed image;
- batch 32, probabilities(batch) and predict_batch(images): throughput.
The two runtimes take turns (one timed block of each per repetition, in alternating order), so a
slower spell of a shared machine hits both; each figure is the median over the repetitions of the
block's time per call. Both use --threads threads (torch.set_num_threads, onnxruntime intra-op).

--stack-sizes creates fresh virtual environments under /tmp and installs into each (pip, network):
the inference-only stack (onnxruntime, numpy, pillow) and torch + torchvision from the CPU-only
wheel index; `du -sb` of each, less an empty venv's. The torch installed in this interpreter (its
distribution and everything it requires, e.g. the CUDA libraries of PyPI's default Linux wheel)
is always summed from the installed files' sizes.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from classifier.bundle import load_bundle  # noqa: E402
from classifier.export import bundle_sample_images, export_onnx  # noqa: E402
from classifier.onnx_runtime import OnnxPredictor  # noqa: E402
from classifier.predict import Predictor  # noqa: E402

ONNX_STACK = ("onnxruntime", "numpy", "pillow")
TORCH_STACK = ("torch", "torchvision", "numpy", "pillow")
MODELS_DIR, EXAMPLES_DIR = ROOT / "assets" / "models", ROOT / "assets" / "examples"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
MB = 1e6


def block_time(fn, calls: int) -> float:
    """Seconds per call of `calls` calls in a row."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def race(contenders: dict, calls: int, repeats: int, warmup: int = 2) -> dict[str, float]:
    """{name: median seconds per call}: one block of each contender per repetition, the order
    alternating, so that both meet the same spells of a shared machine."""
    for fn in contenders.values():
        block_time(fn, warmup)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            times[name].append(block_time(contenders[name], calls))
    return {name: statistics.median(t) for name, t in times.items()}


def latency_rows(predictor: Predictor, runtime: OnnxPredictor, image: Path, batch_images: list[Path],
                 repeats: int) -> list[tuple[str, str, float, float]]:
    """(measure, unit, torch, onnxruntime) rows; ms per image at batch 1, images/s at batch 32."""
    tensor = predictor.preprocess(image).unsqueeze(0)
    batch = torch.stack([predictor.preprocess(p) for p in batch_images])
    array = batch.numpy()
    rows = []
    one = race({"torch": lambda: predictor.predict(image), "onnx": lambda: runtime.predict(image)}, 10, repeats)
    rows.append(("batch 1: predict(image)", "ms/image", one["torch"] * 1e3, one["onnx"] * 1e3))
    one = race({"torch": lambda: predictor.probabilities(tensor),
                "onnx": lambda: runtime.probabilities(tensor.numpy())}, 10, repeats)
    rows.append(("batch 1: probabilities(tensor)", "ms/image", one["torch"] * 1e3, one["onnx"] * 1e3))
    n = len(batch_images)
    many = race({"torch": lambda: predictor.probabilities(batch), "onnx": lambda: runtime.probabilities(array)},
                1, repeats)
    rows.append((f"batch {n}: probabilities(batch)", "images/s", n / many["torch"], n / many["onnx"]))
    many = race({"torch": lambda: predictor.predict_batch(batch_images),
                 "onnx": lambda: runtime.predict_batch(batch_images)}, 1, repeats)
    rows.append((f"batch {n}: predict_batch(images)", "images/s", n / many["torch"], n / many["onnx"]))
    return rows


def latency_table(rows) -> str:
    lines = ["| measure | unit | torch Predictor | onnxruntime OnnxPredictor | onnxruntime speed-up |",
             "|---|---|---|---|---|"]
    for measure, unit, theirs, ours in rows:
        speedup = theirs / ours if unit.startswith("ms") else ours / theirs
        lines.append(f"| {measure} | {unit} | {theirs:.1f} | {ours:.1f} | {speedup:.2f}x |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Stack sizes


def requirement_names(dist: metadata.Distribution) -> list[str]:
    """The distributions `dist` requires on this platform (markers evaluated, extras left out)."""
    from packaging.requirements import Requirement

    names = []
    for text in dist.requires or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            names.append(requirement.name)
    return names


def installed_closure_bytes(roots: tuple[str, ...]) -> tuple[int, list[str]]:
    """Bytes on disk of the installed distributions `roots` and all they require, in this interpreter."""
    seen, todo, total = set(), list(roots), 0
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        total += sum(Path(dist.locate_file(f)).stat().st_size for f in dist.files or []
                     if Path(dist.locate_file(f)).is_file())
        todo += requirement_names(dist)
    return total, sorted(seen)


def du_bytes(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def venv_bytes(folder: Path, packages: tuple[str, ...], index_url: str | None = None) -> tuple[int, int, str]:
    """(du of a fresh venv with `packages` installed, du of the same venv empty, their versions)."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    empty = du_bytes(folder)
    python = str(folder / "bin" / "python")
    command = [python, "-m", "pip", "install", "-q", "--no-cache-dir", *packages]
    if index_url:  # that index alone: PyPI's torch for Linux would bring the CUDA libraries along
        command += ["--index-url", index_url]
    subprocess.run(command, check=True)
    versions = subprocess.run([python, "-c", "import sys, importlib.metadata as m; "
                               "print(', '.join(f'{p} {m.version(p)}' for p in sys.argv[1:]))", *packages],
                              capture_output=True, text=True, check=True).stdout.strip()
    return du_bytes(folder), empty, versions


def stack_rows(fresh: bool) -> list[tuple[str, str, float]]:
    """(stack, how measured, MB) rows."""
    rows = []
    if fresh:
        base = Path(tempfile.mkdtemp(prefix="stack-sizes-", dir="/tmp"))
        try:
            for label, packages, index in ((" + ".join(ONNX_STACK), ONNX_STACK, None),
                                           ("torch + torchvision (CPU wheels) + numpy + pillow", TORCH_STACK,
                                            TORCH_CPU_INDEX)):
                total, empty, versions = venv_bytes(base / label.split()[0], packages, index)
                rows.append((f"{label}: {versions}", f"fresh venv in /tmp: `du -sb` {total / MB:.0f} MB "
                             f"less the empty venv's {empty / MB:.0f} MB", (total - empty) / MB))
        finally:
            shutil.rmtree(base, ignore_errors=True)
    for roots in (ONNX_STACK, TORCH_STACK):
        size, names = installed_closure_bytes(roots)
        rows.append((f"{' + '.join(roots)} as installed here ({len(names)} distributions)",
                     "installed files of them and all they require", size / MB))
    return rows


def stack_table(rows) -> str:
    lines = ["| stack | measured as | MB |", "|---|---|---|"]
    lines += [f"| {stack} | {how} | {size:.0f} |" for stack, how, size in rows]
    return "\n".join(lines)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(MODELS_DIR / "cifar10-efficientnet-lite0"), help="a bundle folder")
    parser.add_argument("--image", default=str(EXAMPLES_DIR / "cat.jpg"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--stack-sizes", action="store_true", help="also install each stack in a fresh venv")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.model)
    photos = sorted(EXAMPLES_DIR.glob("*.jpg")) + bundle_sample_images(bundle)
    batch_images = photos[:args.batch]
    with tempfile.TemporaryDirectory() as tmp:
        runtime = OnnxPredictor(export_onnx(bundle, Path(tmp) / "model.onnx"), threads=args.threads)
    predictor = Predictor(bundle)
    rows = latency_rows(predictor, runtime, Path(args.image), batch_images, args.repeats)

    import onnxruntime

    cfg = bundle.pretrained_cfg
    print(f"model {bundle.path.name} ({bundle.architecture}, input {cfg['input_size'][1]}x{cfg['input_size'][2]}, "
          f"tta {bundle.tta}: both runtimes run its views), image {Path(args.image).name}, batch of "
          f"{len(batch_images)} photos and thumbnails; {args.threads} thread(s) each, median of "
          f"{args.repeats} alternating repetitions; {cpu_name()}, "
          f"{os.cpu_count()} CPUs; torch {torch.__version__} (Predictor, channels_last), "
          f"onnxruntime {onnxruntime.__version__}, Python {platform.python_version()}\n")
    print(latency_table(rows))
    print()
    print(stack_table(stack_rows(args.stack_sizes)))


if __name__ == "__main__":
    main()
