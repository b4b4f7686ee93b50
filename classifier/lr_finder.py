"""The learning-rate range test (Leslie Smith; fast.ai's `lr_find`): pick a learning rate by looking.

The test trains a *copy* of the model for a few hundred steps while the learning rate grows
exponentially from tiny to huge, and records the loss at each step. The loss first stays flat (the
rate is too small to matter), then falls (the useful range), then explodes. The suggestion is a rate
inside the falling stretch:

- "auto" (the default): the steepest point of the descent before the loss turns up, read from a
  centred (not lagging) smoothing of the raw losses, kept within a factor of the run's measured
  default rate; where the curve is flat (the loss hardly falls before it rises) or noisy (it falls
  by less than its own step-to-step spread) there is nothing to read, and the default is used.
  fast.ai's valley picked 1.9e-4 on a fine-tuned EfficientNet whose curve was still flat there
  (validation loss stuck at ln 2), where 0.01 learned: see `suggest_auto`.
- fast.ai's "valley" (two thirds down the longest descent), the "steepest" point of the lagging
  smoothed curve, or the "minimum" divided by ten: shown beside it.

    python -m classifier lr-find --data path/to/folder --model fast_cnn --out runs/lr.png

`python -m classifier train --lr auto` runs the same test before training and uses its suggestion;
classifier.plots.plot_lr_finder draws the curve.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from classifier.config import TrainConfig
from classifier.errors import LRFinderError
from classifier.loop import build_optimizer
from classifier.runtime import autocast_dtype

log = logging.getLogger(__name__)

METHODS = ("auto", "valley", "steepest", "minimum")
# suggest_auto's rules. A descent smaller than FLAT_DROP of the starting loss is a flat curve; one
# smaller than NOISY_DROP times the raw losses' spread around their trend is noise. The suggestion
# stays within [DEFAULT_SPAN[0], DEFAULT_SPAN[1]] times the measured default rate: a range test of
# a few dozen steps on a small dataset can misread a curve, and a rate 30x off ruins a run where
# the default would have been fine (benchmarks/own_photos.py measures both).
FLAT_DROP = 0.10
NOISY_DROP = 1.0
DEFAULT_SPAN = (0.2, 5.0)


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
    auto: float = math.nan  # suggest_auto's rate (the default rate where the curve could not be read)
    note: str = ""  # how suggest_auto read the curve: the steepest point, clipped, or why the default

    def summary(self) -> dict:
        """Everything but the curves: what a bundle's config records."""
        return {"suggestion": self.suggestion, "method": self.method, "auto": self.auto, "note": self.note,
                "valley": self.valley, "steepest": self.steepest, "minimum": self.minimum, "steps": len(self.lrs),
                "start_lr": self.lrs[0], "end_lr": self.lrs[-1], "diverged": self.diverged}

    def settled(self) -> list[float]:
        """The smoothed losses the suggestions are read from (see _trim)."""
        return self.smoothed[_trim(len(self.smoothed))] or self.smoothed

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
    smoothing: float | None = None,
    diverge_factor: float = 4.0,
    method: str = "auto",
    default_lr: float | None = None,
) -> LRFinderResult:
    """Run the range test on a deep copy of `model`; `model` and `optimizer` are left untouched.

    `default_lr`: the rate the run would use without the test (config.default_lr), which the
    "auto" suggestion falls back to and stays near. `smoothing`: the factor of the exponential
    average the divergence check and the plot use (default: a window of a tenth of the steps).

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
    smoothing = smoothing if smoothing is not None else min(0.95, max(0.8, 1 - 10 / num_steps))
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
    auto, note = suggest_auto(lrs, losses, default_lr)
    suggestions["auto"] = auto
    return LRFinderResult(lrs, losses, smoothed, suggestions[method], method, diverged=diverged, note=note,
                          **suggestions)


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


def _centred_average(values: np.ndarray, window: int) -> np.ndarray:
    """A moving average centred on each point (the window shrinks at the ends): smooth, and unlike
    the exponential average of the sweep, not shifted towards higher rates."""
    half = window // 2
    sums = np.concatenate([[0.0], np.cumsum(values)])
    low = np.maximum(np.arange(len(values)) - half, 0)
    high = np.minimum(np.arange(len(values)) + half + 1, len(values))
    return (sums[high] - sums[low]) / (high - low)


def suggest_auto(lrs: list[float], losses: list[float], default: float | None = None) -> tuple[float, str]:
    """The rate of the steepest descent before the loss turns up, and a note of how it was read.

    The raw losses are smoothed by a centred average (a tenth of the sweep wide). The descent runs
    from the start to the lowest smoothed loss; the suggestion is the steepest point of it (in loss
    per decade of rate), leaving out its last tenth, where the curve flattens into the minimum by
    definition. Flat or noisy curves (FLAT_DROP, NOISY_DROP) fall back to `default`, and a reading
    is kept within DEFAULT_SPAN times it. Without a default a flat curve gives its minimum / 10.
    """
    lr = np.asarray(lrs, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    n = len(lr)
    smooth = _centred_average(loss, max(3, (n // 10) | 1))
    bottom = int(np.argmin(smooth))
    start = float(np.median(smooth[:max(3, n // 10)]))
    drop = start - float(smooth[bottom])
    spread = float(np.std(loss[:bottom + 1] - smooth[:bottom + 1])) if bottom > 0 else 0.0
    fallback = default if default is not None else float(lr[bottom]) / 10
    using = f"the default {default:.3g}" if default is not None else f"the minimum / 10, {fallback:.3g}"
    if bottom < 3 or drop < FLAT_DROP * start:
        return fallback, (f"flat curve: the loss fell by {max(drop, 0) / start:.0%} of its starting {start:.3g} "
                          f"before it rose; using {using}")
    if drop < NOISY_DROP * spread:
        return fallback, (f"noisy curve: the loss fell by {drop:.3g}, less than its step-to-step spread "
                          f"{spread:.3g}; using {using}")
    descent = slice(0, bottom + 1)
    slope = np.gradient(smooth[descent], np.log10(lr[descent]))
    above = np.flatnonzero(smooth[descent] > smooth[bottom] + 0.1 * drop)
    steepest = float(lr[above[int(np.argmin(slope[above]))]]) if len(above) else float(lr[bottom])
    note = f"steepest descent at {steepest:.3g} (the loss fell from {start:.3g} to {smooth[bottom]:.3g})"
    if default is not None:
        low, high = default * DEFAULT_SPAN[0], default * DEFAULT_SPAN[1]
        if not low <= steepest <= high:
            clipped = min(max(steepest, low), high)
            return clipped, f"{note}; kept within {DEFAULT_SPAN[0]:g}-{DEFAULT_SPAN[1]:g}x the default {default:.3g}: {clipped:.3g}"
    return steepest, note
