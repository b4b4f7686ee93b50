"""Predictor: a bundle turned into `image -> {class: probability}` for any PIL-readable image.

Preprocessing comes from the bundle alone (input size, mean, std, interpolation, crop), so the app
never needs the training data. Probabilities are divided by the bundle's fitted temperature, so a
"90%" means right about nine times in ten on the validation data.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

from classifier.bundle import Bundle, load_bundle
from classifier.data import INTERPOLATION
from classifier.images import ImageSource, open_image
from classifier.models import channels_last_pays
from classifier.tta import tta_logits, tta_mode


class ShrinkToSource:
    """A photo cropped to the training images' shape and shrunk to their size (height, width) in
    one PIL resize: ImageOps.fit, the call the model card's plain-timm snippet makes too, so the
    two predict alike."""

    def __init__(self, size):
        self.size = (int(size[1]), int(size[0]))  # PIL sizes are (width, height)

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.fit(image, self.size, Image.BICUBIC)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size[::-1]})"


def eval_transform(bundle: Bundle) -> T.Compose:
    """Resize and centre-crop as the model was evaluated; for models trained on small images
    (CIFAR's 32 px upscaled, say), first shrink to that source size so a sharp photo looks like
    the data the model learned from."""
    cfg = bundle.pretrained_cfg
    _, height, width = cfg["input_size"]
    interp = INTERPOLATION.get(cfg.get("interpolation", "bilinear"), T.InterpolationMode.BILINEAR)
    crop_pct = float(cfg.get("crop_pct", 1.0) or 1.0)
    steps: list = []
    source = bundle.project.get("source_image_size")
    if source and min(source) < min(height, width):
        steps.append(ShrinkToSource(source))
    steps += [T.Resize(int(round(min(height, width) / crop_pct)), interpolation=interp, antialias=True),
              T.CenterCrop((height, width)), T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])]
    return T.Compose(steps)


class Predictor:
    """Load once, predict many times. `tta`: the test-time augmentation (classifier.tta), by default
    the one the bundle was evaluated with: its accuracy was measured and its temperature fitted on
    those logits, so neither holds for predictions made another way."""

    def __init__(self, bundle: Bundle | str | os.PathLike, device: str | torch.device = "cpu",
                 tta: bool | str | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, device=device)
        self.device = torch.device(device)
        self.model = self.bundle.model.to(self.device).eval()
        # NHWC where it pays: the shipped lite0's one-image forward pass takes 13.0 ms instead of
        # 16.1 ms on one CPU thread (benchmarks/app_latency.py).
        self.channels_last = channels_last_pays(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.labels = self.bundle.label_names
        self.transform = eval_transform(self.bundle)
        self.temperature = self.bundle.temperature
        self.tta = self.bundle.tta if tta is None else tta_mode(tta)

    def preprocess(self, image: ImageSource) -> torch.Tensor:
        """Open (safely: see classifier.images) and transform one image; raises ImageError."""
        pil = open_image(image, channels=self.bundle.in_chans)
        return self.transform(pil)

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device)
        if self.channels_last and batch.ndim == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        logits = tta_logits(self.model, batch, self.tta)
        return (logits.float() / self.temperature).softmax(-1).cpu()

    def predict_batch(self, images: Sequence[ImageSource], top_k: int | None = None) -> list[dict[str, float]]:
        batch = torch.stack([self.preprocess(image) for image in images])
        return [self.top_classes(p, top_k) for p in self.probabilities(batch)]

    def predict(self, image: ImageSource | Image.Image, top_k: int | None = None) -> dict[str, float]:
        """{class: probability}, most likely first; `top_k` keeps only the first k."""
        return self.predict_batch([image], top_k)[0]

    def top_classes(self, probs: torch.Tensor, top_k: int | None = None) -> dict[str, float]:
        """{class: probability} of one row of `probabilities`, most likely first, `top_k` of them."""
        k = min(top_k or len(self.labels), len(self.labels))
        top = probs.topk(k)
        return {self.labels[int(i)]: float(p) for p, i in zip(top.values, top.indices)}


def main(argv: list[str] | None = None) -> int:
    """`python -m classifier.predict BUNDLE IMAGE ...`: the command line lives in predict_cli."""
    from classifier.predict_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
