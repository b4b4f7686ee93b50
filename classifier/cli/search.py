"""`python -m classifier search`: many short trials, a table of results, then the winner trained in full.

    python -m classifier search --data cifar10 --data-dir cifar10-jpeg.tar.gz --model configurable_cnn \\
        --grid c1=16,32 c2=32,64 l1=128,256 lr=0.01,0.05 batch_size=64,128 --trial-epochs 4
    python -m classifier search ... --sampler tpe --trials 30 --grid "lr=1e-3..0.3:log" c1=8..64
    python -m classifier search ... --retrain-best --epochs 30      (after, or together with, a search)

See classifier/search.py for how trials run, prune and resume.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from classifier.cli.common import add_data_options, add_model_options, add_running_options, command_line, report, run_values
from classifier.config import RUN_FIELDS, RunConfig
from classifier.errors import USER_ERRORS, SearchError
from classifier.run import summarize
from classifier.search import (FIXED_FIELDS, SearchConfig, TrialRecord, optuna_module, parse_space, parse_value,
                               results_markdown, retrain_best, run_search)

PROG = "python -m classifier search"
log = logging.getLogger("classifier.search")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                epilog="example: --grid c1=16,32 c2=32,64 l1=128,256 lr=0.01,0.05 batch_size=64,128",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = add_data_options(p, "data and model (shared by every trial)")
    add_model_options(p, "model (shared by every trial)")
    # The search tutorial's network, whose widths c1, c2 and l1 are what a search usually varies.
    p.set_defaults(model="configurable_cnn")
    g.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE",
                   help="fixed settings for every trial, e.g. optimizer=adamw weight_decay=0.01 lr=0.002")
    g = p.add_argument_group("search")
    g.add_argument("--grid", "--space", dest="space", nargs="+", required=True, metavar="NAME=VALUES",
                   help="parameters: name=v1,v2,... or (tpe/random) name=low..high[:log]")
    g.add_argument("--sampler", choices=["grid", "tpe", "random"], default="grid")
    g.add_argument("--trials", type=int, default=None, help="finished trials to reach (default: the whole grid)")
    g.add_argument("--trial-epochs", type=int, default=5, help="epochs per trial, at most")
    g.add_argument("--patience", type=int, default=2, help="a trial stops after this many epochs without a better val loss")
    g.add_argument("--prune", action=argparse.BooleanOptionalAction, default=True,
                   help="stop trials worse than the median of earlier ones at the same epoch (Optuna MedianPruner)")
    g = p.add_argument_group("retraining the winner")
    g.add_argument("--retrain-best", action="store_true", help="after the search, train the best trial for --epochs")
    g.add_argument("--epochs", type=int, default=30, help="epochs for --retrain-best")
    g.add_argument("--retrain-patience", type=int, default=None,
                   help="early stopping for --retrain-best: stop after this many epochs without a better "
                        "val loss and keep the best (default: none, all --epochs)")
    g = p.add_argument_group("running")
    g.add_argument("--out", default="runs/search", help="search.db, results.md/.csv, trials/, and best/ (the bundle)")
    add_running_options(p, g)
    return p


def config_from_args(args: argparse.Namespace, command: str | None = None) -> SearchConfig:
    fixed = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in RUN_FIELDS or name in FIXED_FIELDS:
            raise SearchError(f"--set {item}: expected NAME=VALUE with NAME a training setting such as lr, "
                              f"batch_size, optimizer, weight_decay, schedule, image_size")
        fixed[name] = parse_value(value)
    if fixed.get("lr") == "auto":
        raise SearchError("--set lr=auto: every trial would run its own range test; give a number, or search lr")
    values = {k: v for k, v in run_values(args).items() if k not in ("epochs", "patience")}
    base = RunConfig(**values, epochs=args.trial_epochs, patience=args.patience, mistakes=50, command=command)
    return SearchConfig(base=replace(base, **fixed), space=parse_space(args.space), sampler=args.sampler,
                        trials=args.trials, prune=args.prune, out=Path(args.out))


def describe(record: TrialRecord) -> str:
    params = " ".join(f"{k}={v}" for k, v in record.params.items())
    result = (f"val loss {record.val_loss:.4f} acc {record.val_acc:.4f} (epoch {record.best_epoch}/{record.epochs})"
              if record.val_loss is not None else "no epoch finished")
    return f"trial {record.number:>3}  {record.outcome:<8}  {params}  {result}  {record.seconds:.0f}s"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    try:
        config = config_from_args(args, command_line(argv, PROG))
        optuna = optuna_module()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial says more
        records = run_search(config, on_trial_end=lambda r: print(describe(r), flush=True))
        print()
        print(results_markdown(records, list(config.space)), end="")
        print(f"\nresults: {config.out / 'results.md'}, {config.out / 'results.csv'}")
        if args.retrain_best:
            logging.getLogger("classifier").setLevel(logging.INFO)  # the epochs of the real run, as train shows them
            best, result = retrain_best(config, args.epochs, patience=args.retrain_patience, records=records)
            print(f"\nretrained trial {best.number} ({' '.join(f'{k}={v}' for k, v in best.params.items())}) "
                  f"for {args.epochs} epochs")
            print(summarize(result))
    except KeyboardInterrupt:
        print(f"\ninterrupted; run the same command again to continue (finished trials are in {args.out})",
              file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        return report(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
