"""The model report: where a network's parameters are, and what its first layers see.

A table of the layers that hold parameters (output shape, parameter count, memory), totals by kind
(convolution, fully connected, normalisation), the first convolution's filters as a picture, the
weights of every convolution layer, and what one image is to the network: its channels' pixel
values, a hand-set edge kernel applied to it, and the feature maps it produces in the first
convolutions. The tutorials' lesson shows in
the totals: a fully connected net on 32x32 colour images (tutorial_mlp, 3.7M parameters) against
a small CNN on the same images (tutorial_tanh_cnn, 18,090) - the convolution shares its weights
across the image, the linear layer needs one per pixel.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn

from classifier.models import conv_filters, create_model, is_project_model
from classifier.plots import plot_conv_filters, plot_edge_kernel, plot_image_channels, plt, save_figure

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)
LINEAR = (nn.Linear,)
NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d)


def kind_of(module: nn.Module) -> str:
    if isinstance(module, CONV):
        return "convolution"
    if isinstance(module, LINEAR):
        return "fully connected"
    if isinstance(module, NORM) or "norm" in type(module).__name__.lower():
        return "normalisation"
    return "other"


@dataclass
class LayerRow:
    name: str
    type: str
    kind: str
    output_shape: tuple[int, ...] | None  # per image, without the batch dimension
    parameters: int
    bytes: int


@dataclass
class ModelReport:
    name: str
    input_size: tuple[int, int, int]  # (channels, height, width)
    num_classes: int
    layers: list[LayerRow] = field(default_factory=list)

    @property
    def parameters(self) -> int:
        return sum(r.parameters for r in self.layers)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.layers)

    def by_kind(self) -> dict[str, int]:
        totals = {"convolution": 0, "fully connected": 0, "normalisation": 0, "other": 0}
        for row in self.layers:
            totals[row.kind] += row.parameters
        return totals

    def to_dict(self) -> dict:
        return {"name": self.name, "input_size": list(self.input_size), "num_classes": self.num_classes,
                "parameters": self.parameters, "bytes": self.bytes, "by_kind": self.by_kind(),
                "layers": [vars(r) | {"output_shape": list(r.output_shape) if r.output_shape else None}
                           for r in self.layers]}


@torch.no_grad()
@contextmanager
def watching(model: nn.Module, modules: dict[str, nn.Module], record):
    """`model` in eval mode with record(name, output) hooked onto `modules`; afterwards the hooks
    are gone and the model is in the mode it was in, whatever the forward pass raised."""
    hooks = [module.register_forward_hook(lambda _m, _i, output, key=name: record(key, output))
             for name, module in modules.items()]
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)


def model_report(model: nn.Module, input_size: tuple[int, int, int], name: str = "") -> ModelReport:
    """One row per module that holds parameters of its own, with its output shape for one image."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(key: str, output) -> None:
        if isinstance(output, torch.Tensor):
            shapes[key] = tuple(output.shape[1:])

    device = next(model.parameters()).device
    with watching(model, dict(model.named_modules()), record):
        model(torch.zeros(1, *input_size, device=device))
    report = ModelReport(name or type(model).__name__, tuple(input_size), int(getattr(model, "num_classes", 0)))
    for module_name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        report.layers.append(LayerRow(
            name=module_name or "(model)", type=type(module).__name__, kind=kind_of(module),
            output_shape=shapes.get(module_name), parameters=sum(p.numel() for p in own),
            bytes=sum(p.numel() * p.element_size() for p in own)))
    return report


def model_from_name(name: str, num_classes: int = 10, in_chans: int = 3, image_size: int | None = None,
                    pretrained: bool = False, **model_args) -> tuple[nn.Module, tuple[int, int, int]]:
    """A model as `classifier.models.create_model` builds it, and the input size to show it with."""
    cfg = timm.models.get_pretrained_cfg(name)
    default = int(cfg.input_size[-1]) if cfg is not None else 224
    size = image_size or default
    if cfg is not None and cfg.fixed_input_size and is_project_model(name):
        model_args.setdefault("img_size", size)  # the tutorial nets size their linear layers by it
    model = create_model(name, num_classes=num_classes, in_chans=in_chans, pretrained=pretrained, **model_args)
    return model.eval(), (in_chans, size, size)


def format_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def to_markdown(report: ModelReport, max_rows: int = 200) -> str:
    total = max(report.parameters, 1)
    c, h, w = report.input_size
    lines = [f"# Model report: {report.name}", "",
             f"Input {c}x{h}x{w}, {report.num_classes} classes: **{report.parameters:,} parameters** "
             f"({format_bytes(report.bytes)} as float32)", "",
             "| layer | type | output shape | parameters | share | memory |", "|---|---|---|---:|---:|---:|"]
    for row in report.layers[:max_rows]:
        shape = "x".join(map(str, row.output_shape)) if row.output_shape else ""
        lines.append(f"| {row.name} | {row.type} | {shape} | {row.parameters:,} | "
                     f"{row.parameters / total:.1%} | {format_bytes(row.bytes)} |")
    if len(report.layers) > max_rows:
        lines.append(f"| ... {len(report.layers) - max_rows} more layers | | | | | |")
    lines += ["", "| kind | parameters | share |", "|---|---:|---:|"]
    lines += [f"| {kind} | {n:,} | {n / total:.1%} |" for kind, n in report.by_kind().items() if n]
    return "\n".join(lines) + "\n"


def comparison_markdown(reports: list[ModelReport]) -> str:
    """Several models side by side: the tutorials' fully connected vs convolutional lesson."""
    lines = ["| model | input | parameters | convolution | fully connected | memory |", "|---|---|---:|---:|---:|---:|"]
    for r in reports:
        kinds = r.by_kind()
        lines.append(f"| {r.name} | {'x'.join(map(str, r.input_size))} | {r.parameters:,} | "
                     f"{kinds['convolution']:,} | {kinds['fully connected']:,} | {format_bytes(r.bytes)} |")
    smallest = min(reports, key=lambda r: r.parameters)
    largest = max(reports, key=lambda r: r.parameters)
    if largest.parameters > smallest.parameters:
        lines += ["", f"{largest.name} has {largest.parameters / smallest.parameters:,.0f}x the parameters of "
                      f"{smallest.name}."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Pictures


def first_conv(model: nn.Module) -> nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def plot_filters(model: nn.Module, path: str | os.PathLike, max_filters: int = 64) -> Path | None:
    """The first convolution's kernels, each scaled to its own range; colour when it reads RGB.

    None when the model has no convolution (a fully connected net has no filters to show).
    """
    conv = first_conv(model)
    if conv is None:
        return None
    weight = conv.weight.detach().float().cpu()[:max_filters]  # (out, in, kh, kw)
    n = len(weight)
    columns = min(8, n)
    rows = int(np.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 0.9, rows * 0.9 + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, kernel in zip(axes.flat, weight):
        low, high = kernel.min(), kernel.max()
        kernel = (kernel - low) / (high - low + 1e-12)
        if kernel.shape[0] == 3:
            ax.imshow(kernel.permute(1, 2, 0).numpy(), interpolation="nearest")
        else:  # grey-scale input, or many channels: the mean over the input channels
            ax.imshow(kernel.mean(0).numpy(), cmap="gray", interpolation="nearest")
    k = tuple(conv.kernel_size)
    fig.suptitle(f"first convolution: {conv.out_channels} filters of {conv.in_channels}x{k[0]}x{k[1]}"
                 + (f" (first {max_filters})" if conv.out_channels > max_filters else ""), fontsize=9)
    return save_figure(fig, path, dpi=110)


@torch.no_grad()
def plot_feature_maps(model: nn.Module, image: Image.Image, transform, path: str | os.PathLike,
                      max_layers: int = 4, per_layer: int = 8) -> Path | None:
    """What one image becomes in the first `max_layers` convolutions: their most active channels.

    Each row is a convolution's output; the channels shown are the ones with the largest variance
    on this image (the informative ones, rather than the first few). None without convolutions.
    """
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][:max_layers]
    if not convs:
        return None
    outputs: dict[str, torch.Tensor] = {}
    device = next(model.parameters()).device
    x = transform(image)
    with watching(model, dict(convs), lambda key, out: outputs.__setitem__(key, out.detach().float().cpu())):
        model(x.unsqueeze(0).to(device))
    # The input as the model sees it (resized, cropped), stretched to [0, 1] for display.
    shown = ((x - x.min()) / (x.max() - x.min() + 1e-12)).permute(1, 2, 0).squeeze(-1).numpy()
    fig, axes = plt.subplots(len(convs), per_layer + 1, figsize=((per_layer + 1) * 1.1, len(convs) * 1.25),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, (name, _) in enumerate(convs):
        maps = outputs[name][0]  # (channels, h, w)
        axes[row, 0].imshow(shown, cmap="gray" if shown.ndim == 2 else None)
        axes[row, 0].set_title(f"{name}\n{'x'.join(map(str, maps.shape))}", fontsize=6)
        order = maps.flatten(1).var(1).argsort(descending=True)[:per_layer]
        for col, channel in enumerate(order.tolist(), start=1):
            axes[row, col].imshow(maps[channel].numpy(), cmap="viridis")
            axes[row, col].set_title(f"ch {channel}", fontsize=6)
    fig.suptitle("feature maps of the first convolutions (most varied channels)", fontsize=9)
    return save_figure(fig, path, dpi=110)


# plot_image_channels writes the pixel values only up to this size (beyond, they are illegible).
CHANNEL_VALUES_SIDE = 16
# Panels of the every-layer filter figure: a pretrained EfficientNet has some 50 convolutions, and
# a figure of them all would be metres tall; the lessons' networks have two to four.
MAX_FILTER_LAYERS = 8


def input_image(image: Image.Image, input_size: tuple[int, int, int]) -> Image.Image:
    """`image` resized to the network's input (channels, height, width): the pixels it receives
    before normalisation (the evaluation's crop, where it has one, is left out)."""
    _, h, w = input_size
    return image.resize((w, h), Image.Resampling.BICUBIC) if image.size != (w, h) else image


def centre_crop(image: Image.Image, side: int) -> Image.Image:
    w, h = image.size
    if w <= side and h <= side:
        return image
    left, top = max(0, (w - side) // 2), max(0, (h - side) // 2)
    return image.crop((left, top, left + min(side, w), top + min(side, h)))


def plot_network_figures(model: nn.Module, image: Image.Image | None, input_size: tuple[int, int, int],
                         folder: str | os.PathLike) -> dict[str, Path]:
    """The figures of the tutorials that need a network and one image, by name:
    conv_filters.png, the weights of every convolution layer (the first MAX_FILTER_LAYERS);
    channels.png, the red, green and blue pixel values of the image's centre 16x16 at the
    network's input size (colour networks only: a grey one reads one channel); edges.png, Sobel's
    hand-set 3x3 vertical-edge kernel applied to the image, the kind of filter a first layer learns.
    A network without convolutions gets no filter figure; without an image, only the filters."""
    folder = Path(folder)
    written: dict[str, Path] = {}
    layers = conv_filters(model)
    if layers:
        written["conv_filters"] = plot_conv_filters(layers[:MAX_FILTER_LAYERS], folder / "conv_filters.png")
    if image is None:
        return written
    seen = input_image(image, input_size)
    if input_size[0] == 3:
        written["channels"] = plot_image_channels(centre_crop(seen.convert("RGB"), CHANNEL_VALUES_SIDE),
                                                  folder / "channels.png", values_up_to=CHANNEL_VALUES_SIDE)
    written["edges"] = plot_edge_kernel(seen, folder / "edges.png")
    return written
