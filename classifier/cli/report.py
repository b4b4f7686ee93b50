"""`python -m classifier report {data,model,samples} ...`: the reports as Markdown plus pictures.

    python -m classifier report data --data cifar10 --data-dir cifar10-jpeg.tar.gz --out runs/report-data
    python -m classifier report model --model tutorial_mlp tutorial_tanh_cnn --num-classes 2
    python -m classifier report model --bundle runs/latest/bundle --image photo.jpg
    python -m classifier report samples runs/latest/bundle [--data ...] [--split test]

Each writes its files (report.md, report.json and PNGs) into --out and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from classifier.bundle import load_bundle
from classifier.cli.common import DEFAULTS, classes_value, fraction_value, report
from classifier.data import load_data
from classifier.errors import USER_ERRORS
from classifier.images import open_image
from classifier.reevaluate import DataChoice, bundle_data, rerun_config
from classifier.reports import dataset as dr
from classifier.reports import model as mr
from classifier.reports.samples import samples_report
from classifier.transforms import eval_transform

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"


def _data_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--data", required=required,
                   help="cifar10, fashion-mnist, an image folder, a .tar.gz of one, or a CSV of id,label")
    p.add_argument("--data-dir", default=None, help="where cifar10/fashion-mnist live")
    p.add_argument("--image-dir", default=None, help="with a CSV: the folder of images")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m classifier report", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="report", required=True)

    d = sub.add_parser("data", help="class counts, channel statistics, sizes and modes, samples, unreadable files",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _data_args(d, required=True)
    d.add_argument("--classes", type=classes_value, default=None, help="comma-separated subset of classes")
    d.add_argument("--val-fraction", type=fraction_value, default=DEFAULTS.val_fraction)
    d.add_argument("--test-fraction", type=fraction_value, default=DEFAULTS.test_fraction)
    d.add_argument("--per-class", type=int, default=8, help="sample images per class in samples.png")
    d.add_argument("--inspect", type=int, default=2000,
                   help="images per split whose size, mode and format are read and fully decoded")
    d.add_argument("--seed", type=int, default=DEFAULTS.seed)
    d.add_argument("--out", default="runs/reports/data")

    m = sub.add_parser("model", help="parameters per layer, filters, one image's channels, edges and feature maps",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = m.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", nargs="+", help="one model name, or several to compare side by side")
    source.add_argument("--bundle", help="a trained bundle (folder or Hub id) instead of a name")
    m.add_argument("--num-classes", type=int, default=10)
    m.add_argument("--in-chans", type=int, default=3)
    m.add_argument("--image-size", type=int, default=None, help="default: the model's own input size")
    m.add_argument("--model-args", type=json.loads, default={}, help='JSON of model arguments, e.g. \'{"c1": 32}\'')
    m.add_argument("--pretrained", action="store_true", help="with ImageNet weights (their filters are worth seeing)")
    m.add_argument("--image", default=None, help=f"the image for the feature maps (default: the first in {EXAMPLES.name}/)")
    m.add_argument("--out", default="runs/reports/model")

    s = sub.add_parser("samples", help="a grid of a bundle's predictions on random test images (green right, red wrong)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("bundle", help="a bundle folder or Hub id")
    _data_args(s, required=False)
    s.add_argument("--split", choices=["test", "val", "train"], default="test")
    s.add_argument("--count", type=int, default=32)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    s.add_argument("--out", default="runs/reports/samples.png")
    return p


def _write(out: Path, markdown: str, payload: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown)
    (out / "report.json").write_text(json.dumps(payload, indent=1))


def data_command(args) -> int:
    # The report lists unreadable files itself; the loader's warning would say it twice.
    logging.getLogger("classifier.data").setLevel(logging.ERROR)
    data = load_data(args.data, data_dir=args.data_dir, image_dir=args.image_dir, classes=args.classes,
                     val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed)
    found = dr.dataset_report(data, max_inspect=args.inspect, seed=args.seed)
    out = Path(args.out)
    samples = dr.plot_class_samples(data, out / "samples.png", per_class=args.per_class, seed=args.seed)
    counts = dr.plot_class_counts(found, out / "counts.png")
    markdown = dr.to_markdown(found)
    _write(out, markdown, found.to_dict())
    (out / "unreadable.txt").write_text("".join(u + "\n" for u in found.unreadable))
    print(markdown)
    print(f"pictures: {samples}, {counts}\nreport: {out / 'report.md'}")
    return 0


def _feature_image(args, channels: int):
    path = Path(args.image) if args.image else next(iter(sorted(EXAMPLES.glob("*.jpg"))), None)
    return (open_image(path, channels), path) if path else (None, None)


def model_command(args) -> int:
    out = Path(args.out)
    if args.bundle:
        bundle = load_bundle(args.bundle)
        models = [(bundle.architecture, bundle.model, tuple(bundle.pretrained_cfg["input_size"]), bundle.eval_transform())]
    else:
        models = []
        for name in args.model:
            model, size = mr.model_from_name(name, args.num_classes, args.in_chans, args.image_size,
                                             args.pretrained, **args.model_args)
            cfg = getattr(model, "pretrained_cfg", {}) or {}
            mean = cfg.get("mean", (0.5,) * args.in_chans)
            std = cfg.get("std", (0.5,) * args.in_chans)
            if len(mean) != args.in_chans:  # a grey-scale model built from an RGB config
                mean, std = (sum(mean) / len(mean),) * args.in_chans, (sum(std) / len(std),) * args.in_chans
            preprocessing = {"input_size": size, "mean": mean, "std": std, "crop_pct": 1.0,
                             "interpolation": cfg.get("interpolation", "bilinear")}
            models.append((name, model, size, eval_transform(preprocessing)))

    reports, pictures = [], []
    for name, model, size, transform in models:
        torch.manual_seed(0)
        layers = mr.model_report(model, size, name)
        reports.append(layers)
        folder = out / name if len(models) > 1 else out
        filters = mr.plot_filters(model, folder / "filters.png")
        image, image_path = _feature_image(args, size[0])
        maps = mr.plot_feature_maps(model, image, transform, folder / "feature_maps.png") if image else None
        pictures += [p for p in (filters, maps) if p]
        pictures += mr.plot_network_figures(model, image, size, folder).values()
        markdown = mr.to_markdown(layers)
        if not filters:
            markdown += "\nNo convolution: every input pixel has its own weights, so there are no filters to show.\n"
        elif maps:
            markdown += f"\nFeature maps of {image_path}.\n"
        else:
            markdown += "\nNo image for the feature maps: pass --image photo.jpg.\n"
        _write(folder, markdown, layers.to_dict())
        print(markdown)
    if len(reports) > 1:
        comparison = mr.comparison_markdown(reports)
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.md").write_text(comparison)
        print(comparison)
    if pictures:
        print("pictures: " + ", ".join(map(str, pictures)))
    return 0


def samples_command(args) -> int:
    bundle = load_bundle(args.bundle, device=args.device)
    cfg = rerun_config(bundle, args.bundle, DataChoice(args.data, args.data_dir, args.image_dir), device=args.device)
    data = bundle_data(bundle, cfg)
    result = samples_report(bundle, data, args.out, args.split, args.count, args.seed)
    print(f"{bundle.architecture} on {data.name} {args.split}: accuracy {result['accuracy']:.4f} over "
          f"{result['images']:,} images; {result['shown']} shown, {result['shown_wrong']} of them wrong")
    print(f"picture: {result['plot']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    command = {"data": data_command, "model": model_command, "samples": samples_command}[args.report]
    try:
        return command(args)
    except (*USER_ERRORS, FileNotFoundError) as exc:
        return report(exc)


if __name__ == "__main__":
    sys.exit(main())
