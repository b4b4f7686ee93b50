"""Which runtime serves a bundle, and the predictor it serves with: one choice for the app and `predict`.

    predictor = load_predictor("assets/models/cifar10-cnn", runtime="auto")
    predictor.predict("cat.jpg", top_k=3)   # {"cat": 0.91, ...}, from either runtime

- "torch": classifier.predict.Predictor on the bundle's model.safetensors;
- "onnx": onnxruntime on the bundle's model.onnx (`python -m classifier export BUNDLE` writes it),
  whose graph holds the test-time augmentation and the temperature; no torch is imported;
- "auto": torch where it imports, else onnx where the bundle has a model.onnx (a Space whose
  requirements install onnxruntime and no torch).

Both predictors answer predict, predict_batch, preprocess, stack, probabilities, top_classes, labels
and bundle, so callers never ask which one they hold. This module imports no torch itself.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from classifier.bundle import Bundle, is_hub_id, read_bundle
from classifier.errors import BundleError, UserError
from classifier.onnx_runtime import ONNX_FILE, OnnxPredictor
from classifier.tta import tta_mode

RUNTIMES = ("auto", "torch", "onnx")
DEFAULT_RUNTIME = "auto"


def torch_importable() -> bool:
    """Whether the torch runtime could run here: torch, torchvision and timm all installed."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in ("torch", "torchvision", "timm"))
    except (ImportError, ValueError):  # a finder that refuses the name (an inference-only build, a test)
        return False


def has_onnx(location: str | os.PathLike) -> bool:
    """A local bundle folder with an exported model.onnx (Hub ids: only their torch files are fetched)."""
    return not is_hub_id(location) and (Path(location).expanduser() / ONNX_FILE).is_file()


def pick_runtime(requested: str, location: str | os.PathLike) -> str:
    """"torch" or "onnx" for serving `location`; raises UserError where neither can serve it."""
    if requested not in RUNTIMES:
        raise UserError(f"runtime {requested!r}: expected one of {', '.join(RUNTIMES)}")
    if requested == "onnx" and not has_onnx(location):
        raise BundleError(f"{location}: no {ONNX_FILE} to serve with onnxruntime; write one with "
                          f"`python -m classifier export {location}` (a local bundle folder)")
    if requested != "auto":
        return requested
    if torch_importable():
        return "torch"
    if has_onnx(location):
        return "onnx"
    raise BundleError(f"{location}: torch is not installed here and the bundle has no {ONNX_FILE}; install "
                      f"torch (pip install -r requirements.txt) or export the bundle on a machine that has it "
                      f"(python -m classifier export BUNDLE)")


class BundleOnnxPredictor(OnnxPredictor):
    """OnnxPredictor of a bundle folder's model.onnx, holding the bundle (config, eval/) as Predictor
    does, and refusing an export that no longer matches the bundle's config."""

    def __init__(self, bundle: Bundle, threads: int | None = None):
        super().__init__(bundle.path, threads)
        self.bundle = bundle
        # A bundle re-trained or re-calibrated after its export would serve the old model silently.
        exported = {"label_names": self.labels, "tta": self.tta, "temperature": self.temperature}
        current = {"label_names": bundle.label_names, "tta": bundle.tta, "temperature": bundle.temperature}
        stale = [key for key in exported if exported[key] != current[key]]
        if stale:
            raise BundleError(f"{self.path}: exported from an older state of this bundle ({', '.join(stale)} "
                              f"differ from config.json); export it again: python -m classifier export {bundle.path}")


def load_predictor(location: str | os.PathLike, runtime: str = DEFAULT_RUNTIME, *, threads: int | None = None,
                   device: str = "cpu", tta: str | None = None):
    """The predictor of the bundle at `location` on the runtime pick_runtime chooses. `threads`:
    onnxruntime's intra-op threads (torch's are process-wide: torch.set_num_threads); `device`
    and `tta` (another test-time augmentation than the bundle's): the torch runtime only, since the
    ONNX graph holds the bundle's own."""
    chosen = pick_runtime(runtime, location)
    if chosen == "torch":
        from classifier.predict import Predictor  # imported only when chosen: it imports torch

        return Predictor(location, device=device, tta=tta)
    bundle = read_bundle(location)
    if tta is not None and tta_mode(tta) != bundle.tta:
        raise UserError(f"test-time augmentation {tta}: the ONNX graph holds the bundle's own ({bundle.tta}); "
                        f"use the torch runtime to predict with another")
    if device not in ("cpu", "auto"):
        raise UserError(f"device {device}: the ONNX runtime here serves on the CPU only")
    return BundleOnnxPredictor(bundle, threads)
