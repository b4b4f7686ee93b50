"""Grad-CAM: where in an image the model found the evidence for a class (Selvaraju et al., 2017).

The heatmap is the last feature map of the backbone weighted, channel by channel, by the mean
gradient of the class's logit with respect to it, with only the positive evidence kept (ReLU),
then stretched over the input. It is computed on the very tensor the Predictor classifies (the
bundle's preprocessing: the shrink to the source size, resize, crop, normalisation) and, where the
bundle predicts with the mirror image too (classifier.tta), averaged with the mirror's heatmap
flipped back, as the prediction averages the two views' logits.

Which feature map: a timm model's forward_features output, with forward_head giving the logits
from it (the project's FastCNN has both too); any other network's last module whose output is a
4-D map larger than 1x1, found with forward hooks, so the tutorials' CNNs work without a table of
layer names. Hooks only record, and only for the thread that asked, so predictions running at the
same time on the shared model are not disturbed.

Written here rather than taken from pytorch-grad-cam (PyPI `grad-cam`): that package imports
OpenCV and matplotlib at import time (its image utilities), which the serving path must not load
(tests/test_house.py), and the part needed is the twenty lines below. The colour map is a numpy
table for the same reason.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from classifier.errors import NoFeatureMap
from classifier.tta import tta_mode

# The overlay's colours, from cold (no evidence) to hot: blue, cyan, green, yellow, red, the order
# of the usual "jet" maps, interpolated linearly between these stops.
_STOPS = np.array([[0, 0, 128], [0, 0, 255], [0, 255, 255], [0, 255, 0], [255, 255, 0], [255, 0, 0],
                   [128, 0, 0]], dtype=np.float64)
OVERLAY_ALPHA = 0.5  # the heatmap's share of each pixel: enough to see it, little enough to see the image
MIN_DISPLAY_SIDE = 256  # a 32 px input is shown enlarged, or its heatmap would be a few dots


def _last_feature_map(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature map [N, C, h, w], logits) of one forward pass, with the graph between them kept."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        features = model.forward_features(x)
        if features.ndim == 4 and min(features.shape[-2:]) > 0:
            return features, model.forward_head(features)
    owner, seen = threading.get_ident(), []

    def record(_module, _inputs, output):
        # Only this thread's pass: a concurrent prediction on the same model goes through these hooks too.
        if threading.get_ident() == owner and isinstance(output, torch.Tensor) and output.ndim == 4 \
                and output.shape[-2] * output.shape[-1] > 1:
            seen.append(output)

    handles = [module.register_forward_hook(record) for module in model.modules() if module is not model]
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise NoFeatureMap(f"{type(model).__name__} has no convolutional feature map (no 4-D output larger "
                           "than 1x1) to compute a class-activation map on")
    # Hooks fire when a module finishes, so the last one recorded is the last map before the pooling
    # (or flattening) that ends the backbone.
    return seen[-1], logits


def grad_cam(model: nn.Module, x: torch.Tensor, target: int | None = None) -> tuple[torch.Tensor, int]:
    """(heatmap [H, W] in 0..1 at x's own size, the class it explains) for one preprocessed image
    x [C, H, W] or [1, C, H, W]; `target` None explains the model's top class. An all-zero map
    means no part of the feature map argued for the class."""
    x = (x if x.ndim == 4 else x.unsqueeze(0)).detach().float().requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            features, logits = _last_feature_map(model, x)
            target = int(logits[0].argmax()) if target is None else int(target)
            gradients, = torch.autograd.grad(logits[0, target], features)
    finally:
        model.train(was_training)
    weights = gradients.mean(dim=(2, 3), keepdim=True)  # one weight per channel: its average gradient
    cam = F.relu((weights * features).sum(1, keepdim=True)).detach().float()
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    peak = float(cam.max())
    return (cam / peak if peak > 0 else cam), target


def grad_cam_tta(model: nn.Module, x: torch.Tensor, target: int, tta: bool | str | None = "none") -> torch.Tensor:
    """grad_cam of `target`, averaged over the mirror pair where the prediction is (`tta` "flip" or
    "flip-shift"; the one-pixel shifts of "flip-shift" are left out: they move the map by less than
    one of its cells)."""
    cam, _ = grad_cam(model, x, target)
    if tta_mode(tta) != "none":
        mirrored, _ = grad_cam(model, x.flip(-1), target)
        cam = (cam + mirrored.flip(-1)) / 2
        peak = float(cam.max())
        cam = cam / peak if peak > 0 else cam
    return cam


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """A [H, W] map in 0..1 as an RGB uint8 image [H, W, 3] in the blue-to-red colours of _STOPS."""
    position = np.clip(heatmap, 0, 1) * (len(_STOPS) - 1)
    low = np.floor(position).astype(int).clip(0, len(_STOPS) - 2)
    fraction = (position - low)[..., None]
    return ((1 - fraction) * _STOPS[low] + fraction * _STOPS[low + 1]).round().astype(np.uint8)


def denormalize(x: torch.Tensor, mean, std) -> Image.Image:
    """The preprocessed tensor [C, H, W] back as the picture the model saw (RGB, or L for one channel)."""
    mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    pixels = ((x.detach().float().cpu() * std + mean).clamp(0, 1) * 255).round().byte()
    array = pixels.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array, "L" if array.shape[-1] == 1 else "RGB")


def overlay(image: Image.Image, heatmap: torch.Tensor | np.ndarray, alpha: float = OVERLAY_ALPHA,
            min_side: int = MIN_DISPLAY_SIDE) -> Image.Image:
    """`image` with the heatmap blended over it, enlarged to at least `min_side` px a side."""
    image = image.convert("RGB")
    if min(image.size) < min_side:
        scale = min_side / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    heat = np.asarray(heatmap, dtype=np.float32)
    # The map is smooth; bilinear stretching keeps it so at the display size.
    heat = np.asarray(Image.fromarray(heat, "F").resize(image.size, Image.BILINEAR))
    colours = Image.fromarray(colorize(heat), "RGB")
    return Image.blend(image, colours, alpha)


def peak_position(heatmap: torch.Tensor) -> tuple[int, int]:
    """(row, column) of the hottest point."""
    index = int(heatmap.flatten().argmax())
    return divmod(index, heatmap.shape[-1])
