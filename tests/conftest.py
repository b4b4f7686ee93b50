"""Shared fixtures: small datasets the tests make themselves, and a tiny trained bundle.

Nothing here touches the network. Images are drawn so that classes are learnable (each class has
its own colour and shape), which lets the tests assert that training actually learns.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

# Tests share the 2-core machine with whatever else runs; one thread each keeps timings stable.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

CLASSES = ("circle", "square", "triangle")
COLOURS = {"circle": (220, 40, 40), "square": (40, 180, 40), "triangle": (40, 60, 220)}


# The start of a script for a child interpreter where torch, torchvision and timm cannot be imported
# (an inference-only install, an ONNX Space): a meta-path finder ahead of the real ones refuses them.
WITHOUT_TORCH = """
import importlib.abc, json, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "torchvision", "timm"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTorch())
"""


def draw_shape(kind: str, size: int = 32, rng: np.random.Generator | None = None) -> Image.Image:
    """A noisy image of one coloured shape at a random place: easy to learn, not trivial."""
    rng = rng or np.random.default_rng(0)
    background = tuple(int(v) for v in rng.integers(0, 90, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    s = int(size * rng.uniform(0.35, 0.6))
    x, y = (int(v) for v in rng.integers(0, size - s, 2))
    colour = tuple(int(np.clip(c + rng.integers(-30, 30), 0, 255)) for c in COLOURS[kind])
    if kind == "circle":
        draw.ellipse([x, y, x + s, y + s], fill=colour)
    elif kind == "square":
        draw.rectangle([x, y, x + s, y + s], fill=colour)
    else:
        draw.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=colour)
    noise = rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.float64) + noise, 0, 255).astype(np.uint8))


def make_image_folder(root: Path, per_class: int = 20, size: int = 32, splits: tuple[str, ...] = (),
                      seed: int = 0, fmt: str = "png") -> Path:
    """root/<class>/*.png, or root/<split>/<class>/*.png for each of `splits`."""
    rng = np.random.default_rng(seed)
    for split in splits or ("",):
        for kind in CLASSES:
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                draw_shape(kind, size, rng).save(folder / f"{i:03d}.{fmt}")
    return root


def preprocessing(size: int, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct: float = 1.0,
                  interpolation: str = "bilinear") -> dict:
    """A pretrained_cfg's preprocessing (what classifier.transforms builds transforms from)."""
    return {"input_size": (len(mean), size, size), "mean": tuple(mean), "std": tuple(std), "crop_pct": crop_pct,
            "interpolation": interpolation}


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file, the format of MNIST and Fashion-MNIST (what torchvision reads)."""
    import struct

    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_fashion_mnist(root: Path, train: int = 60, test: int = 20, seed: int = 0) -> Path:
    """root/FashionMNIST/raw/*-ubyte as torchvision expects them: 28 px grey shapes, ten labels."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = np.arange(n) % 10
        images = np.stack([np.asarray(draw_shape(CLASSES[label % 3], 28, rng).convert("L")) for label in labels])
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "shapes", per_class=20)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests, whatever an earlier test (a training run) set."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Decoded-data and archive caches in a temporary folder, never the user's ~/.cache."""
    monkeypatch.setenv("CLASSIFIER_CACHE", str(tmp_path_factory.getbasetemp() / "classifier-cache"))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A bundle of a small fast_cnn trained for 3 epochs on generated shapes (a few seconds)."""
    from classifier.config import RunConfig
    from classifier.run import run

    base = tmp_path_factory.mktemp("tiny")
    os.environ["CLASSIFIER_CACHE"] = str(base / "cache")
    data = make_image_folder(base / "shapes", per_class=40, splits=("train", "test"))
    result = run(RunConfig(data=str(data), model="fast_cnn", model_args={"widths": [16, 32, 64]},
                           epochs=3, batch_size=32, lr=0.05, workers=0, out=str(base / "run"),
                           command="python training/finetune.py --data shapes --model fast_cnn"))
    return result.bundle_dir
