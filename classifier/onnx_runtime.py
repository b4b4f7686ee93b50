"""Serve an exported bundle (model.onnx, classifier.export) with onnxruntime, numpy and Pillow alone.

No torch, torchvision or timm: this module (and classifier.images, which opens images with the same
safety rules as everywhere else) imports on an inference-only install: 178 MB against 980 MB for
torch's CPU-only wheels, and 2x to 3x faster on one CPU thread (benchmarks/results/onnx_vs_torch_cpu.md).

    predictor = OnnxPredictor("assets/models/cifar10-efficientnet-lite0")   # the folder or its model.onnx
    predictor.predict("cat.jpg", top_k=3)  # {"cat": 0.91, "dog": 0.05, ...}, as Predictor answers

Everything it needs travels inside model.onnx: the label names and the preprocessing are in the
model's metadata_props, and the test-time augmentation and the temperature are in the graph,
whose "probabilities" output is what Predictor.probabilities computes. The preprocessing below
re-does the bundle's eval transform (classifier.transforms: ShrinkToSource, then timm's eval
transform) step by step with the calls timm and torchvision make on a PIL image (Pillow's resize,
a crop or pad, /255 and normalisation in float32), so the pixels it feeds the model are the same
bits the Predictor's transform produces (tests/test_export.py checks each crop mode).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

from classifier.errors import NoFeatureMap, UserError
from classifier.images import ImageSource, open_image

ONNX_FILE = "model.onnx"
INFO_FILE = "onnx.json"  # the metadata again, as plain JSON beside model.onnx, for tools without onnx
FORMAT_KEY = "classifier_onnx_format"  # marks a model exported by classifier.export
FORMAT_VERSION = 1
INPUT_NAME = "pixel_values"
LOGITS_NAME = "logits"
PROBABILITIES_NAME = "probabilities"
# The metadata a model must carry to be served (metadata_props values are JSON text).
REQUIRED_METADATA = ("label_names", "input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
# Pillow's filters by timm's interpolation names (torchvision hands a PIL image the same ones).
PIL_FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
               "bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX,
               "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS}
CROP_MODES = ("center", "squash", "border")  # timm's eval crop modes


class OnnxModelError(UserError, ValueError):
    """A model.onnx that is missing, unreadable or not one of ours, worded for the user."""


# ----------------------------------------------------------------------------------------------
# Preprocessing: the bundle's eval transform (classifier.transforms: ShrinkToSource, then timm's
# transforms_imagenet_eval) without torch, step by step as those run on a PIL image


def shrink_to_source(image: Image.Image, source_size: Sequence[int]) -> Image.Image:
    """ShrinkToSource: crop to the training images' shape and shrink to their (height, width)."""
    size = (int(source_size[1]), int(source_size[0]))
    return image if image.size == size else ImageOps.fit(image, size, Image.Resampling.BICUBIC)


def resize_to(image: Image.Image, width: int, height: int, resample: int) -> Image.Image:
    """torchvision's resize of a PIL image: Pillow's, skipped when the image is already that size."""
    return image if image.size == (width, height) else image.resize((width, height), resample)


def shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's Resize(size): the shorter side becomes `size`, the longer keeps the aspect
    ratio, rounded down. Returns (width, height)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def keep_ratio_size(width: int, height: int, target: tuple[int, int], longest: float) -> tuple[int, int]:
    """timm's ResizeKeepRatio (no random scale): longest=0 fits the shorter side to `target`
    (height, width), longest=1 the longer one. Returns (width, height)."""
    ratio_h, ratio_w = height / target[0], width / target[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return round(width / ratio), round(height / ratio)


def centre_crop(pixels: np.ndarray, height: int, width: int, fill: Sequence[int] = (0,)) -> np.ndarray:
    """torchvision's CenterCrop (fill 0) and timm's CenterCropOrPad of an (H, W[, C]) array:
    padded with `fill` (one value, or one per channel) where smaller than the crop, then cropped
    with the same rounding of the offsets."""
    image_height, image_width = pixels.shape[:2]
    if height > image_height or width > image_width:
        canvas = np.empty((max(height, image_height), max(width, image_width)) + pixels.shape[2:], pixels.dtype)
        canvas[...] = fill if pixels.ndim == 3 else fill[0]
        top, left = max(height - image_height, 0) // 2, max(width - image_width, 0) // 2
        canvas[top:top + image_height, left:left + image_width] = pixels
        pixels, (image_height, image_width) = canvas, canvas.shape[:2]
    top = int(round((image_height - height) / 2.0))
    left = int(round((image_width - width) / 2.0))
    return pixels[top:top + height, left:left + width]


def normalise(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """ToTensor then Normalize: (C, H, W) float32, /255, minus mean, over std, in float32 as torch."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    scaled = pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((scaled - mean32) / std32)


class EvalTransform:
    """The bundle's eval preprocessing, from the metadata of its model.onnx (timm's resolved data
    config: input_size, interpolation, mean, std, crop_pct, crop_mode; and source_image_size)."""

    def __init__(self, metadata: dict):
        _, self.height, self.width = (int(v) for v in metadata["input_size"])
        self.mean, self.std = metadata["mean"], metadata["std"]
        self.crop_mode = metadata["crop_mode"]
        self.resample = PIL_FILTERS[metadata["interpolation"]]
        crop_pct = float(metadata["crop_pct"])
        self.scale = (math.floor(self.height / crop_pct), math.floor(self.width / crop_pct))
        # timm pads the "border" mode with the mean colour, torchvision's centre crop with black.
        self.fill = [round(255 * v) for v in self.mean] if self.crop_mode == "border" else [0]
        source = metadata.get("source_image_size")
        # As classifier.transforms.needs_shrink: only to a source smaller than the model's input.
        self.source = source if source and min(source) < min(self.height, self.width) else None

    def resize(self, image: Image.Image) -> Image.Image:
        """timm's resize step for the crop mode (transforms_imagenet_eval)."""
        width, height = image.size
        if self.crop_mode == "squash":
            return resize_to(image, self.scale[1], self.scale[0], self.resample)
        if self.crop_mode == "border":
            return resize_to(image, *keep_ratio_size(width, height, self.scale, longest=1.0), self.resample)
        if self.scale[0] == self.scale[1]:
            return resize_to(image, *shorter_side_size(width, height, self.scale[0]), self.resample)
        return resize_to(image, *keep_ratio_size(width, height, self.scale, longest=0.0), self.resample)

    def __call__(self, image: Image.Image) -> np.ndarray:
        if self.source:
            image = shrink_to_source(image, self.source)
        pixels = centre_crop(np.asarray(self.resize(image)), self.height, self.width, self.fill)
        return normalise(pixels, self.mean, self.std)


# ----------------------------------------------------------------------------------------------
# The model


def onnx_path(location: str | os.PathLike) -> Path:
    """The model.onnx a location names: the file itself, or the one in a bundle folder."""
    path = Path(location).expanduser()
    if path.is_dir():
        path = path / ONNX_FILE
        if not path.is_file():
            raise OnnxModelError(f"{path.parent}: no {ONNX_FILE} in this folder; export one with "
                                 f"classifier.export.export_onnx")
    elif not path.is_file():
        raise OnnxModelError(f"{path}: no such file")
    return path


def open_session(path: Path, threads: int | None = None, providers: Sequence[str] | None = None):
    """An onnxruntime session for `path`; a file onnxruntime cannot load raises OnnxModelError."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or 0)  # 0: onnxruntime's default, one per core
    options.inter_op_num_threads = 1  # one image model at a time: parallel branches gain nothing
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...) share no base
        raise OnnxModelError(f"{path}: not an ONNX model onnxruntime can load "
                             f"({type(exc).__name__}: {str(exc)[:300]})") from exc


def decode_metadata(props: dict[str, str]) -> dict[str, Any]:
    """metadata_props (strings of JSON) back into values."""
    decoded = {}
    for key, text in props.items():
        try:
            decoded[key] = json.loads(text)
        except json.JSONDecodeError:
            decoded[key] = text  # a property someone else added, in plain text
    return decoded


def read_metadata(session, path: Path) -> dict[str, Any]:
    """The model's metadata, checked to be a classifier export that this module can serve."""
    metadata = decode_metadata(session.get_modelmeta().custom_metadata_map)
    if FORMAT_KEY not in metadata:
        raise OnnxModelError(f"{path}: an ONNX model without this project's metadata (label names, "
                             f"preprocessing); export it with classifier.export.export_onnx")
    if int(metadata[FORMAT_KEY]) > FORMAT_VERSION:
        raise OnnxModelError(f"{path}: exported in format {metadata[FORMAT_KEY]}, newer than this "
                             f"version of classifier reads ({FORMAT_VERSION}); upgrade classifier")
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if missing or INPUT_NAME not in inputs or PROBABILITIES_NAME not in outputs:
        raise OnnxModelError(f"{path}: incomplete export (missing metadata {missing}, inputs {inputs}, "
                             f"outputs {outputs}); export it again with classifier.export.export_onnx")
    if metadata["interpolation"] not in PIL_FILTERS or metadata["crop_mode"] not in CROP_MODES:
        raise OnnxModelError(f"{path}: preprocessing this runtime does not know: interpolation "
                             f"{metadata['interpolation']!r} (known: {', '.join(PIL_FILTERS)}), crop_mode "
                             f"{metadata['crop_mode']!r} (known: {', '.join(CROP_MODES)})")
    return metadata


class OnnxPredictor:
    """classifier.predict.Predictor's interface (predict, predict_batch, labels) on onnxruntime.

    The test-time augmentation and temperature are those the graph was exported with (the
    bundle's own, as Predictor's defaults); `threads`: onnxruntime's intra-op threads (default:
    one per core).
    """

    def __init__(self, location: str | os.PathLike, threads: int | None = None,
                 providers: Sequence[str] | None = None):
        self.path = onnx_path(location)
        self.session = open_session(self.path, threads, providers)
        self.metadata = read_metadata(self.session, self.path)
        self.labels = list(self.metadata["label_names"])
        self.in_chans = int(self.metadata["input_size"][0])
        self.temperature = float(self.metadata.get("temperature", 1.0))
        self.tta = self.metadata.get("tta", "none")
        self.transform = EvalTransform(self.metadata)

    def preprocess(self, image: ImageSource) -> np.ndarray:
        """Open (safely: see classifier.images) and transform one image; raises ImageError."""
        return self.transform(open_image(image, channels=self.in_chans))

    def stack(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """A batch of preprocessed images, for `probabilities` (Predictor's is a torch tensor)."""
        return np.stack(list(images))

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """(N, classes) calibrated probabilities of a preprocessed (N, C, H, W) batch."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return self.session.run([PROBABILITIES_NAME], {INPUT_NAME: batch})[0]

    def predict_batch(self, images: Sequence[ImageSource], top_k: int | None = None) -> list[dict[str, float]]:
        batch = self.stack([self.preprocess(image) for image in images])
        return [self.top_classes(p, top_k) for p in self.probabilities(batch)]

    def predict(self, image: ImageSource, top_k: int | None = None) -> dict[str, float]:
        """{class: probability}, most likely first; `top_k` keeps only the first k."""
        return self.predict_batch([image], top_k)[0]

    def scored_probabilities(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predictor.scored_probabilities' shape. The exported graph ends in probabilities, and the
        out-of-distribution score (energy, classifier.ood) needs the logits before the softmax: no
        score (NaN), and out_of_domain never flags, rather than a threshold applied to the wrong thing."""
        return self.probabilities(batch), np.full(len(batch), np.nan, dtype=np.float32)

    def predict_scored(self, image: ImageSource, top_k: int | None = None) -> tuple[dict[str, float], float]:
        """({class: probability} as predict gives it, NaN: see scored_probabilities)."""
        probabilities, scores = self.scored_probabilities(self.stack([self.preprocess(image)]))
        return self.top_classes(probabilities[0], top_k), float(scores[0])

    def out_of_domain(self, score: float) -> bool:
        return False

    def explain(self, image: ImageSource, label: str | None = None):
        raise NoFeatureMap("a heatmap of where the model looked needs the model's feature maps, which an ONNX "
                           "export does not give; serve the bundle with torch (--runtime torch) to see it")

    def top_classes(self, probs: np.ndarray, top_k: int | None = None) -> dict[str, float]:
        """{class: probability} of one row of `probabilities`, most likely first, `top_k` of them."""
        k = min(top_k or len(self.labels), len(self.labels))
        order = np.argsort(-probs, kind="stable")[:k]
        return {self.labels[int(i)]: float(probs[i]) for i in order}
