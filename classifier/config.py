"""The one set of defaults: every setting of a run, declared once, and the files that override them.

`RunConfig` holds every option of `python -m classifier train` (and `training/finetune.py`) with its
default, as nanoGPT declares its settings at the top of train.py. The command lines build their
flags from it; `TrainConfig`, the part fit() reads, takes its defaults from it. Overrides come in
three layers, each over the one before (as timm's `--config` works):

    RunConfig defaults  <  a policy (--recipe fast: airbench's recipe)  <  a config file (--config
    recipes/NAME.yaml)  <  flags given on the command line

Settings left at None (and model "auto") are chosen from the data when the run starts, by
classifier.auto: the model, input size, batch size, epochs, learning rate, early stopping and the
run folder. A run writes its resolved configuration to OUT/config.yaml, which `--config` reads back:
any run can be repeated from its own folder.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from classifier.errors import ConfigError
# classifier.models and classifier.runtime (torch) are imported where used: `predict` reads this
# module's defaults through classifier.cli.common, and serves a model.onnx where torch is absent.

RUN_CONFIG_FILE = "config.yaml"  # a run's resolved configuration, in its --out folder


@dataclass
class RunConfig:
    # data
    data: str = "cifar10"
    data_dir: str | None = None
    image_dir: str | None = None
    image_column: str | None = None  # a Hugging Face dataset's image column (None: found by type or name)
    label_column: str | None = None  # and its label column
    classes: list[str] | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    # model
    model: str = "auto"  # "auto": a pretrained EfficientNet-Lite0 for photos and small data, fast_cnn for big small-image data
    pretrained: bool | None = None  # None: pretrained for timm models, from scratch for ours
    pretrained_source: str = "auto"
    model_args: dict = field(default_factory=dict)
    image_size: int | None = None  # None: the data's own size from scratch; fine-tuning: from the images and the time budget
    init_from: str | None = None  # a bundle (folder or Hub id) whose weights the run starts from
    init_from_revision: str | None = None  # with a Hub init_from: its branch, tag or commit (None: the latest)
    # optimisation (the part fit() reads: TrainConfig)
    epochs: int | None = None  # None: 10 from scratch; fine-tuning: from the data's size and the time budget
    batch_size: int | None = None  # None: 128 from scratch, 32 fine-tuning, smaller for a few hundred images
    lr: float | str | None = None  # None: default_lr(); "auto": the LR finder's suggestion
    lr_finder_steps: int | None = None  # steps of the range test lr="auto" runs (None: 100, fewer on a tight budget)
    time_budget: float | None = None  # minutes for the whole run; None: DEFAULT_TIME_BUDGET where the choice is ours
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    augment: str = "default"  # the training augmentation policy: classifier.transforms.AUGMENTS
    random_erasing: float = 0.0  # share of training images with a random box erased (timm's RandomErasing)
    mixup: float = 0.0
    cutmix: float = 0.0
    grad_clip: float | None = None
    ema_decay: float = 0.0
    ema_warmup: bool = False
    freeze_epochs: int | None = None  # None: 1 when fine-tuning a pretrained model, else 0
    backbone_lr_scale: float | None = None  # None: 0.1 when fine-tuning, else 1
    patience: int | None = None  # None: no early stopping, except on long fine-tuning runs (classifier.auto)
    amp: str = "auto"
    device: str = "auto"
    workers: int = min(4, os.cpu_count() or 1)
    loader: str = "auto"  # "memory": data as tensors on the device (classifier.fastdata); "workers": DataLoader
    seed: int = 0
    # outputs
    out: str | None = None  # None: runs/<data>-<model>-<date>-<time>, a new folder per run
    resume: bool = False
    tta: str = "none"  # test-time augmentation in the evaluation (classifier.tta), recorded in the bundle
    mistakes: int | None = None  # misclassified images eval/ keeps, most confident first; None: every one
    sync_batchnorm: bool = False
    recipe: str = "none"  # the policy that filled the options a user left out (see apply_recipe)
    command: str | None = None  # the command line that made this run, for the model card

    def resolved_pretrained(self) -> bool:
        from classifier.models import is_project_model

        return (not is_project_model(self.model)) if self.pretrained is None else self.pretrained

    def resolved_lr(self, fine_tuning: bool = False) -> float:
        if self.lr == "auto":
            raise ValueError("lr='auto' is resolved by run() with the learning-rate finder")
        if self.lr is not None:
            return self.lr
        return default_lr(self.optimizer, self.batch_size or DEFAULT_BATCH_SIZE, fine_tuning)


# What None means where classifier.auto does not choose (and what TrainConfig starts from).
DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 128
# The peak learning rate of a run that names none, per example of a batch, by optimiser: from
# scratch 0.05 (SGD) or 1e-3 (AdamW) at batch 128; fine-tuning a pretrained body under a new head
# (body at a tenth of it), SGD 0.01 at batch 32 (0.02, the measured default of fine-tuning
# EfficientNet-Lite0: benchmarks/own_photos.py) and AdamW 1e-3. Both follow the batch size linearly.
SCRATCH_LR = {"sgd": 0.05 / 128, "adamw": 1e-3 / 128}
FINETUNE_LR = {"sgd": 0.02 / 32, "adamw": 1e-3 / 32}
DEFAULT_TIME_BUDGET = 2.5  # minutes: what a run of ours aims to fit in, unless --time-budget says otherwise


def default_lr(optimizer: str, batch_size: int, fine_tuning: bool = False) -> float:
    """The measured default peak learning rate (see SCRATCH_LR, FINETUNE_LR)."""
    table = FINETUNE_LR if fine_tuning else SCRATCH_LR
    if optimizer not in table:
        raise ConfigError(f"unknown optimizer '{optimizer}' (sgd or adamw)")
    return table[optimizer] * batch_size


RUN_FIELDS = tuple(f.name for f in fields(RunConfig))
_DEFAULTS = RunConfig()


@dataclass
class TrainConfig:
    """The settings fit() reads, resolved: a number for every rate, a count for every epoch. Its
    defaults are RunConfig's for a model trained from scratch (TrainConfig.from_run)."""

    epochs: int = DEFAULT_EPOCHS
    lr: float = _DEFAULTS.resolved_lr()
    optimizer: str = _DEFAULTS.optimizer  # "sgd" or "adamw"
    momentum: float = _DEFAULTS.momentum
    nesterov: bool = _DEFAULTS.nesterov
    weight_decay: float = _DEFAULTS.weight_decay
    schedule: str = _DEFAULTS.schedule  # "onecycle", "cosine" (with linear warm-up) or "constant"
    warmup_epochs: float = _DEFAULTS.warmup_epochs
    label_smoothing: float = _DEFAULTS.label_smoothing
    # Mixing training images (timm's Mixup), a regulariser for long runs: alpha of the Beta
    # distribution the mixing weight is drawn from; 0 = off. With both, each batch is one or the other.
    mixup: float = _DEFAULTS.mixup  # blend two images and their labels
    cutmix: float = _DEFAULTS.cutmix  # paste a box of one image into another, labels by area
    grad_clip: float | None = _DEFAULTS.grad_clip  # max global gradient norm
    freeze_epochs: int = 0  # epochs that train the head alone, body frozen (fine-tuning)
    backbone_lr_scale: float = 1.0  # the body's learning rate relative to the head's
    patience: int | None = _DEFAULTS.patience  # early stopping: epochs without a better validation loss
    # An exponential moving average of the weights, updated every step (timm's --model-ema): it is
    # what gets validated, checkpointed as the best and returned; 0 = off. 0.9998 averages over about
    # the last 5,000 steps. Without warm-up the average starts at the initial weights and keeps a
    # share of them (0.9998**steps), which suits fine-tuning a good model; with warm-up (timm's
    # use_warmup) the first update replaces them and the decay grows as 1 - (1 + step)**(-2/3).
    ema_decay: float = _DEFAULTS.ema_decay
    ema_warmup: bool = _DEFAULTS.ema_warmup
    amp: str = _DEFAULTS.amp  # "auto" (bf16/fp16 on CUDA, off on CPU), "bf16", "fp16", "off"
    channels_last: bool = True  # NHWC batches and weights where it pays (runtime.channels_last_pays)
    seed: int = _DEFAULTS.seed

    @classmethod
    def from_run(cls, cfg: RunConfig, new_head: bool, lr: float | None = None) -> "TrainConfig":
        """The fit() settings of `cfg`; `lr` overrides cfg's (the LR finder's suggestion, say).

        `new_head`: a trained body under a new head (run.Prepared.new_head), which by default first
        trains the head alone for an epoch and then the body at a tenth of the head's rate.
        """
        shared = {f.name: getattr(cfg, f.name) for f in fields(cls) if f.name in RUN_FIELDS}
        shared.update(
            epochs=cfg.epochs if cfg.epochs is not None else DEFAULT_EPOCHS,
            lr=lr if lr is not None else cfg.resolved_lr(fine_tuning=new_head),
            freeze_epochs=cfg.freeze_epochs if cfg.freeze_epochs is not None else int(new_head),
            backbone_lr_scale=cfg.backbone_lr_scale if cfg.backbone_lr_scale is not None else (0.1 if new_head else 1.0))
        return cls(**shared)


# ----------------------------------------------------------------------------------------------
# Policies: settings that fill the options a user did not give (--recipe).
#
# "fast" is airbench94's recipe (KellerJordan/cifar10-airbench) for fast_cnn, in this library's
# terms: its learning rate 11.5 per 1024 examples with summed loss and Nesterov momentum 0.85 is
# lr 1.5 per 1024 examples of a mean loss (0.75 at batch 512), its weight decay 0.0153 per 1024
# examples is 1.33e-3 in PyTorch's coupled form, the warm-up peaks at 23% of the run; label
# smoothing 0.2, bf16 where the hardware has it, and test-time augmentation with mirror images
# and 1-pixel shifts. Batch 512 rather than 1024: more steps per epoch help a short run, and
# on a CPU a larger batch is no faster per image. It is code rather than a file because its rate
# follows the batch size and its warm-up the epochs, given or not.
RECIPES = {
    "fast": {"epochs": 10, "batch_size": 512, "optimizer": "sgd", "momentum": 0.85, "nesterov": True,
             "weight_decay": 1.33e-3, "schedule": "onecycle", "label_smoothing": 0.2, "tta": "flip-shift"},
}
FAST_LR_PER_EXAMPLE = 1.5 / 1024
FAST_WARMUP_SHARE = 0.23


def resolve_recipe(name: str, model: str, init_from: str | None = None) -> str:
    """"auto" is "fast" for fast_cnn trained from scratch (what it was made for) and "none" for
    every other model, and for a run that goes on from a trained bundle (--init-from). With model
    "auto" it stays "auto" until classifier.auto has chosen the model from the data."""
    if name == "auto" and model == "auto":
        return "auto"
    if name == "auto":
        return "fast" if model == "fast_cnn" and not init_from else "none"
    if name != "none" and name not in RECIPES:
        raise ConfigError(f"unknown recipe '{name}' (auto, none, {', '.join(RECIPES)})")
    return name


def apply_recipe(values: dict, given: set[str] | frozenset[str] = frozenset()) -> dict:
    """RunConfig fields `values` with their recipe's settings, except those named in `given` (the
    options a user set). values["recipe"] names it ("auto", "none" or a key of RECIPES); the
    learning rate follows the batch size and the warm-up the number of epochs, given or not."""
    name = resolve_recipe(values.get("recipe", "none"), values.get("model", RunConfig.model), values.get("init_from"))
    out = dict(values, recipe=name)
    if name in ("none", "auto"):  # "auto": not yet (the model is still to be chosen)
        return out
    from classifier.runtime import bf16_is_fast

    preset = dict(RECIPES[name], amp="bf16" if bf16_is_fast(str(values.get("device", "auto"))) else "auto")
    out.update({key: value for key, value in preset.items() if key not in given})
    if "lr" not in given:
        out["lr"] = FAST_LR_PER_EXAMPLE * out["batch_size"]
    if "warmup_epochs" not in given:
        out["warmup_epochs"] = round(FAST_WARMUP_SHARE * out["epochs"], 3)
    return out


# ----------------------------------------------------------------------------------------------
# Config files: a flat YAML mapping of RunConfig fields (hyphens or underscores)


def check_settings(values: dict, where: str) -> dict:
    """`values` with its keys as RunConfig field names; an unknown key is a ConfigError naming the
    closest settings."""
    checked = {}
    for key, value in values.items():
        name = str(key).strip().replace("-", "_")
        if name not in RUN_FIELDS or name == "command":
            close = difflib.get_close_matches(name, RUN_FIELDS, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{where}: unknown setting '{key}'{hint}")
        checked[name] = value
    return checked


def load_yaml(path: str | os.PathLike, what: str = "config file"):
    """The content of a YAML file (safe_load: plain data only); ConfigError if missing or malformed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None


def read_config_file(path: str | os.PathLike) -> dict:
    """The settings of a --config file (a YAML mapping of RunConfig fields), checked."""
    values = load_yaml(path)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config file is a mapping of settings (name: value), "
                          f"not a {type(values).__name__}")
    return check_settings(values, str(path))


def config_yaml(cfg: RunConfig) -> str:
    """`cfg` as a config file that --config reads back (the command line that made it as a comment)."""
    values = {k: v for k, v in asdict(cfg).items() if k not in ("command", "resume")}
    header = f"# {cfg.command}\n" if cfg.command else ""
    return header + yaml.safe_dump(values, sort_keys=False)


def write_run_config(cfg: RunConfig, out: str | os.PathLike) -> Path:
    """OUT/config.yaml: the resolved configuration of the run in `out`."""
    path = Path(out) / RUN_CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_yaml(cfg), encoding="utf-8")
    return path
