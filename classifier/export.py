"""Export a bundle to ONNX, as one self-describing model.onnx, and check it against torch.

    path = export_onnx(load_bundle("assets/models/cifar10-efficientnet-lite0"))   # <bundle>/model.onnx
    verify_onnx(bundle, path, images)   # {"top1_agreement": 1.0, "max_abs_diff": 1.1e-06, ...}

The graph is the whole of Predictor.probabilities, not the bare network:
- input "pixel_values": a normalised float32 batch (N, C, H, W) at the bundle's input size, N free;
- output "probabilities": softmax(tta_logits(model, x, bundle.tta) / bundle.temperature), the
  calibrated probabilities the Predictor returns, test-time augmentation (classifier.tta's own
  code, traced) and temperature included, so a runtime needs no knowledge of either;
- output "logits": the test-time-augmented logits before the temperature, what evaluation uses.
The preprocessing that makes "pixel_values" out of an image (input size, mean, std, interpolation,
crop_pct, crop_mode, source_image_size) and the label names travel in the model's metadata_props,
JSON-encoded, and again in onnx.json beside it; classifier.onnx_runtime reads them and serves the
model without torch.

The exporter is torch.onnx's dynamo (torch.export) one, the default since torch 2.9: the TorchScript
one is deprecated. Both export tf_efficientnet_lite0 and fast_cnn (its whitening conv reads a
buffer; its channels_last `contiguous` is a no-op in a graph), and onnxruntime's probabilities are
within 3e-6 of torch's on the 200 test thumbnails each bundle ships (tests/test_export.py).
Opset 18 is the default: every onnxruntime since 1.14 (and onnxruntime-web) runs it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import timm.data
import torch
from torch import nn

from classifier.bundle import Bundle
from classifier.images import ImageSource, open_image
from classifier.onnx_runtime import (FORMAT_KEY, FORMAT_VERSION, INFO_FILE, INPUT_NAME, LOGITS_NAME,
                                     ONNX_FILE, PROBABILITIES_NAME, OnnxPredictor)
from classifier.predict import Predictor
from classifier.tta import tta_logits

DEFAULT_OPSET = 18
MISTAKES_DIR = "mistakes"  # eval/mistakes/: thumbnails of test images, a bundle's own offline sample


class CalibratedTTA(nn.Module):
    """A bundle's model as Predictor runs it: TTA-averaged logits, and those logits calibrated."""

    def __init__(self, model: nn.Module, tta: str, temperature: float):
        super().__init__()
        self.model, self.tta, self.temperature = model, tta, float(temperature)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = tta_logits(self.model, pixel_values, self.tta)
        return logits, (logits.float() / self.temperature).softmax(-1)


def onnx_metadata(bundle: Bundle) -> dict:
    """What a runtime needs besides the graph: the labels and how to turn an image into its input.
    The preprocessing is timm's data config resolved from the bundle's pretrained_cfg, defaults
    filled in, as the bundle's own eval transform resolves it (classifier.transforms.data_config)."""
    cfg = timm.data.resolve_data_config(pretrained_cfg=dict(bundle.pretrained_cfg))
    return {
        FORMAT_KEY: FORMAT_VERSION,
        "architecture": bundle.architecture,
        "label_names": bundle.label_names,
        "input_size": [int(v) for v in cfg["input_size"]],
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "interpolation": cfg["interpolation"],
        "crop_pct": float(cfg["crop_pct"]),
        "crop_mode": cfg["crop_mode"],
        "source_image_size": bundle.project.get("source_image_size"),
        "tta": bundle.tta,
        "temperature": bundle.temperature,
        "inputs": {INPUT_NAME: "float32 (batch, C, H, W), normalised with mean and std"},
        "outputs": {PROBABILITIES_NAME: "softmax(logits / temperature)",
                    LOGITS_NAME: "logits averaged over the test-time augmentation `tta`"},
    }


def _trace(bundle: Bundle, opset: int):
    """torch.onnx's ONNXProgram of CalibratedTTA, its batch axis dynamic."""
    wrapper = CalibratedTTA(bundle.model, bundle.tta, bundle.temperature).eval()
    device = next(bundle.model.parameters()).device
    # Two images, not one: torch.export specialises a dimension of size 1 to a constant.
    example = torch.zeros(2, *bundle.pretrained_cfg["input_size"], device=device)
    return torch.onnx.export(wrapper, (example,), input_names=[INPUT_NAME],
                             output_names=[LOGITS_NAME, PROBABILITIES_NAME], opset_version=opset,
                             dynamo=True, dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}},
                             verbose=False)


def export_onnx(bundle: Bundle, path: str | os.PathLike | None = None, opset: int = DEFAULT_OPSET) -> Path:
    """Write `path` (default: <bundle>/model.onnx), one file with its weights inside, and onnx.json
    beside it; returns the path. The file is checked by onnx.checker before it replaces any older one."""
    import onnx

    path = Path(path) if path is not None else bundle.path / ONNX_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = onnx_metadata(bundle)
    program = _trace(bundle, opset)
    program.model.metadata_props.update({key: json.dumps(value) for key, value in metadata.items()})
    program.model.doc_string = f"{bundle.architecture} from the classifier bundle {bundle.path.name}"
    tmp = path.with_name(path.name + ".tmp")
    program.save(tmp, external_data=False)  # one file: a runtime loads it from a path or bytes alone
    onnx.checker.check_model(str(tmp), full_check=True)
    os.replace(tmp, path)
    info = {"file": path.name, "opset": opset, "torch": torch.__version__, "onnx": onnx.__version__, **metadata}
    (path.parent / INFO_FILE).write_text(json.dumps(info, indent=2))
    return path


def bundle_sample_images(bundle: Bundle, limit: int | None = None) -> list[Path]:
    """The test-image thumbnails a bundle's evaluation saved (eval/mistakes/): a sample of real
    inputs, offline, that the model finds hard."""
    images = sorted(bundle.eval_path(MISTAKES_DIR).glob("*.png"))
    return images[:limit] if limit else images


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def verify_onnx(bundle: Bundle, onnx_path: str | os.PathLike, images: Sequence[ImageSource] | None = None,
                batch_size: int = 16) -> dict:
    """Compare the ONNX model with the bundle's Predictor on `images` (default: the bundle's eval
    thumbnails). Each image is opened once and preprocessed twice, by the Predictor (torchvision)
    and by OnnxPredictor (numpy, Pillow). Returns:
    - images: how many;
    - max_abs_diff, top1_agreement: the graph alone, onnxruntime vs torch on the same tensors;
    - pixel_max_abs_diff: OnnxPredictor's preprocessing vs the Predictor's;
    - runtime_max_abs_diff, runtime_top1_agreement: OnnxPredictor end to end vs Predictor.
    Differences are in probabilities (0..1)."""
    images = list(images) if images is not None else bundle_sample_images(bundle)
    if not images:
        raise ValueError(f"{bundle.path}: no images to verify the export on (and no {MISTAKES_DIR} thumbnails)")
    predictor, runtime = Predictor(bundle), OnnxPredictor(onnx_path)
    reference, graph, served, pixel_diff = [], [], [], 0.0
    for chunk in _batches(images, batch_size):
        opened = [open_image(image, channels=bundle.in_chans) for image in chunk]
        pixels = torch.stack([predictor.preprocess(image) for image in opened])
        ours = np.stack([runtime.preprocess(image) for image in opened])
        pixel_diff = max(pixel_diff, float(np.abs(ours - pixels.numpy()).max()))
        reference.append(predictor.probabilities(pixels).numpy())
        graph.append(runtime.probabilities(pixels.numpy()))
        served.append(runtime.probabilities(ours))
    reference, graph, served = (np.concatenate(p) for p in (reference, graph, served))
    return {"images": len(images),
            "max_abs_diff": float(np.abs(graph - reference).max()),
            "top1_agreement": _top1_agreement(graph, reference),
            "pixel_max_abs_diff": pixel_diff,
            "runtime_max_abs_diff": float(np.abs(served - reference).max()),
            "runtime_top1_agreement": _top1_agreement(served, reference)}
