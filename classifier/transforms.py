"""The one owner of preprocessing: THE eval transform, and the training augmentation.

A model sees images through exactly one eval-time path, wherever it runs: training's validation
and test, `evaluate`, the Predictor behind `predict` and the app, the reports, and the plain-timm
snippet of the model card. That path is resolved the way timm resolves a data config from a model's
pretrained_cfg (input size, interpolation, mean, std, crop_pct) and built with timm's own eval
transform (resize the shorter side to size / crop_pct, centre crop, normalise), so a bundle loaded
with plain timm preprocesses as this project does. The one step timm lacks comes first: a model
trained on small images (CIFAR's 32 px upscaled, say) sees a photo first shrunk to that source size
(ShrinkToSource), so that a sharp photo looks like the data it learned from.

The in-memory device loader (classifier.fastdata) computes the same thing on tensors, for speed;
tests/test_preprocessing.py holds it, and every other path, against `eval_transform`.
"""

from __future__ import annotations

import math
from typing import Sequence

import timm.data
from PIL import Image, ImageOps
from torchvision import transforms as T

# The keys of a pretrained_cfg (a bundle's config.json, timm's registry) that decide preprocessing.
PREPROCESSING_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct")
INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                 "nearest": T.InterpolationMode.NEAREST}


def data_config(pretrained_cfg: dict) -> dict:
    """timm's data config of a pretrained_cfg: input_size, interpolation, mean, std, crop_pct, crop_mode."""
    return timm.data.resolve_data_config(pretrained_cfg=dict(pretrained_cfg))


class ShrinkToSource:
    """A photo cropped to the training images' shape and shrunk to their size (height, width) in
    one PIL resize (ImageOps.fit, bicubic): the call the model card's plain-timm snippet makes too.
    An image already that size passes through unchanged."""

    def __init__(self, size: Sequence[int]):
        self.size = (int(size[1]), int(size[0]))  # PIL sizes are (width, height)

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.size == self.size:
            return image
        return ImageOps.fit(image, self.size, Image.BICUBIC)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size[::-1]})"


def needs_shrink(pretrained_cfg: dict, source_image_size: Sequence[int] | None) -> bool:
    """Whether the model learned from images smaller than its input (upscaled in training)."""
    _, height, width = pretrained_cfg["input_size"]
    return bool(source_image_size) and min(source_image_size) < min(height, width)


def decoded_side(pretrained_cfg: dict, source_image_size: Sequence[int] | None = None) -> int:
    """The largest shorter side eval_transform takes anything from: the source size a photo is
    shrunk to first, else the side it is resized to before the crop (size / crop_pct). A decoder
    may stop at a few times this (classifier.images: JPEG drafts)."""
    if needs_shrink(pretrained_cfg, source_image_size):
        return int(max(source_image_size))
    config = data_config(pretrained_cfg)
    return int(math.ceil(max(config["input_size"][1:]) / config.get("crop_pct", 1.0)))


def eval_transform(pretrained_cfg: dict, source_image_size: Sequence[int] | None = None) -> T.Compose:
    """THE eval-time preprocessing of a model: PIL image in, normalised (C, H, W) tensor out."""
    steps: list = [ShrinkToSource(source_image_size)] if needs_shrink(pretrained_cfg, source_image_size) else []
    steps.append(timm.data.create_transform(**data_config(pretrained_cfg), is_training=False))
    return T.Compose(steps)


# Training augmentation policies (--augment). "default" is what every recipe was tuned with.
AUGMENTS = {
    "default": "small images: random crop (reflect padding) and mirror; photos: random resized crop (25-100%), "
               "mirror, rotation up to 10 degrees and colour jitter",
    "none": "no augmentation: the eval transform",
    "light": "small images: as default; photos: random resized crop (35-100%) and mirror",
    "randaugment": "default's crop and mirror, then timm's RandAugment (rand-m9-mstd0.5-inc1)",
    "trivialaugment": "default's crop and mirror, then TrivialAugment (torchvision's TrivialAugmentWide)",
}
# The policies the in-memory device loader (classifier.fastdata) reproduces on tensors; the others
# need the PIL pipeline of a DataLoader.
MEMORY_AUGMENTS = ("default", "light", "none")
RANDAUGMENT = "rand-m9-mstd0.5-inc1"  # timm's recipe for ImageNet training (its train.py examples)


def _crop_and_mirror(size: int, small: bool, interp, scale: tuple[float, float]) -> list:
    if small:
        return [T.Resize((size, size), interpolation=interp, antialias=True),
                T.RandomCrop(size, padding=max(1, size // 8), padding_mode="reflect"), T.RandomHorizontalFlip()]
    return [T.RandomResizedCrop(size, scale=scale, interpolation=interp, antialias=True), T.RandomHorizontalFlip()]


def train_transform(pretrained_cfg: dict, small: bool, augment: str = "default",
                    random_erasing: float = 0.0) -> T.Compose:
    """The training augmentation of one run: the policy `augment` (AUGMENTS), then, with
    `random_erasing` > 0, timm's RandomErasing of a random box in that share of the images.

    Small images (CIFAR, Fashion-MNIST) are resized to the model's input if needed before the
    policy; photos get a random resized crop. RandAugment is timm's; TrivialAugment, which timm
    lacks, is torchvision's.
    """
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augmentation '{augment}' ({', '.join(AUGMENTS)})")
    if augment == "none":
        steps = list(eval_transform(pretrained_cfg).transforms)
    else:
        channels, size, _ = pretrained_cfg["input_size"]
        interp = INTERPOLATION[pretrained_cfg.get("interpolation", "bilinear")]
        steps = _crop_and_mirror(size, small, interp, (0.35, 1.0) if augment == "light" else (0.25, 1.0))
        if augment == "default" and not small:
            steps += [T.RandomRotation(10, interpolation=interp), T.ColorJitter(0.2, 0.2, 0.2, 0.02)]
        elif augment == "randaugment":
            fill = [min(255, round(255 * m)) for m in pretrained_cfg["mean"]]
            # A grey image's fill is one number; Pillow refuses a one-element tuple for it.
            steps.append(timm.data.auto_augment.rand_augment_transform(
                RANDAUGMENT, {"translate_const": int(size * 0.45),
                              "img_mean": fill[0] if channels == 1 else tuple(fill)}))
        elif augment == "trivialaugment":
            steps.append(T.TrivialAugmentWide(interpolation=interp))
        steps += [T.ToTensor(), T.Normalize(pretrained_cfg["mean"], pretrained_cfg["std"])]
    if random_erasing > 0:
        steps.append(timm.data.random_erasing.RandomErasing(random_erasing, mode="pixel", device="cpu"))
    return T.Compose(steps)
