"""One training run from data to bundle: load data, build the model, fit, evaluate, save.

`RunConfig` holds every option of `training/finetune.py` with its default; `run()` is the flow the
command line, the hyperparameter search and the tests share:

    data.load_data -> models.create_model -> train.fit -> evaluate -> bundle.save_bundle
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, DistributedSampler

from classifier import distributed
from classifier.allocator import keep_freed_memory
from classifier.bundle import EVAL_DIR, Bundle, BundleError, load_bundle, make_config, save_bundle, stage_record
from classifier.data import (DataError, DataSplits, ImageDataset, build_transform, channel_stats, collate_skipping_broken,
                             load_data, materialize_small)
from classifier.evaluate import evaluate_model
from classifier.fastdata import memory_loaders, use_memory_loader
from classifier.hub import HubError
from classifier.images import ImageError
from classifier.lr_finder import LRFinderError, LRFinderResult, lr_range_test, plot_lr_finder
from classifier.model_card import write_model_card
from classifier.models import ModelError, count_parameters, create_model, is_project_model, zero_head
from classifier.train import ResumeMismatch, TrainConfig, TrainingDiverged, autocast_dtype, fit, pick_device

log = logging.getLogger(__name__)

# Mistakes in data, arguments or weights, which the command lines report as one readable line.
# Anything else is a bug, and its traceback is worth seeing.
USER_ERRORS = (DataError, ModelError, BundleError, ImageError, TrainingDiverged, ResumeMismatch, HubError,
               LRFinderError)
LR_FINDER_FILE = "lr_finder.json"
RUN_BUNDLE_DIR = "bundle"  # a run's bundle, OUT/bundle, beside its checkpoint OUT/last.pt


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
    init_from: str | None = None  # a bundle (folder or Hub id) whose weights the run starts from
    init_from_revision: str | None = None  # with a Hub init_from: its branch, tag or commit (None: the latest)
    # optimisation (see TrainConfig)
    epochs: int = 10
    batch_size: int = 128
    lr: float | str | None = None  # None: 0.05 SGD / 1e-3 AdamW (x batch_size/128); "auto": LR finder
    lr_finder_steps: int = 200  # steps of the range test that lr="auto" runs
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    grad_clip: float | None = None
    ema_decay: float = 0.0
    ema_warmup: bool = False
    freeze_epochs: int | None = None  # None: 1 when fine-tuning a pretrained model, else 0
    backbone_lr_scale: float | None = None  # None: 0.1 when fine-tuning, else 1
    patience: int | None = None
    amp: str = "auto"
    device: str = "auto"
    workers: int = min(4, os.cpu_count() or 1)
    loader: str = "auto"  # "memory": data as tensors on the device (classifier.fastdata); "workers": DataLoader
    seed: int = 0
    # outputs
    out: str = "runs/latest"
    resume: bool = False
    tta: str = "none"  # test-time augmentation in the evaluation (classifier.tta), recorded in the bundle
    mistakes: int = 200
    sync_batchnorm: bool = False
    recipe: str = "none"  # the recipe that filled the options a user left out (see apply_recipe)
    command: str | None = None  # the command line that made this run, for the model card

    def resolved_pretrained(self) -> bool:
        return (not is_project_model(self.model)) if self.pretrained is None else self.pretrained

    def resolved_lr(self) -> float:
        if self.lr == "auto":
            raise ValueError("lr='auto' is resolved by run() with the learning-rate finder")
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


def _data_config(cfg: RunConfig, data: DataSplits, pretrained: bool, source: Bundle | None = None) -> dict:
    """input size, mean, std, interpolation and crop for this run."""
    native = data.image_size()
    if source is not None or pretrained:
        # The normalisation the weights were trained with: the bundle's (--init-from) or timm's
        # pretrained config. The size may change. Defaults as Predictor (bundle) and timm have them.
        if source is not None:
            pcfg, interpolation = source.pretrained_cfg, "bilinear"
        else:
            registered = timm.models.get_pretrained_cfg(cfg.model)
            pcfg, interpolation = (registered.to_dict() if registered is not None else {}), "bicubic"
        size = cfg.image_size or int(pcfg.get("input_size", (3, 224, 224))[-1])
        return {"image_size": size, "mean": tuple(pcfg.get("mean", (0.485, 0.456, 0.406))),
                "std": tuple(pcfg.get("std", (0.229, 0.224, 0.225))),
                "interpolation": pcfg.get("interpolation", interpolation),
                "crop_pct": 1.0 if data.is_small else float(pcfg.get("crop_pct", 0.875))}
    channels = data.channels
    mean, std = channel_stats(data.train, channels, seed=cfg.seed)
    size = cfg.image_size or (max(native) if data.is_small else 224)
    return {"image_size": size, "mean": mean, "std": std, "interpolation": "bilinear",
            "crop_pct": 1.0 if data.is_small else 0.875}


def _loader(dataset, batch_size: int, *, train: bool, cfg: RunConfig, device: torch.device) -> DataLoader:
    # Training: one sampler for one process and for DDP alike. It permutes the whole dataset from
    # (seed, epoch) and deals it out rank, rank + N, ..., so the N per-rank batches of step k are
    # together batch k of that permutation: the same global batches for any N (and for a resumed run).
    # Evaluation: ShardSampler, whose shards have no padded repeats, so summed metrics are exact.
    if train:
        sampler = DistributedSampler(dataset, num_replicas=distributed.world_size(), rank=distributed.rank(),
                                     shuffle=True, seed=cfg.seed, drop_last=False)
    else:
        sampler = distributed.ShardSampler(dataset, num_replicas=distributed.world_size(), rank=distributed.rank())
    workers = cfg.workers
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=4 if workers else None, collate_fn=collate_skipping_broken,
                      drop_last=train and len(sampler) > batch_size)


def load_run_data(cfg: RunConfig) -> DataSplits:
    """The splits `cfg` names, small images decoded once (cached) and held in memory."""
    # Unpacking, downloading and decoding fill a cache on the local disk: under torchrun one process
    # per machine does it first and the others then read it, rather than all writing the same files.
    with distributed.local_main_first():
        data = load_data(cfg.data, data_dir=cfg.data_dir, image_dir=cfg.image_dir, classes=cfg.classes,
                         val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed)
        if len(data.val) == 0:
            # load_data allows it (a library user may only want train and test); a run does not.
            raise DataError("a run needs a validation split: the best epoch and the calibration temperature "
                            "are chosen on it. --val-fraction 0 leaves none; give a fraction above 0, or "
                            "data with a val/ folder")
        data = materialize_small(data)
    log.info("data %s: %d classes, %d train / %d val / %d test images, %s", data.name, data.num_classes,
             len(data.train), len(data.val), len(data.test), "x".join(map(str, data.image_size())))
    return data


@dataclass
class Prepared:
    """What a run trains on: the data, its data config, a fresh model and the three loaders."""

    data: DataSplits
    data_config: dict  # image_size, mean, std, interpolation, crop_pct
    model: torch.nn.Module
    model_args: dict  # as the model was built (with img_size for the fixed-size tutorial nets)
    in_chans: int
    pretrained: bool
    new_head: bool  # a trained body under a head that starts from zero: fine-tuning defaults apply
    parameters: int
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader
    started_from: dict | None = None  # with --init-from: that bundle's record (bundle.stage_record)


def prepare(cfg: RunConfig, device: torch.device, data: DataSplits | None = None,
            source: Bundle | None = None) -> Prepared:
    """Data, model and loaders for `cfg`. Pass `data` to reuse splits already loaded (a search), and
    `source` for the bundle of cfg.init_from when the caller has loaded it already."""
    pretrained = cfg.resolved_pretrained()
    data = data if data is not None else load_run_data(cfg)
    if source is None and cfg.init_from:
        source = load_bundle(cfg.init_from, revision=cfg.init_from_revision)
    dcfg = _data_config(cfg, data, pretrained, source)
    size = dcfg["image_size"]
    if source is not None:
        if cfg.model_args:
            raise BundleError(f"--model-args cannot change the model of --init-from {cfg.init_from}; leave them out")
        model, model_args, new_head = start_from_bundle(source, cfg.model, data.classes, size)
        in_chans = source.in_chans
    else:
        in_chans = 3 if pretrained else data.channels
        model_args = dict(cfg.model_args)
        registered = timm.models.get_pretrained_cfg(cfg.model)
        if registered is not None and registered.fixed_input_size and is_project_model(cfg.model):
            model_args.setdefault("img_size", size)  # the tutorial nets size their linear layers by it
        torch.manual_seed(cfg.seed)  # --seed fixes the initial weights too (DDP then copies rank 0's)
        model = create_model(cfg.model, num_classes=data.num_classes, in_chans=in_chans, pretrained=pretrained,
                             pretrained_source=cfg.pretrained_source, **model_args)
        new_head = pretrained
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
    if use_memory_loader(cfg.loader, data, device):
        # Small images held in memory: batches built on the device, no worker processes.
        loaders = memory_loaders(data, batch_size=per_rank, eval_batch_size=per_rank * 2, mean=dcfg["mean"],
                                 std=dcfg["std"], device=device, size=size, channels=in_chans,
                                 interpolation=dcfg["interpolation"], seed=cfg.seed)
    else:
        loaders = (_loader(dataset(data.train, True), per_rank, train=True, cfg=cfg, device=device),
                   _loader(dataset(data.val, False), per_rank * 2, train=False, cfg=cfg, device=device),
                   _loader(dataset(data.test, False), per_rank * 2, train=False, cfg=cfg, device=device))
    log.info("loader: %s", type(loaders[0]).__name__)
    return Prepared(data, dcfg, model, model_args, in_chans, pretrained, new_head, parameters, *loaders,
                    started_from=stage_record(source, cfg.init_from) if source is not None else None)


def start_from_bundle(source: Bundle, architecture: str, classes: list[str], size: int) -> tuple[torch.nn.Module, dict, bool]:
    """`source`'s model to train on (--init-from): (model, its model_args, whether its head is new).

    The same classes keep the whole model, head included: training goes on, at another resolution
    or for more epochs, say (fastai's progressive resizing). Other classes keep the body and start
    a new zero head, as fine-tuning a pretrained model does.
    """
    if source.architecture != architecture:
        raise BundleError(f"--init-from {source.path} holds a {source.architecture}, not a {architecture}: "
                          f"leave out --model, or name the bundle's architecture")
    model_args = {k: v for k, v in source.config.get("model_args", {}).items() if k != "in_chans"}
    if "img_size" in model_args and model_args["img_size"] != size:
        raise BundleError(f"{architecture} is built for {model_args['img_size']} px inputs only, not {size} px: "
                          f"leave out --image-size")
    model = source.model.train()
    new_head = source.label_names != list(classes)
    if new_head:
        model.reset_classifier(len(classes))
        zero_head(model)
    log.info("starting from the weights of %s%s", source.path,
             f" with a new head for {len(classes)} classes" if new_head else ", its head included")
    return model, model_args, new_head


# Recipes: settings that fill the options a user did not give (training/finetune.py --recipe).
# "fast" is airbench94's recipe (KellerJordan/cifar10-airbench) for fast_cnn, in this library's
# terms: its learning rate 11.5 per 1024 examples with summed loss and Nesterov momentum 0.85 is
# lr 1.5 per 1024 examples of a mean loss (0.75 at batch 512), its weight decay 0.0153 per 1024
# examples is 1.33e-3 in PyTorch's coupled form, the warm-up peaks at 23% of the run; label
# smoothing 0.2, bf16 where the hardware has it, and test-time augmentation with mirror images
# and 1-pixel shifts. Batch 512 rather than 1024: more steps per epoch help a short run, and
# on a CPU a larger batch is no faster per image.
RECIPES = {
    "fast": {"epochs": 10, "batch_size": 512, "optimizer": "sgd", "momentum": 0.85, "nesterov": True,
             "weight_decay": 1.33e-3, "schedule": "onecycle", "label_smoothing": 0.2, "tta": "flip-shift"},
}
FAST_LR_PER_EXAMPLE = 1.5 / 1024
FAST_WARMUP_SHARE = 0.23


def resolve_recipe(name: str, model: str, init_from: str | None = None) -> str:
    """"auto" is "fast" for fast_cnn trained from scratch (what it was made for) and "none" for
    every other model, and for a run that goes on from a trained bundle (--init-from)."""
    if name == "auto":
        return "fast" if model == "fast_cnn" and not init_from else "none"
    if name != "none" and name not in RECIPES:
        raise ValueError(f"unknown recipe '{name}' (auto, none, {', '.join(RECIPES)})")
    return name


def _bf16_is_fast(device: str) -> bool:
    """bf16 pays on CUDA GPUs that have it and on CPUs with bf16 instructions (AVX512-BF16, AMX)."""
    kind = pick_device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    if kind != "cpu":
        return False  # MPS and others: "auto" mixed precision (fp16) is what they do fast
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def apply_recipe(values: dict, given: set[str] | frozenset[str] = frozenset()) -> dict:
    """RunConfig fields `values` with their recipe's settings, except those named in `given` (the
    options a user set). values["recipe"] names it ("auto", "none" or a key of RECIPES); the
    learning rate follows the batch size and the warm-up the number of epochs, given or not."""
    name = resolve_recipe(values.get("recipe", "none"), values.get("model", RunConfig.model), values.get("init_from"))
    out = dict(values, recipe=name)
    if name == "none":
        return out
    preset = dict(RECIPES[name], amp="bf16" if _bf16_is_fast(str(values.get("device", "auto"))) else "auto")
    out.update({key: value for key, value in preset.items() if key not in given})
    if "lr" not in given:
        out["lr"] = FAST_LR_PER_EXAMPLE * out["batch_size"]
    if "warmup_epochs" not in given:
        out["warmup_epochs"] = round(FAST_WARMUP_SHARE * out["epochs"], 3)
    return out


def train_config(cfg: RunConfig, new_head: bool, lr: float | None = None) -> TrainConfig:
    """The fit() settings of `cfg`; `lr` overrides cfg's (the LR finder's suggestion, say).

    `new_head`: a trained body under a new head (Prepared.new_head), which by default first trains
    the head alone for an epoch and then the body at a tenth of the head's rate.
    """
    return TrainConfig(
        epochs=cfg.epochs, lr=lr if lr is not None else cfg.resolved_lr(), optimizer=cfg.optimizer,
        momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, schedule=cfg.schedule,
        warmup_epochs=cfg.warmup_epochs, label_smoothing=cfg.label_smoothing, mixup=cfg.mixup, cutmix=cfg.cutmix,
        grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay, ema_warmup=cfg.ema_warmup,
        freeze_epochs=cfg.freeze_epochs if cfg.freeze_epochs is not None else int(new_head),
        backbone_lr_scale=cfg.backbone_lr_scale if cfg.backbone_lr_scale is not None else (0.1 if new_head else 1.0),
        patience=cfg.patience, amp=cfg.amp, seed=cfg.seed)


def find_lr(cfg: RunConfig, setup: Prepared, device: torch.device, out: Path) -> LRFinderResult:
    """lr='auto': the range test's suggestion (classifier.lr_finder), its curve saved in `out`.

    A resumed run reuses the suggestion it started with; under DDP every rank tests its own shard
    and all use the geometric mean of the suggestions, so the ranks agree.
    """
    saved = out / LR_FINDER_FILE
    if cfg.resume and saved.exists():
        return LRFinderResult.load(saved)
    finder = lr_range_test(setup.model, setup.train_loader, train_config(cfg, setup.new_head, lr=1.0),
                           device=device, num_steps=cfg.lr_finder_steps)
    if distributed.is_distributed():
        log_lr = torch.tensor([math.log(finder.suggestion)], device=device, dtype=torch.float64)
        distributed.all_reduce_sum(log_lr)
        finder.suggestion = math.exp(float(log_lr) / distributed.world_size())
    if distributed.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        finder.save(saved)
        plot_lr_finder(finder, out / "lr_finder.png")
    log.info("learning-rate finder: %s suggests %.3g (valley %.3g, steepest %.3g, min/10 %.3g)",
             finder.method, finder.suggestion, finder.valley, finder.steepest, finder.minimum)
    return finder


def run(cfg: RunConfig) -> RunResult:
    """Train and evaluate as `cfg` says; writes checkpoints and logs to cfg.out, the bundle to cfg.out/bundle."""
    out = Path(cfg.out)
    device = pick_device(cfg.device)
    # One process on the CPU uses every core, unless OMP_NUM_THREADS says otherwise (to share the
    # machine with another job, say).
    if device.type == "cpu" and distributed.world_size() == 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    keep_freed_memory(device)  # 1.6x faster CPU epochs on glibc: see classifier/allocator.py
    setup = prepare(cfg, device)
    data, dcfg, model, model_args = setup.data, setup.data_config, setup.model, setup.model_args
    size, in_chans, pretrained, parameters = dcfg["image_size"], setup.in_chans, setup.pretrained, setup.parameters
    val_loader, test_loader = setup.val_loader, setup.test_loader

    finder = find_lr(cfg, setup, device, out) if cfg.lr == "auto" else None
    lr = finder.suggestion if finder else cfg.resolved_lr()
    result = fit(model, setup.train_loader, val_loader, train_config(cfg, setup.new_head, lr), out, device=device,
                 resume=cfg.resume, sync_batchnorm=cfg.sync_batchnorm)

    # Evaluate the best epoch by validation loss, not merely the last one.
    # Rank 0 wrote them and sends them: other machines need not see its disk.
    best = load_file(str(result.best_weights)) if distributed.is_main_process() else None
    model.load_state_dict(distributed.broadcast_state(best))
    evaluation = evaluate_model(model, val_loader, test_loader, data.classes, device,
                                autocast_dtype(device, cfg.amp), cfg.tta)
    metrics = evaluation.metrics
    metrics.update(best_epoch=result.best_epoch, epochs_trained=len(result.history),
                   stopped_early=result.stopped_early, train_seconds=float(sum(r["seconds"] for r in result.history)))
    bundle_dir = out / RUN_BUNDLE_DIR
    if distributed.is_main_process():
        project = {
            "dataset": data.name, "classes_selected": cfg.classes, "num_train": len(data.train),
            "num_val": len(data.val), "num_test": len(data.test), **evaluation.project_fields(),
            "parameters": parameters, "pretrained": pretrained,
            "base_model": f"timm/{cfg.model}" if pretrained else None,
            "training": {k: v for k, v in asdict(cfg).items() if k != "command"},
            "command": cfg.command,
        }
        if data.is_small and size > max(data.image_size()):
            project["source_image_size"] = list(data.image_size())
        if setup.started_from:
            project["started_from"] = setup.started_from
        if finder:  # training.lr says "auto"; this says what that meant
            project["lr_finder"] = finder.summary()
        config = make_config(model, architecture=cfg.model, label_names=data.classes, model_args=model_args
                             | {"in_chans": in_chans}, input_size=(in_chans, size, size), mean=dcfg["mean"],
                             std=dcfg["std"], interpolation=dcfg["interpolation"], crop_pct=dcfg["crop_pct"],
                             project=project)
        save_bundle(bundle_dir, model, config)
        evaluation.save(bundle_dir / EVAL_DIR, data, in_chans, cfg.mistakes, history=result.history)
        if finder and (out / "lr_finder.png").exists():
            shutil.copyfile(out / "lr_finder.png", bundle_dir / EVAL_DIR / "lr_finder.png")
        (out / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
        write_model_card(bundle_dir)  # README.md, from the files just written; last, so it cannot cost them
    distributed.barrier()
    return RunResult(bundle_dir, metrics, result.history, parameters)


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def summarize(result: RunResult) -> str:
    m = result.metrics
    cal = m["calibration"]
    return (f"test accuracy {m['accuracy']:.4f}  macro F1 {m['macro_f1']:.4f}  loss {m['loss']:.4f}  "
            f"ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f} (T={cal['temperature']:.3f})  "
            f"{result.parameters:,} parameters  bundle: {result.bundle_dir}")

