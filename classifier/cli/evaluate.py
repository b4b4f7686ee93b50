"""`python -m classifier evaluate BUNDLE [--data LABELLED]`: evaluate a trained bundle again, or on your own labelled data.

Like timm's validate.py, for this project's bundles: the split of the data the bundle was trained
on that its evaluation shows, through the same loaders and preprocessing as training's own
evaluation, with the temperature fitted again on the validation split. It prints the figures
beside the ones the bundle records: with the same settings they match (a check that the bundle
reproduces), and with another --tta they say what test-time augmentation buys. With --data, a
labelled folder (root/<class>/*), CSV or dataset of your own: every image of it (or its test split,
where it has one), whose classes may be some of the model's; accuracy with its 95% interval and
per class. --write makes the new evaluation the bundle's own (eval/, config.json's metrics,
temperature and TTA, the model card), so the app and Predictor predict as it was measured.
"""

from __future__ import annotations

import argparse
import sys
import time

from classifier.allocator import keep_freed_memory
from classifier.bundle import MISTAKES_DIR, is_hub_id, load_bundle
from classifier.cli.common import DEFAULTS, add_running_options, command_line, report
from classifier.errors import USER_ERRORS, BundleError
from classifier.intervals import describe_accuracy
from classifier.reevaluate import (EVAL_BATCH_SIZE, OOD_OTHER_LIMIT, DataChoice, evaluate_bundle, evaluate_labelled,
                                   labelled_images, rerun_config, write_evaluation)
from classifier.runtime import pick_device
from classifier.tta import TTA_MODES, tta_mode

PROG = "python -m classifier evaluate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("bundle", help="a bundle folder (runs/NAME/bundle) or a Hub id (owner/name)")
    p.add_argument("--data", help="labelled data of your own: a folder (root/<class>/*), CSV or dataset whose classes are "
                                  "among the model's (default: the data the bundle was trained on, as its config records it)")
    p.add_argument("--data-dir", help="with --data: where cifar10/fashion-mnist live")
    p.add_argument("--image-dir", help="with --data CSV: the folder of images")
    p.add_argument("--tta", choices=list(TTA_MODES), default=None,
                   help="test-time augmentation (default: the one the bundle was evaluated with)")
    p.add_argument("--batch-size", type=int, default=EVAL_BATCH_SIZE, help="images per forward pass (evaluation uses twice this)")
    p.add_argument("--loader", choices=["auto", "memory", "workers"], default=DEFAULTS.loader)
    add_running_options(p)
    p.add_argument("--mistakes", type=int, default=None,
                   help="with --write: misclassified test images to keep, most confident first (default: every one)")
    p.add_argument("--ood-data", metavar="NAME",
                   help="labelled images of none of the model's classes (e.g. fashion-mnist for a CIFAR-10 model) "
                        "to measure the out-of-distribution flag on, beside the synthetic images; at most "
                        f"{OOD_OTHER_LIMIT:,} of its test split")
    p.add_argument("--ood-data-dir", help="with --ood-data: where it lives")
    p.add_argument("--write", action="store_true",
                   help="make this evaluation the bundle's own (a local folder only): eval/, config.json, README.md")
    return p


def comparison_table(recorded: dict, measured: dict) -> str:
    """Markdown: each figure as the bundle records it and as measured now."""
    def calibration(key):
        return lambda m: m.get("calibration", {}).get(key)

    def field(key):
        return lambda m: m.get(key)

    percent, decimals = "{:.2%}".format, "{:.4f}".format

    def interval(values) -> str:
        return f"{values[0]:.1%}-{values[1]:.1%}"

    rows = [("test-time augmentation", lambda m: tta_mode(m.get("tta")), str),  # older bundles: a bool
            ("split", lambda m: m.get("split", "test"), str),
            ("accuracy", field("accuracy"), percent), ("accuracy, 95% interval", field("accuracy_ci95"), interval),
            ("validation accuracy", field("val_accuracy"), percent),
            ("macro F1", field("macro_f1"), decimals),
            ("cross-entropy (calibrated)", field("loss"), decimals),
            ("ECE before calibration", calibration("ece_before"), percent), ("ECE after calibration", field("ece"), percent),
            ("temperature", calibration("temperature"), "{:.3f}".format), ("images", field("num_samples"), "{:,}".format)]
    # A bundle not evaluated yet (a new soup, say) has no recorded column.
    columns = [("recorded in the bundle", recorded)] if recorded else []
    columns.append(("measured now", measured))
    lines = ["| | " + " | ".join(name for name, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, get, fmt in rows:
        cells = [fmt(v) if v is not None else "" for v in (get(figures) for _, figures in columns)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ood_table(record: dict) -> str:
    """The out-of-distribution flag's threshold and the share of each set it flags."""
    lines = [f"out-of-distribution flag: energy below {record['threshold']:.4g} (keeps {record['keep']:.0%} of "
             f"{record['num_fitted']:,} validation images)", f"{'images':<28}{'n':>7}  flagged"]
    rates = {f"{split} (in domain)": rate for split, rate in (record.get("in_domain") or {}).items()}
    rates.update(record.get("out_of_domain") or {})
    lines += [f"{name:<28}{rate['n']:>7,}  {rate['flagged']:.1%}" for name, rate in rates.items()
              if rate.get("flagged") is not None]
    return "\n".join(lines)


def per_class_table(metrics: dict) -> str:
    """Markdown: each class the data has, its images and accuracy (recall) with its 95% interval."""
    lines = ["| class | images | accuracy | 95% interval |", "|---|---|---|---|"]
    for c in metrics["per_class"]:
        if c["support"]:
            low, high = c.get("accuracy_ci95", (None, None))
            band = f"{low:.1%}-{high:.1%}" if low is not None else ""
            lines.append(f"| {c['class']} | {c['support']:,} | {c['accuracy']:.1%} | {band} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        if args.write and is_hub_id(args.bundle):
            raise BundleError(f"--write rewrites a local bundle folder; {args.bundle} is on the Hub "
                              f"(download it, evaluate the copy, and push that)")
        bundle = load_bundle(args.bundle)
        device = pick_device(args.device)
        keep_freed_memory(device)  # faster CPU evaluation: see classifier/allocator.py
        begun = time.perf_counter()
        if args.data:
            print(f"loading {args.data} ...", file=sys.stderr, flush=True)
            data, described = labelled_images(DataChoice(args.data, args.data_dir, args.image_dir), bundle.label_names)
            evaluation = evaluate_labelled(bundle, data, tta=args.tta, batch_size=args.batch_size,
                                           workers=args.workers, device=str(device))
        else:
            cfg = rerun_config(bundle, args.bundle, batch_size=args.batch_size, loader=args.loader,
                               workers=args.workers, device=args.device)
            print(f"loading {cfg.data} as {args.bundle} was trained on it ...", file=sys.stderr, flush=True)
            other = DataChoice(args.ood_data, args.ood_data_dir) if args.ood_data else None
            evaluation, data = evaluate_bundle(bundle, cfg, args.tta, ood_data=other)
    except USER_ERRORS as exc:
        return report(exc)
    seconds = time.perf_counter() - begun
    m = evaluation.metrics
    if args.data:
        print(f"{args.bundle} on {described}, {device}, {seconds:.0f} s\n")
        print(f"accuracy {describe_accuracy(m['accuracy'], m['accuracy_ci95'], m['num_samples'])}  "
              f"macro F1 {m['macro_f1']:.4f}  (temperature {bundle.temperature:.3g}, TTA {m['tta']})\n")
        print(per_class_table(m))
        recorded = bundle.metrics()
        if recorded.get("accuracy") is not None:
            print(f"\nfor comparison, its own {recorded.get('split', 'test')} split: "
                  f"{describe_accuracy(recorded['accuracy'], recorded.get('accuracy_ci95'), recorded.get('num_samples', 0))}")
    else:
        split = data.val if m["split"] == "validation" else data.test
        print(f"{args.bundle} on the {m['split']} split of {data.name} ({len(split):,} images), {device}, "
              f"{seconds:.0f} s\n")
        print(comparison_table(bundle.metrics(), m))
        if m.get("ood"):
            print("\n" + ood_table(m["ood"]))
    if args.write:
        write_evaluation(bundle, evaluation, data, args.mistakes, command_line(argv, PROG))
        print(f"\nwrote {bundle.path}/eval, config.json and README.md (mistakes in eval/{MISTAKES_DIR}/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
