"""The learning-rate range test (Leslie Smith; fast.ai's `lr_find`): pick a learning rate by looking.

The test trains a *copy* of the model for a few hundred steps while the learning rate grows
exponentially from tiny to huge, and records the loss at each step. The loss first stays flat (the
rate is too small to matter), then falls (the useful range), then explodes. The suggestion is a rate
inside the falling stretch: fast.ai's "valley" (two thirds down the longest descent) by default, or
the "steepest" point of the smoothed curve, or the "minimum" divided by ten.

    python -m classifier.lr_finder --data path/to/folder --model fast_cnn --out runs/lr.png

`training/finetune.py --lr auto` runs the same test before training and uses its suggestion.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from classifier.train import TrainConfig, autocast_dtype, build_optimizer  # noqa: E402
from classifier.evaluate import save_figure  # noqa: E402

log = logging.getLogger(__name__)

METHODS = ("valley", "steepest", "minimum")


class LRFinderError(ValueError):
    """A range test that cannot run or gave no usable curve, worded for the user."""


@dataclass
class LRFinderResult:
    lrs: list[float]  # the learning rate of each step
    losses: list[float]  # the raw training loss of each step
    smoothed: list[float]  # exponentially smoothed, bias-corrected loss: what the plot and suggestions use
    suggestion: float
    method: str
    valley: float
    steepest: float
    minimum: float  # the rate of the lowest smoothed loss divided by ten (fast.ai's "min/10")
    diverged: bool  # the test stopped early because the loss exploded (the usual, healthy end)

    def summary(self) -> dict:
        """Everything but the curves: what a bundle's config records."""
        return {"suggestion": self.suggestion, "method": self.method, "valley": self.valley,
                "steepest": self.steepest, "minimum": self.minimum, "steps": len(self.lrs),
                "start_lr": self.lrs[0], "end_lr": self.lrs[-1], "diverged": self.diverged}

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LRFinderResult":
        return cls(**json.loads(Path(path).read_text()))


def _copy_optimizer(optimizer: torch.optim.Optimizer, original: nn.Module, clone: nn.Module
                    ) -> torch.optim.Optimizer:
    """The same optimiser (class, groups, hyperparameters, state) over the clone's parameters."""
    position = {id(p): i for i, p in enumerate(original.parameters())}
    clone_params = list(clone.parameters())
    groups = []
    for group in optimizer.param_groups:
        missing = [p for p in group["params"] if id(p) not in position]
        if missing:
            raise LRFinderError("the optimiser holds parameters that are not the model's")
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [clone_params[position[id(p)]] for p in group["params"]]})
    new = type(optimizer)(groups, **optimizer.defaults)
    # load_state_dict copies the state (momentum buffers, Adam moments) onto the clone's parameters.
    new.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return new


def _batches(loader):
    """Batches forever: the test may need more steps than one pass over a small dataset holds."""
    while True:
        yielded = False
        for batch in loader:
            if batch is not None:
                yielded = True
                yield batch[0], batch[1]
        if not yielded:
            raise LRFinderError("the training loader yielded no readable batch")


def lr_range_test(
    model: nn.Module,
    train_loader,
    config: TrainConfig | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | str | None = None,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 200,
    smoothing: float = 0.95,
    diverge_factor: float = 4.0,
    method: str = "valley",
) -> LRFinderResult:
    """Run the range test on a deep copy of `model`; `model` and `optimizer` are left untouched.

    The optimiser is `optimizer` copied (same class, groups and state) or else the one `config`
    describes (train.build_optimizer: SGD or AdamW, weight decay, head/body groups). Parameter groups
    keep their ratios to one another (a body trained at 0.1x the head stays at 0.1x), with the
    largest group rate sweeping from `start_lr` to `end_lr`.
    """
    if not 0 < start_lr < end_lr:
        raise LRFinderError(f"need 0 < start_lr < end_lr, got {start_lr:g} and {end_lr:g}")
    if num_steps < 10:
        raise LRFinderError("the range test needs at least 10 steps to draw a curve")
    if method not in METHODS:
        raise LRFinderError(f"unknown suggestion method '{method}' ({', '.join(METHODS)})")
    config = config or TrainConfig()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    clone = copy.deepcopy(model).to(device).train()
    opt = _copy_optimizer(optimizer, model, clone) if optimizer else build_optimizer(clone, config)
    top = max(g["lr"] for g in opt.param_groups)
    ratios = [g["lr"] / top if top > 0 else 1.0 for g in opt.param_groups]
    dtype = autocast_dtype(device, config.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    growth = (end_lr / start_lr) ** (1 / (num_steps - 1))

    lrs, losses, smoothed = [], [], []
    average, best, diverged = 0.0, math.inf, False
    # Global RNG state is restored afterwards, so running the test does not change what training
    # (augmentation, dropout) would have drawn without it.
    rng_state = torch.random.get_rng_state()
    try:
        for step, (x, y) in enumerate(_batches(train_loader)):
            if step == num_steps:
                break
            lr = start_lr * growth**step
            for group, ratio in zip(opt.param_groups, ratios):
                group["lr"] = lr * ratio
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = criterion(clone(x).float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            value = loss.item()
            if not math.isfinite(value):
                diverged = True
                break
            average = smoothing * average + (1 - smoothing) * value
            debiased = average / (1 - smoothing ** (step + 1))
            lrs.append(lr)
            losses.append(value)
            smoothed.append(debiased)
            best = min(best, debiased)
            if step > num_steps // 10 and debiased > diverge_factor * best:
                diverged = True
                break
    finally:
        torch.random.set_rng_state(rng_state)
    if len(lrs) < 10:
        raise LRFinderError(f"the loss exploded within {len(lrs)} steps, already at lr {start_lr * growth ** len(lrs):.2g}; "
                         f"try a smaller start_lr")
    suggestions = suggest(lrs, smoothed)
    return LRFinderResult(lrs, losses, smoothed, suggestions[method], method, diverged=diverged, **suggestions)


def _trim(n: int) -> slice:
    """Leave out the first tenth (the smoothing is still settling) and the last few (the explosion)."""
    return slice(n // 10, n - 5 if n > 20 else n)


def suggest(lrs: list[float], smoothed: list[float]) -> dict[str, float]:
    """The three suggestions {valley, steepest, minimum} from a recorded (smoothed) curve."""
    keep = _trim(len(lrs))
    lr = np.asarray(lrs[keep], dtype=np.float64)
    loss = np.asarray(smoothed[keep], dtype=np.float64)
    log_lr = np.log10(lr)
    steepest = float(lr[int(np.argmin(np.gradient(loss, log_lr)))])
    minimum = float(lr[int(np.argmin(loss))]) / 10
    return {"valley": _valley(lr, loss, fallback=minimum), "steepest": steepest, "minimum": minimum}


def _valley(lr: np.ndarray, loss: np.ndarray, fallback: float) -> float:
    """fast.ai's valley: the longest (not necessarily contiguous) decreasing run of the curve, and
    the rate about two thirds of the way down it: far enough to learn fast, short of the cliff."""
    n = len(loss)
    run = np.ones(n, dtype=np.int64)  # run[i]: length of the longest decreasing run ending at i
    for i in range(1, n):
        lower_before = loss[:i] > loss[i]
        if lower_before.any():
            run[i] = run[:i][lower_before].max() + 1
    end = int(np.argmax(run))
    start = end - int(run[end]) + 1
    if end - start < 2:  # no descent at all: the curve never fell
        return fallback
    third = (end - start) / 3
    return float(lr[start + int(third) + int(third / 2)])


def plot_lr_finder(result: LRFinderResult, path: str | os.PathLike, title: str | None = None) -> Path:
    """Loss against learning rate on a log axis, the raw loss faint, the suggestions marked."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(result.lrs, result.losses, color="tab:blue", alpha=0.2, linewidth=0.8, label="loss per step")
    ax.plot(result.lrs, result.smoothed, color="tab:blue", linewidth=2, label="smoothed loss")
    ax.set_xscale("log")
    markers = {"valley": ("tab:green", "o"), "steepest": ("tab:orange", "s"), "minimum": ("tab:red", "^")}
    for name, (colour, marker) in markers.items():
        lr = getattr(result, name)
        y = float(np.interp(np.log10(lr), np.log10(result.lrs), result.smoothed))
        chosen = name == result.method
        ax.plot(lr, y, marker=marker, color=colour, markersize=10 if chosen else 7, linestyle="none",
                label=f"{name}: {lr:.2g}" + ("  (suggested)" if chosen else ""))
        if chosen:
            ax.axvline(lr, color=colour, linestyle="--", alpha=0.6)
    # The explosion can be orders of magnitude above the useful range: clip the y axis to keep the
    # interesting part readable.
    keep = result.smoothed[_trim(len(result.smoothed))] or result.smoothed
    low, high = min(keep), max(result.smoothed[0], min(max(keep), 4 * min(keep)))
    ax.set_ylim(low - 0.05 * (high - low), high + 0.15 * (high - low) + 1e-9)
    ax.set(xlabel="learning rate (log scale)", ylabel="training loss",
           title=title or f"Learning-rate range test: suggested {result.suggestion:.2g}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=110)


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m classifier.lr_finder",
                                description="Learning-rate range test: plot loss against learning rate and suggest one.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="cifar10, fashion-mnist, an image folder, a .tar.gz of one, or a CSV")
    p.add_argument("--data-dir", default=None, help="where cifar10/fashion-mnist live")
    p.add_argument("--image-dir", default=None, help="with a CSV: the folder of images")
    p.add_argument("--classes", default=None, help="comma-separated subset of classes")
    p.add_argument("--model", default="fast_cnn", help="a project model or any timm name")
    p.add_argument("--model-args", type=json.loads, default={}, help='JSON of model arguments, e.g. \'{"c1": 32}\'')
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="start from ImageNet weights (default: yes for timm models, no for the project's CNNs)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--steps", type=int, default=200, help="steps of the sweep (fewer if the loss explodes first)")
    p.add_argument("--start-lr", type=float, default=1e-7)
    p.add_argument("--end-lr", type=float, default=10.0)
    p.add_argument("--method", choices=METHODS, default="valley", help="which point of the curve to suggest")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="lr_finder.png", help="the plot; the curve goes beside it as .json")
    return p


def main(argv: list[str] | None = None) -> int:
    from classifier.allocator import keep_freed_memory
    from classifier.experiment import RunConfig, USER_ERRORS, prepare, train_config
    from classifier.train import pick_device

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    cfg = RunConfig(data=args.data, data_dir=args.data_dir, image_dir=args.image_dir,
                    classes=[c.strip() for c in args.classes.split(",")] if args.classes else None,
                    model=args.model, model_args=args.model_args, pretrained=args.pretrained,
                    image_size=args.image_size, batch_size=args.batch_size, optimizer=args.optimizer,
                    weight_decay=args.weight_decay, device=args.device, workers=args.workers, seed=args.seed)
    try:
        device = pick_device(cfg.device)
        keep_freed_memory(device)  # faster CPU steps: see classifier/allocator.py
        setup = prepare(cfg, device)
        result = lr_range_test(setup.model, setup.train_loader, train_config(cfg, setup.new_head, lr=args.end_lr),
                               device=device, start_lr=args.start_lr, end_lr=args.end_lr,
                               num_steps=args.steps, method=args.method)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plot = plot_lr_finder(result, args.out, title=f"{args.model} on {setup.data.name}: suggested lr {result.suggestion:.2g}")
    result.save(plot.with_suffix(".json"))
    ended = "the loss exploded" if result.diverged else "the sweep ended before the loss exploded"
    print(f"swept lr {result.lrs[0]:.1e} -> {result.lrs[-1]:.1e} over {len(result.lrs)} steps ({ended})")
    for name in METHODS:
        mark = "  <- suggested" if name == result.method else ""
        print(f"  {name:<9} {getattr(result, name):.3g}{mark}")
    print(f"plot: {plot}")
    data = " ".join(f"{flag} {shlex.quote(value)}" for flag, value in (
        ("--data", args.data), ("--data-dir", args.data_dir), ("--image-dir", args.image_dir),
        ("--classes", args.classes)) if value)
    print(f"train with it: python training/finetune.py {data} --model {args.model} --optimizer {args.optimizer} "
          f"--batch-size {args.batch_size} --lr {result.suggestion:.3g}  (or --lr auto)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
