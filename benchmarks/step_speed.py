#!/usr/bin/env python
"""Training steps alone (no data loading): images/s by input size, batch size and memory format.

    python benchmarks/step_speed.py                                   # lite0 at 160/224 px, batch 32/64
    python benchmarks/step_speed.py --model tutorial_cifar_cnn --sizes 32 --batches 16,128 --no-pretrained

Each row times --steps forward/backward/SGD steps on one random batch held in memory, after
--warmup steps, in one process, one row after another: what a fine-tune's step costs on this host,
with the two layouts a batch can come in. `contiguous` is NCHW, as a DataLoader's default collate
gives it; `channels_last` is NHWC, as the in-memory loader (classifier.fastdata) gives it and as
oneDNN (CPU) and cuDNN (GPU) run convolutions fastest. Compare rows as ratios: the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from classifier.models import create_model  # noqa: E402
from classifier.runtime import pick_device  # noqa: E402


def images_per_second(model: torch.nn.Module, size: int, batch: int, channels_last: bool, steps: int, warmup: int,
                      device: torch.device) -> float:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (batch,), device=device)
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--sizes", default="160,224", help="input sizes, comma-separated")
    p.add_argument("--batches", default="32,64", help="batch sizes, comma-separated")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False,
                   help="the weights do not change the speed; off by default so nothing is loaded")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    model = create_model(args.model, num_classes=10, pretrained=args.pretrained).to(device)
    print(f"{args.model} on {device} ({torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs), "
          f"{args.steps} timed steps after {args.warmup}; torch {torch.__version__}\n")
    print("| input | batch | contiguous (NCHW) img/s | channels_last (NHWC) img/s | NHWC / NCHW |")
    print("|---|---|---|---|---|")
    for size in map(int, args.sizes.split(",")):
        for batch in map(int, args.batches.split(",")):
            nchw = images_per_second(model, size, batch, False, args.steps, args.warmup, device)
            nhwc = images_per_second(model, size, batch, True, args.steps, args.warmup, device)
            print(f"| {size} px | {batch} | {nchw:.1f} | {nhwc:.1f} | {nhwc / nchw:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
