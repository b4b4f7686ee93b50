"""A trained model as a folder: model.safetensors, config.json (timm's Hub layout) and eval/.

The same folder is what `load_bundle` reads from disk or from the Hub, what the app serves, and what
`timm.create_model("local-dir:<folder>", pretrained=True)` (or "hf-hub:owner/name" once pushed)
loads with no code of ours beyond the registration of our own CNNs. This module owns the format:
every file name in it, how it is read, written and checked, and the preprocessing a bundle's model
expects (Bundle.eval_transform, built by classifier.transforms from config.json alone).

    model.safetensors     the weights (never a pickle)
    model.onnx, onnx.json optional: the model exported for onnxruntime (classifier.export)
    examples/             optional: example photos for the card's Hub widget
    config.json           architecture, label_names, model_args, pretrained_cfg (input size, mean,
                          std, interpolation, crop_pct), and this project's fields under "classifier"
    README.md             the model card (classifier.model_card)
    eval/                 metrics.json, mistakes.json + mistakes/, confusion_matrix.{json,png},
                          samples.png, curves.png + history.json: what the app and the card show
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import PIL

# torch, timm and the modules built on them are imported where a model is built or saved, not here:
# the app serving a model.onnx reads a bundle's config, eval/ and card without torch installed.
import classifier
from classifier import files, hub
from classifier.errors import BundleError
from classifier.onnx_runtime import INFO_FILE as ONNX_INFO_FILE
from classifier.onnx_runtime import ONNX_FILE
from classifier.tta import tta_mode

if TYPE_CHECKING:
    import torch
    from torch import nn

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
EVAL_DIR = "eval"
# In eval/:
METRICS_FILE = "metrics.json"  # the evaluation's figures (evaluate.compute_metrics)
MISTAKES_FILE = "mistakes.json"  # every kept misclassified image, worst first, with its thumbnail in:
MISTAKES_DIR = "mistakes"
CONFUSION_JSON, CONFUSION_PNG = "confusion_matrix.json", "confusion_matrix.png"
SAMPLES_PNG = "samples.png"  # a grid of predictions, right and wrong
CURVES_PNG, HISTORY_FILE = "curves.png", "history.json"  # the training curves and their figures
LR_FINDER_PNG = "lr_finder.png"  # with --lr auto: the range test's curve
# In config.json's "classifier" section: the out-of-distribution threshold fitted at evaluation time
# (classifier.ood): {"score": "energy", "threshold": float, "keep": share of validation images kept}.
OOD_FIELD = "ood"
EXAMPLES_DIR = "examples"  # optional: the bundle's own example photos, which its card's Hub widget offers
# What a bundle is, as file patterns: what is downloaded from the Hub and pushed to it. model.onnx
# (and onnx.json) where `python -m classifier export` wrote one: the card may name it as the way to load
# the model without this project (classifier.model_card).
BUNDLE_PATTERNS = [CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, ONNX_FILE, ONNX_INFO_FILE, f"{EVAL_DIR}/*", f"{EVAL_DIR}/**",
                   f"{EXAMPLES_DIR}/*"]
FORMAT_VERSION = 1
# What a bundle's input may be, checked on load: one side beyond MAX_INPUT_SIDE px is a damaged or
# hostile config.json (input_size 100000 made the first prediction grow to 23.7 GB), not a classifier
# (timm's largest pretrained inputs are about 1,000 px).
MIN_INPUT_SIDE, MAX_INPUT_SIDE = 8, 2048
CROP_PCT_RANGE = (0.25, 1.0)  # below, the eval resize (size / crop_pct) would grow without bound
# Where a timm pretrained_cfg points at its original weights: a bundle's config must not, or timm
# would fetch the ImageNet weights instead of ours.
_WEIGHT_SOURCE_KEYS = ("url", "hf_hub_id", "hf_hub_filename", "file", "state_dict", "source", "tag",
                       "custom_load", "hf_hub_revision")


@dataclass
class Bundle:
    model: nn.Module | None  # None: read by read_bundle, for serving its model.onnx instead
    config: dict
    path: Path

    @property
    def architecture(self) -> str:
        return self.config["architecture"]

    @property
    def label_names(self) -> list[str]:
        return list(self.config["label_names"])

    @property
    def pretrained_cfg(self) -> dict:
        return self.config["pretrained_cfg"]

    @property
    def project(self) -> dict:
        """This project's own fields: dataset, metrics, temperature, training, versions."""
        return self.config.get("classifier", {})

    @property
    def temperature(self) -> float:
        return float(self.project.get("temperature", 1.0))

    @property
    def tta(self) -> str:
        """The test-time augmentation its metrics were measured with (classifier.tta)."""
        return tta_mode(self.project.get("tta"))

    @property
    def ood_threshold(self) -> float | None:
        """The energy below which an image is probably none of the classes (classifier.ood), or
        None for a bundle evaluated before there was one: then nothing is ever flagged."""
        record = self.project.get(OOD_FIELD) or {}
        value = record.get("threshold")
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    @property
    def in_chans(self) -> int:
        return int(self.pretrained_cfg["input_size"][0])

    def eval_path(self, name: str = "") -> Path:
        return self.path / EVAL_DIR / name

    @property
    def source_image_size(self) -> list[int] | None:
        """(height, width) of the small images it learned from, when they were upscaled in training."""
        return self.project.get("source_image_size")

    def eval_transform(self):
        """THE preprocessing of this model (classifier.transforms.eval_transform), from config.json alone."""
        from classifier.transforms import eval_transform

        return eval_transform(self.pretrained_cfg, self.source_image_size)

    def eval_metrics(self) -> dict | None:
        path = self.eval_path(METRICS_FILE)
        return json.loads(path.read_text()) if path.exists() else None

    def metrics(self) -> dict:
        """The test metrics: eval/metrics.json, else the summary config.json keeps (a bundle whose
        eval/ was left out, e.g. one pushed without it)."""
        return self.eval_metrics() or self.project.get("metrics", {})


def stage_record(source: Bundle, location: str | os.PathLike) -> dict:
    """What a run started from `source` (--init-from `location`) keeps of it: where it was, how it
    was made and how it scored, with the stages before it, so a bundle trained in stages says how
    to redo them. `location` is kept as given: for a Hub id, `source.path` is a folder in this
    machine's cache, useless elsewhere; the commit it held (its snapshot folder's name) is kept."""
    project = source.project
    metrics = source.metrics()
    record = {"bundle": str(location), "input_size": list(source.pretrained_cfg["input_size"]),
              "command": project.get("command"), "accuracy": metrics.get("accuracy"),
              "train_seconds": metrics.get("train_seconds")}
    if is_hub_id(location):
        record["revision"] = source.path.name
    if project.get("started_from"):
        record["started_from"] = project["started_from"]
    return record


def lineage(project: dict) -> list[dict]:
    """The stages a bundle was trained in before its own run (stage_record), earliest first."""
    stages, stage = [], project.get("started_from")
    while stage:
        stages.append(stage)
        stage = stage.get("started_from")
    return stages[::-1]


def library_versions() -> dict:
    import timm
    import torch
    import torchvision

    return {"classifier": classifier.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "pillow": PIL.__version__, "python": platform.python_version()}


def make_config(model: nn.Module, *, architecture: str, label_names: Sequence[str], model_args: dict,
                input_size: Sequence[int], mean: Sequence[float], std: Sequence[float],
                interpolation: str, crop_pct: float, project: dict | None = None) -> dict:
    """config.json in timm's layout, with the data config the model was trained with."""
    pretrained_cfg = {k: v for k, v in dict(getattr(model, "pretrained_cfg", {}) or {}).items()
                      if k not in _WEIGHT_SOURCE_KEYS and v is not None}
    pretrained_cfg.update(input_size=list(input_size), mean=list(mean), std=list(std),
                          interpolation=interpolation, crop_pct=crop_pct, num_classes=len(label_names))
    for key in ("test_input_size", "test_crop_pct", "min_input_size"):
        pretrained_cfg.pop(key, None)  # they describe the ImageNet weights, not ours
    return {
        "architecture": architecture,
        "num_classes": len(label_names),
        "num_features": int(getattr(model, "num_features", 0)),
        "label_names": list(label_names),
        "model_args": dict(model_args),
        "pretrained_cfg": pretrained_cfg,
        "classifier": {"format_version": FORMAT_VERSION, "versions": library_versions(), **(project or {})},
    }


def save_bundle(path: str | os.PathLike, model: nn.Module, config: dict) -> Path:
    """Write weights and config; the eval/ folder is written beside them by evaluate.save_report."""
    import torch

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise BundleError(f"refusing to save: weight {name} holds NaN or infinite values")
    files.save_safetensors(state, path / WEIGHTS_FILE, "the bundle's weights", metadata={"format": "pt"})
    write_config(path, config)
    return path


def write_config(path: str | os.PathLike, config: dict) -> None:
    """config.json alone: save_bundle's, and an evaluation's that leaves the weights as they are."""
    files.write_text(Path(path) / CONFIG_FILE, json.dumps(config, indent=2), "the bundle's config.json")


def _finite_numbers(values, count: int) -> bool:
    return (isinstance(values, (list, tuple)) and len(values) == count
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values))


def _check_preprocessing(config_path: Path, pcfg: dict) -> None:
    """A pretrained_cfg the eval transform can follow with bounded memory, or a BundleError saying what
    is wrong: preprocessing is built from it for every image, before the model sees any."""
    size = pcfg["input_size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(type(v) is int for v in size)):
        raise BundleError(f"{config_path}: input_size must be [channels, height, width], not {size!r}")
    channels, height, width = size
    if channels not in (1, 3):
        raise BundleError(f"{config_path}: input_size asks for {channels} channels; a bundle takes 1 (grey) or 3 "
                          f"(RGB)")
    if not (MIN_INPUT_SIDE <= height <= MAX_INPUT_SIDE and MIN_INPUT_SIDE <= width <= MAX_INPUT_SIDE):
        raise BundleError(f"{config_path}: input size {height}x{width} is beyond what a classifier takes "
                          f"({MIN_INPUT_SIDE} to {MAX_INPUT_SIDE} px a side); the file is damaged or was edited")
    for key in ("mean", "std"):
        if not _finite_numbers(pcfg[key], channels):
            raise BundleError(f"{config_path}: {key} must be {channels} numbers, one per channel, not {pcfg[key]!r}")
    if not all(0 < v for v in pcfg["std"]):
        raise BundleError(f"{config_path}: std must be positive, not {pcfg['std']!r}")
    crop_pct = pcfg.get("crop_pct", 1.0)
    if not (_finite_numbers([crop_pct], 1) and CROP_PCT_RANGE[0] <= crop_pct <= CROP_PCT_RANGE[1]):
        raise BundleError(f"{config_path}: crop_pct must be between {CROP_PCT_RANGE[0]} and {CROP_PCT_RANGE[1]}, "
                          f"not {crop_pct!r}")


def _load_weights(weights: Path) -> dict[str, torch.Tensor]:
    """The tensors of a bundle's safetensors file, all finite; BundleError for a damaged or foreign file."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise BundleError(f"{weights} is damaged or not a safetensors file ({exc}); copy or download the bundle "
                          f"again") from None
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise BundleError(f"{weights}: weight {name} holds NaN or infinite values (from a training that "
                              f"diverged?), so the model cannot predict; train it again or use another bundle")
    return state


def _read_config(path: Path, needs_weights: bool = True) -> dict:
    """config.json, checked; `needs_weights`: and the safetensors beside it (not for serving a model.onnx)."""
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise BundleError(f"{path}: not a model bundle (no {CONFIG_FILE})")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{config_path}: not valid JSON ({exc})") from exc
    missing = [k for k in ("architecture", "num_classes", "label_names", "pretrained_cfg") if k not in config]
    if missing:
        raise BundleError(f"{config_path}: missing field(s) {missing}")
    if len(config["label_names"]) != config["num_classes"]:
        raise BundleError(f"{config_path}: num_classes is {config['num_classes']} but there are "
                          f"{len(config['label_names'])} label names")
    for key in ("input_size", "mean", "std"):
        if key not in config["pretrained_cfg"]:
            raise BundleError(f"{config_path}: pretrained_cfg has no {key}")
    _check_preprocessing(config_path, config["pretrained_cfg"])
    if needs_weights and not (path / WEIGHTS_FILE).is_file():
        raise BundleError(f"{path}: no {WEIGHTS_FILE} (weights travel as safetensors only)")
    return config


def is_hub_id(location: str | os.PathLike) -> bool:
    """'hf-hub:owner/name', or 'owner/name' where no such local folder exists."""
    text = str(location)
    return text.startswith("hf-hub:") or (not Path(text).expanduser().exists() and text.count("/") == 1
                                          and not text.startswith((".", "/", "~")))


def resolve_location(location: str | os.PathLike, revision: str | None = None) -> Path:
    """A local bundle folder as is; 'hf-hub:owner/name' or 'owner/name' downloaded from the Hub."""
    text = str(location)
    if is_hub_id(text):
        return hub.download(text.removeprefix("hf-hub:"), revision=revision, allow_patterns=BUNDLE_PATTERNS)
    path = Path(text).expanduser()
    if not path.exists():
        raise BundleError(f"{path}: no such bundle folder (nor a Hub id like owner/name)")
    return path


def read_config(location: str | os.PathLike, revision: str | None = None) -> dict:
    """A bundle's config.json, checked, without building its model."""
    return _read_config(resolve_location(location, revision))


def read_bundle(location: str | os.PathLike, *, revision: str | None = None) -> Bundle:
    """A bundle's config and files without its model (Bundle.model is None) and without torch: what
    serving its exported model.onnx needs besides the graph (names, metrics, eval/ for the app); a
    Space serving ONNX ships no safetensors."""
    path = resolve_location(location, revision)
    return Bundle(None, _read_config(path, needs_weights=False), path)


def load_bundle(location: str | os.PathLike, *, revision: str | None = None,
                device: str | torch.device = "cpu") -> Bundle:
    """Rebuild the model of a bundle from its config and weights alone (no training data needed)."""
    from classifier.models import create_model

    path = resolve_location(location, revision)
    config = _read_config(path)
    model_args: dict[str, Any] = dict(config.get("model_args", {}))
    model_args.setdefault("in_chans", int(config["pretrained_cfg"]["input_size"][0]))
    model = create_model(config["architecture"], num_classes=config["num_classes"], pretrained=False,
                         **model_args)
    state = _load_weights(path / WEIGHTS_FILE)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{path}: the weights do not fit {config['architecture']} "
                          f"with {model_args}: {str(exc)[:500]}") from exc
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **config["pretrained_cfg"]}
    return Bundle(model.to(device).eval(), config, path)
