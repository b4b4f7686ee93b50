"""`python -m classifier lr-find`: the learning-rate range test, plotted, with a suggestion.

    python -m classifier lr-find --data path/to/folder --model fast_cnn --out runs/lr.png

The data and model options, and their defaults, are those of `python -m classifier train` (what is
left open is chosen from the data as train chooses it); the run's settings (batch size, optimiser,
weight decay) decide the curve, so give the ones you will train with. The sweep spans three decades
either side of the run's measured default rate unless --start-lr/--end-lr say otherwise. `train
--lr auto` runs the same test before training and uses its suggestion.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from classifier.allocator import keep_freed_memory
from classifier.auto import resolve
from classifier.cli.common import (DEFAULTS, add_data_options, add_model_options, add_running_options, positive_int,
                                   report, run_values)
from classifier.config import DEFAULT_BATCH_SIZE, RunConfig, TrainConfig, default_lr
from classifier.errors import USER_ERRORS
from classifier.lr_finder import METHODS, lr_range_test
from classifier.plots import plot_lr_finder
from classifier.run import load_run_data, prepare
from classifier.runtime import pick_device


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(prog="python -m classifier lr-find", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_options(p)
    add_model_options(p)
    g = p.add_argument_group("the run the rate is for")
    g.add_argument("--batch-size", type=positive_int("--batch-size"), default=d.batch_size,
                   help="default: chosen from the data, as train chooses it")
    g.add_argument("--optimizer", choices=["sgd", "adamw"], default=d.optimizer)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    add_running_options(p, g)
    g = p.add_argument_group("the range test")
    g.add_argument("--steps", type=int, default=100, help="steps of the sweep (fewer if the loss explodes first)")
    g.add_argument("--start-lr", type=float, default=None, help="default: the run's default rate / 1000")
    g.add_argument("--end-lr", type=float, default=None, help="default: the run's default rate x 1000")
    g.add_argument("--method", choices=METHODS, default="auto",
                   help="which point of the curve to suggest (auto: the steepest descent, near the default; "
                        "see classifier.lr_finder)")
    g.add_argument("--out", default="lr_finder.png", help="the plot; the curve goes beside it as .json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    cfg = RunConfig(**run_values(args))
    try:
        device = pick_device(cfg.device)
        keep_freed_memory(device)  # faster CPU steps: see classifier/allocator.py
        data = load_run_data(cfg)
        cfg = resolve(cfg, data, device).cfg
        setup = prepare(cfg, device, data=data)
        default = default_lr(cfg.optimizer, cfg.batch_size or DEFAULT_BATCH_SIZE, fine_tuning=setup.new_head)
        start, end = args.start_lr or default / 1e3, args.end_lr or default * 1e3
        result = lr_range_test(setup.model, setup.train_loader, TrainConfig.from_run(cfg, setup.new_head, lr=end),
                               device=device, start_lr=start, end_lr=end, num_steps=args.steps, method=args.method,
                               default_lr=default)
    except USER_ERRORS as exc:
        return report(exc)
    plot = plot_lr_finder(result, args.out, title=f"{cfg.model} on {setup.data.name}: suggested lr {result.suggestion:.2g}")
    result.save(plot.with_suffix(".json"))
    ended = "the loss exploded" if result.diverged else "the sweep ended before the loss exploded"
    print(f"swept lr {result.lrs[0]:.1e} -> {result.lrs[-1]:.1e} over {len(result.lrs)} steps ({ended})")
    for name in METHODS:
        mark = "  <- suggested" if name == result.method else ""
        print(f"  {name:<9} {getattr(result, name):.3g}{mark}")
    print(f"  (auto: {result.note})")
    print(f"plot: {plot}")
    data = " ".join(f"{flag} {shlex.quote(value)}" for flag, value in (
        ("--data", args.data), ("--data-dir", args.data_dir), ("--image-dir", args.image_dir),
        ("--classes", ",".join(args.classes) if args.classes else None)) if value)
    print(f"train with it: python -m classifier train {data} --model {cfg.model} --optimizer {cfg.optimizer} "
          f"--batch-size {cfg.batch_size} --lr {result.suggestion:.3g}  (or --lr auto)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
