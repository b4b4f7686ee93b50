"""One preprocessing: the same images through every eval-time path give the same tensors.

The paths: the Predictor (the app, `predict`), training's validation through the DataLoader path,
the in-memory device loader (its own tensor code, kept for speed), the reports, and the model
card's plain-timm snippet, executed as a user would paste it. The reference is the bundle's own
transform (Bundle.eval_transform, classifier.transforms). Checked for both shipped bundles (an
upscaled 32 px source at 160 px, bicubic; and 32 px native) and a 28 px one-channel source.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from classifier.bundle import load_bundle
from classifier.config import RunConfig
from classifier.data import load_pil
from classifier.model_card import render_model_card
from classifier.predict import Predictor
from classifier.run import load_run_data, prepare, run
from tests.conftest import make_fashion_mnist, make_image_folder

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "assets" / "models"
# One uint8 step, in normalised units, for the narrowest std of the shipped bundles (0.2435):
# the device loader resizes in float and rounds as Pillow does, so at most one step apart.
ONE_STEP = 1 / 255 / 0.2435


@pytest.fixture(scope="module")
def shapes32(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("pre") / "shapes", per_class=6, splits=("train", "val", "test"))


@pytest.fixture(scope="module")
def grey_bundle(tmp_path_factory, one_torch_thread) -> tuple[Path, dict]:
    """A one-channel fast_cnn trained for an epoch on a 28 px grey source (Fashion-MNIST's files)."""
    base = tmp_path_factory.mktemp("grey")
    data = {"data": "fashion-mnist", "data_dir": str(make_fashion_mnist(base / "fmnist", train=60, test=20))}
    result = run(RunConfig(**data, model="fast_cnn", model_args={"widths": [8, 16]}, epochs=1, batch_size=16,
                           workers=0, out=str(base / "run"), recipe="none", mistakes=0))
    return result.bundle_dir, data


def eval_paths(bundle_dir: Path, data: dict) -> dict[str, torch.Tensor]:
    """The validation images of `data` through each path, in the same order."""
    bundle = load_bundle(bundle_dir)
    common = dict(data, model=bundle.architecture, init_from=str(bundle_dir), batch_size=4, workers=0)
    loaded = load_run_data(RunConfig(**common))
    images = [load_pil(item, bundle.in_chans) for item in loaded.val.items]
    predictor = Predictor(bundle)
    out = {"predictor": torch.stack([predictor.preprocess(image) for image in images]),
           "bundle.eval_transform": torch.stack([bundle.eval_transform()(image) for image in images])}
    for loader in ("workers", "memory"):
        setup = prepare(RunConfig(**common, loader=loader), torch.device("cpu"), data=loaded, source=bundle)
        batches = [(x.float(), idx) for x, _, idx in setup.val_loader]
        x = torch.cat([b[0] for b in batches])[torch.cat([b[1] for b in batches]).argsort()]
        out[f"training validation ({loader} loader)"] = x.contiguous()
    return out


def assert_same(paths: dict[str, torch.Tensor], tolerance: float = 1e-6, device_tolerance: float = 1e-6):
    reference = paths["bundle.eval_transform"]
    for name, tensor in paths.items():
        assert tensor.shape == reference.shape, name
        limit = device_tolerance if "memory" in name else tolerance
        difference = float((tensor - reference).abs().max())
        assert difference <= limit, f"{name} differs from the bundle's transform by {difference:.2e}"


@pytest.mark.parametrize("shipped", ["cifar10-efficientnet-lite0", "cifar10-cnn"])
def test_the_shipped_bundles_see_one_preprocessing(shipped, shapes32, one_torch_thread):
    paths = eval_paths(SHIPPED / shipped, {"data": str(shapes32)})
    assert paths["predictor"].shape[-1] == load_bundle(SHIPPED / shipped).pretrained_cfg["input_size"][-1]
    assert_same(paths, device_tolerance=ONE_STEP * 1.01)


def test_a_grey_28px_source_sees_one_preprocessing(grey_bundle):
    bundle_dir, data = grey_bundle
    assert load_bundle(bundle_dir).in_chans == 1
    paths = eval_paths(bundle_dir, data)
    assert paths["predictor"].shape[1:] == (1, 28, 28)
    assert_same(paths)  # no resize: the device loader's tensors are exactly the transform's


def card_snippet(bundle_dir: Path, photo: Path) -> str:
    """The plain-timm code block of the bundle's model card, pointed at the local folder and `photo`."""
    blocks = re.findall(r"```python\n(.*?)```", render_model_card(bundle_dir), flags=re.S)
    plain = next(b for b in blocks if "timm.create_model" in b)
    return (plain.replace('"hf-hub:OWNER/NAME"', f'"local-dir:{bundle_dir}"')
            .replace('"photo.jpg"', f'"{photo}"'))


@pytest.mark.parametrize("shipped", ["cifar10-efficientnet-lite0", "cifar10-cnn"])
def test_the_model_cards_snippet_preprocesses_and_predicts_as_the_predictor(shipped, tmp_path, one_torch_thread):
    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, (300, 420, 3), dtype=np.uint8)).save(photo)  # a photo-sized image
    bundle_dir = SHIPPED / shipped
    scope: dict = {}
    exec(compile(card_snippet(bundle_dir, photo), "model card", "exec"), scope)  # noqa: S102  (our own card)
    predictor = Predictor(bundle_dir)
    assert torch.allclose(scope["image"][0], predictor.preprocess(photo), atol=1e-6)
    expected = predictor.probabilities(predictor.preprocess(photo).unsqueeze(0))[0]
    assert torch.allclose(scope["probabilities"], expected, atol=1e-5)
