"""One training run from data to bundle: load data, build the model, fit, evaluate, save.

`RunConfig` holds every option of `training/finetune.py` with its default; `run()` is the flow the
command line, the hyperparameter search and the tests share:

    data.load_data -> models.create_model -> train.fit -> evaluate -> bundle.save_bundle
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, DistributedSampler

from classifier import distributed
from classifier.bundle import EVAL_DIR, make_config, save_bundle
from classifier.data import (DataSplits, ImageDataset, build_transform, channel_stats, collate_skipping_broken,
                             load_data, materialize_small)
from classifier.evaluate import (calibrated_metrics, predict_logits, rank_mistakes, sample_predictions,
                                 save_report)
from classifier.models import count_parameters, create_model, is_project_model
from classifier.train import TrainConfig, autocast_dtype, fit, pick_device

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
    # data
    data: str = "cifar10"
    data_dir: str | None = None
    image_dir: str | None = None
    classes: list[str] | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    # model
    model: str = "fast_cnn"
    pretrained: bool | None = None  # None: pretrained for timm models, from scratch for ours
    pretrained_source: str = "auto"
    model_args: dict = field(default_factory=dict)
    image_size: int | None = None  # None: the data's own size from scratch, the model's when pretrained
    # optimisation (see TrainConfig)
    epochs: int = 10
    batch_size: int = 128
    lr: float | None = None  # None: 0.05 for SGD, 1e-3 for AdamW (scaled by batch_size / 128)
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    freeze_epochs: int | None = None  # None: 1 when fine-tuning a pretrained model, else 0
    backbone_lr_scale: float | None = None  # None: 0.1 when fine-tuning, else 1
    patience: int | None = None
    amp: str = "auto"
    device: str = "auto"
    workers: int = min(4, os.cpu_count() or 1)
    seed: int = 0
    # outputs
    out: str = "runs/latest"
    resume: bool = False
    tta: bool = False
    mistakes: int = 200
    sync_batchnorm: bool = False
    command: str | None = None  # the command line that made this run, for the model card

    def resolved_pretrained(self) -> bool:
        return (not is_project_model(self.model)) if self.pretrained is None else self.pretrained

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        base = 0.05 if self.optimizer == "sgd" else 1e-3
        return base * self.batch_size / 128


@dataclass
class RunResult:
    bundle_dir: Path
    metrics: dict
    history: list[dict]
    parameters: int


def _data_config(cfg: RunConfig, data: DataSplits, pretrained: bool) -> dict:
    """input size, mean, std, interpolation and crop for this run."""
    native = data.image_size()
    if pretrained:
        pcfg = timm.models.get_pretrained_cfg(cfg.model)
        pcfg = pcfg.to_dict() if pcfg is not None else {}
        size = cfg.image_size or int(pcfg.get("input_size", (3, 224, 224))[-1])
        return {"image_size": size, "mean": tuple(pcfg.get("mean", (0.485, 0.456, 0.406))),
                "std": tuple(pcfg.get("std", (0.229, 0.224, 0.225))),
                "interpolation": pcfg.get("interpolation", "bicubic"),
                "crop_pct": 1.0 if data.is_small else float(pcfg.get("crop_pct", 0.875))}
    channels = data.channels
    mean, std = channel_stats(data.train, channels, seed=cfg.seed)
    size = cfg.image_size or (max(native) if data.is_small else 224)
    return {"image_size": size, "mean": mean, "std": std, "interpolation": "bilinear",
            "crop_pct": 1.0 if data.is_small else 0.875}


def _loader(dataset, batch_size: int, *, train: bool, cfg: RunConfig, device: torch.device) -> DataLoader:
    # One sampler for one process and for DDP alike: each rank gets its shard, reshuffled per epoch
    # from (seed, epoch), which is also what makes a resumed run see the same order.
    sampler = DistributedSampler(dataset, num_replicas=distributed.world_size(), rank=distributed.rank(),
                                 shuffle=train, seed=cfg.seed, drop_last=False)
    workers = cfg.workers
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=4 if workers else None, collate_fn=collate_skipping_broken,
                      drop_last=train and len(dataset) // distributed.world_size() > batch_size)


def run(cfg: RunConfig) -> RunResult:
    """Train and evaluate as `cfg` says; writes checkpoints and logs to cfg.out, the bundle to cfg.out/bundle."""
    out = Path(cfg.out)
    device = pick_device(cfg.device)
    if device.type == "cpu" and distributed.world_size() == 1:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    pretrained = cfg.resolved_pretrained()

    data = load_data(cfg.data, data_dir=cfg.data_dir, image_dir=cfg.image_dir, classes=cfg.classes,
                     val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed)
    data = materialize_small(data)  # small images: decoded once, cached, then held in memory
    log.info("data %s: %d classes, %d train / %d val / %d test images, %s", data.name, data.num_classes,
             len(data.train), len(data.val), len(data.test), "x".join(map(str, data.image_size())))

    dcfg = _data_config(cfg, data, pretrained)
    size = dcfg["image_size"]
    in_chans = 3 if pretrained else data.channels
    model_args = dict(cfg.model_args)
    registered = timm.models.get_pretrained_cfg(cfg.model)
    if registered is not None and registered.fixed_input_size and is_project_model(cfg.model):
        model_args.setdefault("img_size", size)  # the tutorial nets size their linear layers by it
    model = create_model(cfg.model, num_classes=data.num_classes, in_chans=in_chans, pretrained=pretrained,
                         pretrained_source=cfg.pretrained_source, **model_args)
    parameters = count_parameters(model)
    log.info("model %s: %s parameters%s", cfg.model, f"{parameters:,}", " (pretrained)" if pretrained else "")

    def dataset(split, train: bool):
        transform = build_transform(size, dcfg["mean"], dcfg["std"], train=train, small=data.is_small,
                                    interpolation=dcfg["interpolation"], crop_pct=dcfg["crop_pct"])
        return ImageDataset(split, transform, in_chans)

    world = distributed.world_size()
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    per_rank = cfg.batch_size // world
    train_loader = _loader(dataset(data.train, True), per_rank, train=True, cfg=cfg, device=device)
    val_loader = _loader(dataset(data.val, False), per_rank * 2, train=False, cfg=cfg, device=device)
    test_loader = _loader(dataset(data.test, False), per_rank * 2, train=False, cfg=cfg, device=device)

    train_config = TrainConfig(
        epochs=cfg.epochs, lr=cfg.resolved_lr(), optimizer=cfg.optimizer, momentum=cfg.momentum,
        nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, schedule=cfg.schedule,
        warmup_epochs=cfg.warmup_epochs, label_smoothing=cfg.label_smoothing, grad_clip=cfg.grad_clip,
        freeze_epochs=cfg.freeze_epochs if cfg.freeze_epochs is not None else int(pretrained),
        backbone_lr_scale=cfg.backbone_lr_scale if cfg.backbone_lr_scale is not None else (0.1 if pretrained else 1.0),
        patience=cfg.patience, amp=cfg.amp, seed=cfg.seed)
    result = fit(model, train_loader, val_loader, train_config, out, device=device, resume=cfg.resume,
                 sync_batchnorm=cfg.sync_batchnorm)

    # Evaluate the best epoch by validation loss, not merely the last one.
    model.load_state_dict(load_file(str(result.best_weights), device=str(device)))
    dtype = autocast_dtype(device, cfg.amp)
    val_logits, val_targets, _ = predict_logits(model, val_loader, device, dtype)
    test_logits, test_targets, test_indices = predict_logits(model, test_loader, device, dtype)
    if cfg.tta:
        flipped = _FlipModel(model)
        test_logits = (test_logits + predict_logits(flipped, test_loader, device, dtype)[0]) / 2
        val_logits = (val_logits + predict_logits(flipped, val_loader, device, dtype)[0]) / 2
    metrics = calibrated_metrics(test_logits, test_targets, val_logits, val_targets, data.classes)
    metrics.update(split="test", best_epoch=result.best_epoch, epochs_trained=len(result.history),
                   stopped_early=result.stopped_early, tta=cfg.tta,
                   train_seconds=float(sum(r["seconds"] for r in result.history)))
    bundle_dir = out / "bundle"
    if distributed.is_main_process():
        temperature = metrics["calibration"]["temperature"]
        project = {
            "dataset": data.name, "classes_selected": cfg.classes, "num_train": len(data.train),
            "num_val": len(data.val), "num_test": len(data.test), "temperature": temperature,
            "metrics": {k: metrics[k] for k in ("accuracy", "loss", "macro_f1", "ece", "num_samples")}
                       | {"ece_before_calibration": metrics["calibration"]["ece_before"], "split": "test"},
            "parameters": parameters, "pretrained": pretrained, "tta": cfg.tta,
            "base_model": f"timm/{cfg.model}" if pretrained else None,
            "training": {k: v for k, v in asdict(cfg).items() if k != "command"},
            "command": cfg.command,
        }
        if data.is_small and size > max(data.image_size()):
            project["source_image_size"] = list(data.image_size())
        config = make_config(model, architecture=cfg.model, label_names=data.classes, model_args=model_args
                             | {"in_chans": in_chans}, input_size=(in_chans, size, size), mean=dcfg["mean"],
                             std=dcfg["std"], interpolation=dcfg["interpolation"], crop_pct=dcfg["crop_pct"],
                             project=project)
        save_bundle(bundle_dir, model, config)
        mistakes = rank_mistakes(test_logits, test_targets, test_indices, data.classes, temperature, cfg.mistakes)
        samples = sample_predictions(test_logits, test_targets, test_indices, data.classes, temperature)
        save_report(bundle_dir / EVAL_DIR, metrics, mistakes, data.test, data.classes, in_chans,
                    history=result.history, samples=samples)
        (out / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
    distributed.barrier()
    return RunResult(bundle_dir, metrics, result.history, parameters)


class _FlipModel(torch.nn.Module):
    """The model applied to mirror images: test-time augmentation by horizontal flip."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.flip(-1))


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def summarize(result: RunResult) -> str:
    m = result.metrics
    cal = m["calibration"]
    return (f"test accuracy {m['accuracy']:.4f}  macro F1 {m['macro_f1']:.4f}  loss {m['loss']:.4f}  "
            f"ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f} (T={cal['temperature']:.3f})  "
            f"{result.parameters:,} parameters  bundle: {result.bundle_dir}")

