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
import pickle
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from tqdm.auto import tqdm

from classifier import distributed, files
from classifier.config import TrainConfig
from classifier.errors import CheckpointError, ResumeMismatch, TrainingDiverged
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
    resumes: list[dict] = field(default_factory=list)  # each --resume: the epoch it went on from, what changed


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


def _resume_remedy(checkpoint: Path) -> str:
    """What to do after a failed write: go on from the last whole checkpoint, if there is one."""
    if checkpoint.exists():
        return f"then run the same command with --resume: it goes on from {checkpoint}, which is whole"
    return "then run the same command again"


def _atomic_save(obj, path: Path) -> None:
    # A crash or a full disk mid-write leaves the previous checkpoint whole.
    files.save_torch(obj, path, "the checkpoint", _resume_remedy(path))


def _atomic_save_weights(model: nn.Module, path: Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    files.save_safetensors(state, path, "the best weights", _resume_remedy(path.with_name(LAST_CHECKPOINT)))


# ----------------------------------------------------------------------------------------------
# Reading a checkpoint back, and what may differ when a run is resumed

# Settings that may differ from the checkpoint's when a run is resumed: they change nothing it holds
# (early stopping's patience) or are derived from the machine (channels_last). `epochs` may grow
# where the schedule allows it (resume_changes); everything else must be as it was.
RESUME_MAY_DIFFER = frozenset({"patience", "channels_last"})
# Schedules whose learning rate is a function of the progress through --epochs, recomputed from the
# run's settings: a larger --epochs stretches what is left of them. OneCycleLR keeps its total step
# count in its own state, so a onecycle run cannot be extended.
EXTENSIBLE_SCHEDULES = ("cosine", "constant")


def read_checkpoint(path: Path, mmap: bool = False) -> dict:
    """A checkpoint written by fit(), read with weights_only (tensors and plain data only). One that
    is cut short, damaged or foreign is a CheckpointError saying what to do, never "retry unsafely"."""
    remedy = ("delete it (or move it away) to start the run over, or put back a good copy to resume from "
              "it; start a run elsewhere with another --out")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        # torch's message suggests weights_only=False, which would run whatever the file holds.
        raise CheckpointError(f"{path} holds objects other than tensors and plain data, so it was not loaded (it "
                              f"was not written by this project's training, and loading it could run code): "
                              f"{remedy}") from None
    except Exception as exc:  # noqa: BLE001 - any failure to read it means it is damaged; said with the path
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"{path} is damaged: cut short, or not a checkpoint ({reason}): {remedy}") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "scheduler", "epoch"} <= set(state):
        raise CheckpointError(f"{path} is not a checkpoint of this project's training (no model, optimizer, "
                              f"scheduler and epoch): {remedy}")
    return state


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _same(a, b) -> bool:
    """Equal as config.yaml would hold them (a tuple and a list of the same numbers are)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def resume_changes(state: dict, config: TrainConfig, settings: dict | None, steps_per_epoch: int,
                   path: Path) -> dict:
    """{setting: [checkpoint's, run's]} of the deliberate changes a resumed run may make (a larger
    --epochs where the schedule allows it); a ResumeMismatch naming every other difference.

    `settings` are the run's own settings that shape the checkpoint beyond TrainConfig (model, batch
    size, data, ...; run.resume_settings), recorded in it by fit(). Checkpoints written before they
    were recorded are compared on what they hold.
    """
    recorded, current = dict(state.get("config", {})), asdict(config)
    differ, allowed, notes = [], {}, []
    old_epochs = recorded.get("epochs", config.epochs)
    extending = config.epochs > old_epochs and config.schedule in EXTENSIBLE_SCHEDULES
    # A recipe's warm-up follows --epochs; once both warm-ups are over, it only shapes what is left
    # of the schedule, as the larger --epochs does.
    done = state["epoch"] + 1
    warmup_over = done >= max(recorded.get("warmup_epochs", 0), config.warmup_epochs)
    may_differ = RESUME_MAY_DIFFER | {"epochs"} | ({"warmup_epochs"} if extending and warmup_over else set())
    for key in sorted(set(recorded) & set(current) - may_differ):
        if not _same(recorded[key], current[key]):
            differ.append((key, recorded[key], current[key]))
    if extending and warmup_over and not _same(recorded.get("warmup_epochs"), config.warmup_epochs):
        allowed["warmup_epochs"] = [recorded.get("warmup_epochs"), config.warmup_epochs]
    if old_epochs != config.epochs:
        if extending:
            allowed["epochs"] = [old_epochs, config.epochs]
        else:
            differ.append(("epochs", old_epochs, config.epochs))
            notes.append(f"--epochs cannot change on resume with the {config.schedule} schedule, which was laid "
                         f"out for {old_epochs} epochs: to train on, finish this run and start another from its "
                         f"bundle (--init-from OUT/bundle)" if config.schedule not in EXTENSIBLE_SCHEDULES else
                         "--epochs may only grow")
    recorded_settings = dict(state.get("settings") or {})
    for key in sorted(set(recorded_settings) & set(settings or {})):
        if not _same(recorded_settings[key], settings[key]):
            differ.append((key, recorded_settings[key], settings[key]))
    old_steps = state.get("steps_per_epoch")
    if old_steps is not None and old_steps != steps_per_epoch:
        differ.append(("batches per epoch", old_steps, steps_per_epoch))
        notes.append("the training data changed since the checkpoint (files added or removed?)")
    if differ:
        changes = ", ".join(f"{key} {_shown(old)} -> {_shown(new)}" for key, old, new in differ)
        note = f" ({'; '.join(notes)})" if notes else ""
        raise ResumeMismatch(f"{path} was written with other settings than this run's: {changes}{note}; resume "
                             f"with the checkpoint's settings (OUT/config.yaml), or start a new run in another --out")
    return allowed


def check_resumable(path: Path, config: TrainConfig, settings: dict | None, steps_per_epoch: int) -> None:
    """Refuse to resume from `path` (a CheckpointError or ResumeMismatch on every rank) before anything
    of the run is written; nothing is done when there is no checkpoint yet. Rank 0 reads it."""
    error = None
    if distributed.is_main_process() and path.exists():
        try:
            resume_changes(read_checkpoint(path, mmap=True), config, settings, steps_per_epoch, path)
        except (CheckpointError, ResumeMismatch) as exc:
            error = {"type": type(exc).__name__, "message": str(exc)}
    _raise_agreed(error)


def _raise_agreed(error: dict | None) -> None:
    """Rank 0's refusal raised on every rank (a rank left waiting would stall until the timeout)."""
    error = distributed.broadcast_state(error)
    if error is not None:
        raise {"CheckpointError": CheckpointError, "ResumeMismatch": ResumeMismatch}[error["type"]](error["message"])


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
    settings: dict | None = None,
) -> FitResult:
    """Train `model` in place; at the end it holds the weights of the last epoch trained (their moving
    average, with config.ema_decay).

    The best weights by validation loss are in out_dir/best.safetensors (FitResult.best_weights).
    `on_epoch_end` is called with each epoch's record after its checkpoint is written. `settings`:
    the caller's settings that shape the checkpoint beyond `config` (run.resume_settings), recorded
    in it and compared on resume with `config` (resume_changes).
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
    state, error = None, None
    if resume and is_main and checkpoint_path.exists():
        try:
            state = read_checkpoint(checkpoint_path)
            state["changes"] = resume_changes(state, config, settings, len(train_loader), checkpoint_path)
        except (CheckpointError, ResumeMismatch) as exc:
            error = {"type": type(exc).__name__, "message": str(exc)}
    _raise_agreed(error)
    # Rank 0 alone reads and sends the state to the others: every rank resumes from the same
    # checkpoint, and ranks on other machines need not see rank 0's disk.
    state = distributed.broadcast_state(state)
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as exc:  # what no recorded setting explained
            raise ResumeMismatch(f"{checkpoint_path} does not fit this run's model or optimiser "
                                 f"({str(exc).splitlines()[0][:200]}); resume with the settings it was written "
                                 f"with, or start a new run in another --out") from None
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
        result.resumes = [*state.get("resumes", []), {"at_epoch": start_epoch, "changed": state["changes"]}]
        log.info("resumed from %s at epoch %d", checkpoint_path, start_epoch + 1)
        for key, (old, new) in state["changes"].items():
            log.info("resumed with %s %s instead of the checkpoint's %s: the %s schedule follows it from here "
                     "(recorded in the bundle)", key, new, old, config.schedule)
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
            distributed.note_progress(epoch, step)  # a rank that stalls is named with where it was
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
        try:
            assert_finite(model)  # a BatchNorm statistic can overflow while the loss stays finite
        except FloatingPointError as exc:
            raise TrainingDiverged(f"{exc} after epoch {epoch + 1}, and nothing of this epoch was saved; "
                                   f"{_diverged_remedy(config, checkpoint_path)}") from None
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
                "settings": settings, "steps_per_epoch": len(train_loader), "resumes": result.resumes,
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


def _diverged_remedy(config: TrainConfig, checkpoint: Path) -> str:
    where = f"; the last good checkpoint is {checkpoint}" if checkpoint.exists() else ""
    return f"try a lower --lr (it was {config.lr:g}), --grad-clip 1.0 or --amp off{where}"


def _diverged_message(epoch: int, step: int, config: TrainConfig, checkpoint: Path) -> str:
    return (f"the training loss became NaN or infinite at epoch {epoch + 1}, step {step}; "
            f"{_diverged_remedy(config, checkpoint)}")


def collapse_message(record: dict, val_targets: np.ndarray, num_classes: int, lr: float) -> str | None:
    """Why the epoch of `record` learned nothing, or None when it did.

    Collapsed: a validation loss no better than guessing uniformly (ln K, where a model that gives
    every class the same probability sits) and an accuracy not above always answering the most
    common class by more than two standard errors. A model that learned a little beats one of the two.
    """
    n = len(val_targets)
    if n == 0 or num_classes < 2:
        return None
    majority = float(np.bincount(val_targets, minlength=num_classes).max()) / n
    margin = 2 * math.sqrt(majority * (1 - majority) / n)
    uniform_loss = math.log(num_classes)
    if record["val_loss"] < 0.99 * uniform_loss or record["val_acc"] > majority + margin:
        return None
    return (f"training collapsed: its best epoch ({record['epoch']}) scores {record['val_acc']:.3f} on the {n} "
            f"validation images, no better than chance (always answering the most common class scores "
            f"{majority:.3f}), with a loss of {record['val_loss']:.3f} (guessing evenly: ln {num_classes} = "
            f"{uniform_loss:.3f}); the learning rate {lr:g} is likely too high: try a lower --lr, or --lr auto")


def _write_metrics(out_dir: Path, history: list[dict]) -> None:
    """Rewrite the whole log each epoch, so a resumed run has no duplicated or orphan lines."""
    remedy = _resume_remedy(out_dir / LAST_CHECKPOINT)
    files.write_text(out_dir / METRICS_LOG, "".join(json.dumps(r) + "\n" for r in history), "the metrics log", remedy)
    with files.mapped_errors(out_dir / CURVES_PNG, "the training curves", remedy):
        plot_history(history, out_dir / CURVES_PNG)
