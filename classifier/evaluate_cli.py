"""`python -m classifier.evaluate BUNDLE`: evaluate a trained bundle again, as training did.

Like timm's validate.py, for this project's bundles: the test split of the data the bundle was
trained on (or of --data), through the same loaders and preprocessing as training's own
evaluation, with the temperature fitted again on the validation split. It prints the figures
beside the ones the bundle records: with the same settings they match (a check that the bundle
reproduces), and with another --tta they say what test-time augmentation buys. --write makes the
new evaluation the bundle's own (eval/, config.json's metrics, temperature and TTA, the model
card), so the app and Predictor predict as it was measured, without retraining.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from classifier.tta import TTA_MODES, tta_mode

# The data fields of a run's config that decide which images end up in the test split.
DATA_FIELDS = ("data", "data_dir", "image_dir", "classes", "val_fraction", "test_fraction", "seed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m classifier.evaluate", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("bundle", help="a bundle folder (runs/NAME/bundle) or a Hub id (owner/name)")
    p.add_argument("--data", help="default: the data the bundle was trained on, as its config records it")
    p.add_argument("--data-dir", help="with --data: where cifar10/fashion-mnist live")
    p.add_argument("--image-dir", help="with --data CSV: the folder of images")
    p.add_argument("--tta", choices=list(TTA_MODES), default=None,
                   help="test-time augmentation (default: the one the bundle was evaluated with)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (evaluation uses twice this)")
    p.add_argument("--loader", choices=["auto", "memory", "workers"], default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--mistakes", type=int, default=None,
                   help="with --write: misclassified test images to keep (default: as many as its training kept)")
    p.add_argument("--write", action="store_true",
                   help="make this evaluation the bundle's own (a local folder only): eval/, config.json, README.md")
    return p


def run_config(bundle, location: str, args: argparse.Namespace):
    """The RunConfig that prepares the bundle's data as its training run did, the model from the bundle."""
    from classifier.bundle import BundleError
    from classifier.experiment import RunConfig

    recorded = bundle.project.get("training", {})
    values = {k: recorded[k] for k in DATA_FIELDS if k in recorded}
    if args.data:  # other data: its own splits, not the recorded subset of classes
        values = {"data": args.data, "data_dir": args.data_dir, "image_dir": args.image_dir}
    if "data" not in values:
        raise BundleError(f"{location} does not record the data it was trained on: name it with --data")
    return RunConfig(**values, model=bundle.architecture, init_from=str(bundle.path),
                     image_size=int(bundle.pretrained_cfg["input_size"][-1]), batch_size=args.batch_size,
                     loader=args.loader, workers=args.workers, device=args.device)


def comparison_table(recorded: dict, measured: dict) -> str:
    """Markdown: each figure as the bundle records it and as measured now."""
    def calibration(key):
        return lambda m: m.get("calibration", {}).get(key)

    def field(key):
        return lambda m: m.get(key)

    percent, decimals = "{:.2%}".format, "{:.4f}".format
    rows = [("test-time augmentation", lambda m: tta_mode(m.get("tta")), str),  # older bundles: a bool
            ("accuracy", field("accuracy"), percent), ("validation accuracy", field("val_accuracy"), percent),
            ("macro F1", field("macro_f1"), decimals),
            ("cross-entropy (calibrated)", field("loss"), decimals),
            ("ECE before calibration", calibration("ece_before"), percent), ("ECE after calibration", field("ece"), percent),
            ("temperature", calibration("temperature"), "{:.3f}".format), ("test images", field("num_samples"), "{:,}".format)]
    # A bundle not evaluated yet (a new soup, say) has no recorded column.
    columns = [("recorded in the bundle", recorded)] if recorded else []
    columns.append(("measured now", measured))
    lines = ["| | " + " | ".join(name for name, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, get, fmt in rows:
        cells = [fmt(v) if v is not None else "" for v in (get(figures) for _, figures in columns)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_evaluation(bundle, evaluation, data, mistakes: int, command: str) -> None:
    """The bundle's eval/, config.json and model card from `evaluation`; its weights are untouched
    and its training figures (epochs, time) carried over."""
    from classifier.bundle import EVAL_DIR, write_config
    from classifier.model_card import write_model_card

    previous = bundle.eval_metrics() or {}
    for key in ("best_epoch", "epochs_trained", "stopped_early", "train_seconds"):
        if key in previous:
            evaluation.metrics[key] = previous[key]
    evaluation.save(bundle.path / EVAL_DIR, data, bundle.in_chans, mistakes)
    config = dict(bundle.config)
    config["classifier"] = bundle.project | evaluation.project_fields() | {"evaluation_command": command}
    write_config(bundle.path, config)
    write_model_card(bundle.path)


def main(argv: list[str] | None = None) -> int:
    from classifier.allocator import keep_freed_memory
    from classifier.bundle import BundleError, is_hub_id, load_bundle
    from classifier.evaluate import MISTAKES_DIR, evaluate_model
    from classifier.experiment import USER_ERRORS, RunConfig, load_run_data, prepare
    from classifier.train import autocast_dtype, pick_device

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if args.write and is_hub_id(args.bundle):
            raise BundleError(f"--write rewrites a local bundle folder; {args.bundle} is on the Hub "
                              f"(download it, evaluate the copy, and push that)")
        bundle = load_bundle(args.bundle)
        cfg = run_config(bundle, args.bundle, args)
        device = pick_device(cfg.device)
        keep_freed_memory(device)  # faster CPU evaluation: see classifier/allocator.py
        data = load_run_data(cfg)
        if data.classes != bundle.label_names:
            raise BundleError(f"the data's classes {data.classes} are not the bundle's {bundle.label_names}")
        setup = prepare(cfg, device, data=data, source=bundle)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tta = bundle.tta if args.tta is None else args.tta
    begun = time.perf_counter()
    evaluation = evaluate_model(setup.model, setup.val_loader, setup.test_loader, data.classes, device,
                                autocast_dtype(device, bundle.project.get("training", {}).get("amp", "auto")), tta)
    seconds = time.perf_counter() - begun
    print(f"{args.bundle} on the test split of {data.name} ({len(data.test):,} images), {device}, "
          f"{seconds:.0f} s\n")
    print(comparison_table(bundle.metrics(), evaluation.metrics))
    if args.write:
        kept = bundle.project.get("training", {}).get("mistakes", RunConfig.mistakes)  # as training kept
        write_evaluation(bundle, evaluation, data, args.mistakes if args.mistakes is not None else kept,
                         "python -m classifier.evaluate " + shlex.join(argv))
        print(f"\nwrote {bundle.path}/eval, config.json and README.md (mistakes in eval/{MISTAKES_DIR}/)")
    return 0
