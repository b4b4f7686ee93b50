"""fit(): the training loop, with everything a real run needs and nothing else.

Schedules, mixed precision, gradient clipping, a frozen-backbone warm-up for fine-tuning, an
exponential moving average of the weights (timm's ModelEmaV3), early stopping on validation loss,
atomic checkpoints of the best and the last epoch, exact resume (model, optimiser, scheduler,
scaler, moving average, RNG state, epoch), and a clear stop on a NaN loss. It is aware
of torch.distributed (DDP under torchrun) but works without it: rank 0 alone writes files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from safetensors.torch import save_file
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from tqdm.auto import tqdm

from classifier import distributed
from classifier.config import TrainConfig
from classifier.errors import ResumeMismatch, TrainingDiverged
from classifier.models import assert_finite, head_parameters
from classifier.plots import plot_history
from classifier.runtime import autocast_dtype, channels_last_pays, pick_device

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.pt"
BEST_WEIGHTS = "best.safetensors"
METRICS_LOG = "metrics.jsonl"
CURVES_PNG = "curves.png"


SOFT_TARGET_LOSS = SoftTargetCrossEntropy()  # for mixed batches, whose targets are distributions


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_val_loss: float = math.inf
    stopped_early: bool = False
    best_weights: Path | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy's state holds an ndarray, which weights_only loading refuses: store it as a tensor.
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint whole


def _atomic_save_weights(model: nn.Module, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp))
    os.replace(tmp, path)


def _set_epoch(loader, epoch: int) -> None:
    """Reseed the shuffling (and the in-memory loader's augmentation) for `epoch`."""
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Two parameter groups, head and body, so fine-tuning can give the body a lower rate.

    Biases and normalisation weights get no weight decay (it only shrinks them toward zero).
    """
    head_ids = {id(p) for p in head_parameters(model)} if hasattr(model, "get_classifier") else set()
    groups = {(is_head, decay): [] for is_head in (True, False) for decay in (True, False)}
    for p in model.parameters():
        groups[(id(p) in head_ids, p.ndim > 1)].append(p)
    param_groups = []
    for (is_head, decay), params in groups.items():
        if params:
            lr = config.lr * (1.0 if is_head else config.backbone_lr_scale)
            param_groups.append({"params": params, "lr": lr, "initial_lr": lr, "is_head": is_head,
                                 "weight_decay": config.weight_decay if decay else 0.0})
    if config.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=config.lr)
    raise ValueError(f"unknown optimizer '{config.optimizer}' (sgd or adamw)")


def build_scheduler(optimizer, config: TrainConfig, steps_per_epoch: int):
    total = max(1, config.epochs * steps_per_epoch)
    warmup = int(config.warmup_epochs * steps_per_epoch)
    # OneCycleLR needs each of its two phases to span at least one step; a run of a handful of
    # steps (a tiny dataset, a smoke test) gets the same shape from the cosine schedule instead.
    if config.schedule == "onecycle" and total >= 4:
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["initial_lr"] for g in optimizer.param_groups], total_steps=total,
            pct_start=min(max(warmup / total, 2 / total), 0.5), anneal_strategy="cos")
    if config.schedule in ("cosine", "onecycle"):
        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    raise ValueError(f"unknown schedule '{config.schedule}' (onecycle, cosine or constant)")


def batch_mixer(config: TrainConfig, model: nn.Module) -> Mixup | None:
    """timm's Mixup for `config`'s mixup/cutmix alphas (None when both are 0)."""
    if not (config.mixup > 0 or config.cutmix > 0):
        return None
    num_classes = getattr(model, "num_classes", None)
    if not num_classes:
        raise ValueError(f"--mixup/--cutmix need the model's number of classes; {type(model).__name__} "
                         f"has no num_classes")
    return Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.label_smoothing,
                 num_classes=num_classes)


def _set_body_trainable(model: nn.Module, trainable: bool) -> None:
    head_ids = {id(p) for p in head_parameters(model)}
    for p in model.parameters():
        if id(p) not in head_ids:
            p.requires_grad_(trainable)


@torch.no_grad()
def validate(model: nn.Module, loader: Iterable, device: torch.device, dtype, criterion) -> tuple[float, float]:
    """(mean loss, accuracy) over `loader`, summed across ranks when distributed."""
    model.eval()
    totals = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, correct, count
    for batch in loader:
        if batch is None:
            continue
        x, y = (t.to(device, non_blocking=True) for t in batch[:2])  # (x, y[, index])
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        totals += torch.stack([loss.double(), (logits.argmax(1) == y).sum().double(),
                               torch.tensor(float(len(y)), device=device, dtype=torch.float64)])
    distributed.all_reduce_sum(totals)
    loss_sum, correct, count = totals.tolist()
    return loss_sum / max(count, 1), correct / max(count, 1)


def fit(
    model: nn.Module,
    train_loader,
    val_loader,
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    device: torch.device | None = None,
    resume: bool = False,
    on_epoch_end: Callable[[dict], None] | None = None,
    sync_batchnorm: bool = False,
) -> FitResult:
    """Train `model` in place; at the end it holds the weights of the last epoch trained (their moving
    average, with config.ema_decay).

    The best weights by validation loss are in out_dir/best.safetensors (FitResult.best_weights).
    `on_epoch_end` is called with each epoch's record after its checkpoint is written.
    """
    out_dir = Path(out_dir)
    is_main = distributed.is_main_process()
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    device = device or pick_device()
    dtype = autocast_dtype(device, config.amp)
    seed_everything(config.seed)

    model.to(device)
    channels_last = config.channels_last and channels_last_pays(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if sync_batchnorm:  # before the optimiser sees the model and before DDP wraps it
        model = distributed.convert_sync_batchnorm(model, device)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, len(train_loader))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    mixer = batch_mixer(config, model)
    # After the model's final device, layout and BatchNorm type: the average is a copy of it.
    ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=config.ema_warmup) if config.ema_decay > 0 else None
    result = FitResult(best_weights=out_dir / BEST_WEIGHTS)
    start_epoch, bad_epochs = 0, 0

    checkpoint_path = out_dir / LAST_CHECKPOINT
    state = None
    if resume and is_main and checkpoint_path.exists():
        # weights_only refuses anything but tensors and plain data.
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    # Rank 0 alone reads and sends the state to the others: every rank resumes from the same
    # checkpoint, and ranks on other machines need not see rank 0's disk.
    state = distributed.broadcast_state(state)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        # The earlier epochs validated (and saved as the best) the average, or the raw weights: the
        # rest of the run must deliver the same kind of model.
        if (ema is None) != ("ema" not in state):
            raise ResumeMismatch(
                f"{checkpoint_path} was written {'without' if ema else 'with'} --model-ema-decay; resume it "
                f"{'without' if ema else 'with'} it (or start a new run in another --out)")
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        _set_rng_state(state["rng"])
        start_epoch, bad_epochs = state["epoch"] + 1, state["bad_epochs"]
        result.history, result.best_epoch = list(state["history"]), state["best_epoch"]
        result.best_val_loss = state["best_val_loss"]
        log.info("resumed from %s at epoch %d", checkpoint_path, start_epoch + 1)
    elif resume:
        log.info("no checkpoint in %s; starting a new run", out_dir)

    body_trainable = None
    train_model = model
    for epoch in range(start_epoch, config.epochs):
        trainable = epoch >= config.freeze_epochs
        if trainable != body_trainable:
            if config.freeze_epochs:
                _set_body_trainable(model, trainable)
            # DDP fixes the set of parameters it reduces when wrapped: wrap again when it changes.
            train_model = distributed.wrap(model, device)
            body_trainable = trainable
        _set_epoch(train_loader, epoch)
        model.train()
        started = time.perf_counter()
        totals = torch.zeros(3, device=device, dtype=torch.float64)
        # Into a log file (a run in the background) the bar is written once a minute rather than
        # hidden, so a long epoch still shows how far it has got.
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=not is_main,
                   dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 60)
        for step, batch in enumerate(bar):
            if batch is None:
                continue
            x, y = (t.to(device, non_blocking=True) for t in batch[:2])  # (x, y[, index])
            if channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            # Mixed batches train on soft targets (label smoothing folded in); accuracy is still
            # counted against each image's own label. An odd last batch cannot be paired: unmixed.
            targets = None
            if mixer is not None and len(y) % 2 == 0:
                x, targets = mixer(x, y)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = train_model(x)
                loss = criterion(logits.float(), y) if targets is None else SOFT_TARGET_LOSS(logits.float(), targets)
            scaler.scale(loss).backward()
            if config.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:  # given a step, timm's average starts over from the weights (and warms up)
                ema.update(model, step=epoch * len(train_loader) + step if config.ema_warmup else None)
            totals += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double(),
                                   torch.tensor(float(len(y)), device=device, dtype=torch.float64)])
            # Checking every step would sync the GPU each time; every 50 steps stops a bad run soon
            # enough, and the end-of-epoch check below guards what gets saved.
            if step % 50 == 0 and not math.isfinite(loss.item()):
                raise TrainingDiverged(_diverged_message(epoch, step, config, checkpoint_path))
            if step % 20 == 0:  # shown at the bar's next refresh (mininterval), not written now
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        distributed.all_reduce_sum(totals)
        loss_sum, correct, count = totals.tolist()
        if not math.isfinite(loss_sum):
            raise TrainingDiverged(_diverged_message(epoch, len(train_loader), config, checkpoint_path))
        assert_finite(model)
        # With a moving average, it is the model this run delivers: its validation decides the best
        # epoch. The raw weights' figures are kept beside it, to show what the average added.
        delivered = model if ema is None else ema.module
        val_loss, val_acc = validate(delivered, val_loader, device, dtype, criterion)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(count, 1),
                  "train_acc": correct / max(count, 1), "val_loss": val_loss, "val_acc": val_acc,
                  "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - started,
                  "images_per_second": count / max(time.perf_counter() - started, 1e-9)}
        if ema is not None:
            record["raw_val_loss"], record["raw_val_acc"] = validate(model, val_loader, device, dtype, criterion)
        result.history.append(record)
        improved = val_loss < result.best_val_loss
        if improved:
            result.best_val_loss, result.best_epoch, bad_epochs = val_loss, epoch + 1, 0
        else:
            bad_epochs += 1
        if is_main:
            if improved:
                _atomic_save_weights(delivered, out_dir / BEST_WEIGHTS)
            _atomic_save({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "rng": _rng_state(), "epoch": epoch, "bad_epochs": bad_epochs,
                "history": result.history, "best_epoch": result.best_epoch,
                "best_val_loss": result.best_val_loss, "config": asdict(config),
                **({} if ema is None else {"ema": ema.module.state_dict()}),
            }, checkpoint_path)
            _write_metrics(out_dir, result.history)
            raw = ("" if ema is None else
                   f" (raw weights: loss {record['raw_val_loss']:.4f} acc {record['raw_val_acc']:.4f})")
            log.info("epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f%s  %.1fs (%.0f img/s)%s",
                     epoch + 1, config.epochs, record["train_loss"], record["train_acc"], val_loss,
                     val_acc, raw, record["seconds"], record["images_per_second"], "  *best" if improved else "")
        if on_epoch_end:
            on_epoch_end(record)
        if config.patience is not None and bad_epochs >= config.patience:
            result.stopped_early = True
            log.info("early stop: no better validation loss for %d epochs (best: epoch %d)",
                     bad_epochs, result.best_epoch)
            break
    if ema is not None:  # the model ends holding what the run delivers; last.pt keeps the raw weights
        model.load_state_dict(ema.module.state_dict())
    distributed.barrier()
    return result


def _diverged_message(epoch: int, step: int, config: TrainConfig, checkpoint: Path) -> str:
    where = f"; the last good checkpoint is {checkpoint}" if checkpoint.exists() else ""
    return (f"the training loss became NaN or infinite at epoch {epoch + 1}, step {step} "
            f"(lr {config.lr:g}); try a lower --lr, --grad-clip 1.0 or --amp off{where}")


def _write_metrics(out_dir: Path, history: list[dict]) -> None:
    """Rewrite the whole log each epoch, so a resumed run has no duplicated or orphan lines."""
    tmp = out_dir / (METRICS_LOG + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    os.replace(tmp, out_dir / METRICS_LOG)
    plot_history(history, out_dir / CURVES_PNG)
