#!/usr/bin/env python
"""CPU training and inference with glibc's default malloc thresholds and with classifier.allocator's; a table.

    python benchmarks/cpu_allocator.py                        # lite0, 160 px, batch 32
    python benchmarks/cpu_allocator.py --size 224 --batch 64 --rounds 3
    OMP_NUM_THREADS=1 python benchmarks/cpu_allocator.py --workloads predict --batch 2 --steps 40   # the app's TTA pair

The thresholds are process-wide and cannot be put back, so each measurement is a child process of
this script, once with the default allocator and once after classifier.allocator.keep_freed_memory(),
alternating for --rounds rounds so that a noisy host hits both alike. The workloads:
- steps: --steps forward/backward/SGD steps on one random batch in memory after --warmup (as
  benchmarks/step_speed.py times them), NCHW and NHWC;
- predict: --steps forward passes of one random NHWC batch after --warmup, without gradients (with
  --batch 2 on one thread, what each of the app's workers does per photo: the image and its mirror);
- fit: one epoch of classifier.loop.fit on --steps batches of random 32x32 images held in memory,
  resized to --size by the in-memory loader, with CutMix and label smoothing: the loop that
  `training/finetune.py --loader memory` runs (the validation pass on 64 images included).
Rows give the median of the rounds: images/s, minor page faults per step (the warm-up's left out,
except for fit, whose first steps fault everything in), the share of the CPU time
spent in the kernel, and the peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

MODES = ("default", "keep_freed_memory", "serving")  # serving: keep_freed_memory(serving=True), the app's
WORKLOADS = ("steps-nchw", "steps-nhwc", "fit", "predict")


def steps_rate(args: argparse.Namespace, model, channels_last: bool):
    """(images/s, steps counted, resource usage at their start) of bare training steps."""
    import torch
    from step_speed import images_per_second

    cpu = torch.device("cpu")
    # Warm-up first, on its own, so that the counters see only the timed steps (the first steps
    # fault in all the memory a step needs, whatever the allocator).
    images_per_second(model, args.size, args.batch, channels_last, args.warmup, 0, cpu)
    before = resource.getrusage(resource.RUSAGE_SELF)
    return images_per_second(model, args.size, args.batch, channels_last, args.steps, 0, cpu), args.steps, before


def predict_rate(args: argparse.Namespace, model):
    """(images/s, batches counted, resource usage at their start) of inference on one random NHWC
    batch: evaluation's forward passes, or with --batch 2 the app's mirror-TTA pair."""
    import torch

    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(args.warmup):
            model(x)
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(args.steps):
            model(x)
        return args.batch * args.steps / (time.perf_counter() - start), args.steps, before


def fit_rate(args: argparse.Namespace, model):
    """(images/s, steps, resource usage at the start) of one epoch of fit() on random 32x32 images
    through the in-memory loader."""
    import tempfile

    import numpy as np
    import torch

    from classifier.fastdata import DeviceLoader
    from classifier.config import TrainConfig
    from classifier.loop import fit

    rng = np.random.default_rng(0)
    n = args.steps * args.batch
    images, targets = rng.integers(0, 256, (n + 64, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n + 64)
    common = dict(mean=(0.5,) * 3, std=(0.25,) * 3, device="cpu", size=args.size, channels=3,
                  interpolation="bicubic", seed=0)
    train = DeviceLoader(images[:n], targets[:n], batch_size=args.batch, train=True, **common)
    val = DeviceLoader(images[n:], targets[n:], batch_size=64, train=False, **common)
    # The settings of the shipped model's CutMix stage (README: the shipped models).
    config = TrainConfig(epochs=1, lr=0.005, optimizer="sgd", schedule="cosine", warmup_epochs=0.2,
                         label_smoothing=0.1, cutmix=1.0)
    with tempfile.TemporaryDirectory() as out:
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        fit(model, train, val, config, out, device=torch.device("cpu"))
        return n / (time.perf_counter() - start), args.steps, before


def child(args: argparse.Namespace) -> int:
    """One measurement in this process; prints it as one JSON line."""
    from classifier.allocator import keep_freed_memory

    applied = keep_freed_memory(serving=args.child == "serving") if args.child != "default" else False
    if args.child != "default" and not applied:
        raise SystemExit("keep_freed_memory() did not apply here (not glibc, or the environment sets malloc up)")
    import torch

    from classifier.models import create_model

    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10, pretrained=False)
    if args.workload == "fit":
        speed, steps, before = fit_rate(args, model)
    elif args.workload == "predict":
        speed, steps, before = predict_rate(args, model)
    else:
        speed, steps, before = steps_rate(args, model, channels_last=args.workload == "steps-nhwc")
    after = resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    print(json.dumps({"images_per_s": speed, "faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
                      "kernel_share": system / (user + system), "peak_rss_mb": after.ru_maxrss / 1024}))
    return 0


def measure(workload: str, mode: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--workload", workload, "--model", args.model,
               "--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{workload}, {mode}: the child failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps (steps), batches in the epoch (fit)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps or passes first (steps, predict)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, of " + ", ".join(WORKLOADS))
    p.add_argument("--rounds", type=int, default=2, help="alternating measurements of each")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, of " + ", ".join(MODES))
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--workload", choices=WORKLOADS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    workloads, modes = args.workloads.split(","), ["default"] + [m for m in args.modes.split(",") if m != "default"]
    if unknown := set(workloads) - set(WORKLOADS):
        p.error(f"unknown workloads {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
    if unknown := set(modes) - set(MODES):
        p.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")

    import torch  # only for the thread count the children get too (the same environment)

    print(f"{args.model}, {args.size} px, batch {args.batch}, on the CPU ({torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPUs): median of {args.rounds} alternating rounds\n")
    print("| workload | malloc | images/s | minor page faults / step | kernel share of CPU time | peak RSS | "
          "speed-up |")
    print("|---|---|---|---|---|---|---|")
    for workload in workloads:
        runs: dict[str, list[dict]] = {mode: [] for mode in modes}
        for _ in range(args.rounds):
            for mode in modes:
                runs[mode].append(measure(workload, mode, args))
        median = {mode: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
                  for mode, rows in runs.items()}
        for mode in modes:
            m = median[mode]
            ratio = m["images_per_s"] / median["default"]["images_per_s"]
            print(f"| {workload} | {mode} | {m['images_per_s']:.1f} | {m['faults_per_step']:,.0f} | "
                  f"{m['kernel_share']:.0%} | {m['peak_rss_mb']:,.0f} MB | {ratio:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
