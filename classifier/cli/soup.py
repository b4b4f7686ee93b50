"""`python -m classifier soup INGREDIENT INGREDIENT ... --out FOLDER`: average the weights of several
bundles (or runs' last checkpoints) into a bundle, then evaluate it as `evaluate --write` would.

    python -m classifier soup runs/a/bundle runs/b/last.pt --out runs/soup --tta flip
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from classifier.cli import evaluate as evaluate_cli
from classifier.cli.common import DEFAULTS, add_running_options, command_line, report
from classifier.errors import USER_ERRORS
from classifier.reevaluate import EVAL_BATCH_SIZE
from classifier.soup import make_soup, run_bundle_of
from classifier.tta import TTA_MODES

PROG = "python -m classifier soup"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ingredients", nargs="+", help="bundle folders, or runs' OUT/last.pt checkpoints")
    p.add_argument("--out", required=True, help="the folder of the new bundle")
    p.add_argument("--tta", choices=list(TTA_MODES), default="none", help="test-time augmentation of its evaluation")
    p.add_argument("--batch-size", type=int, default=EVAL_BATCH_SIZE, help="images per forward pass of the evaluation")
    p.add_argument("--loader", choices=["auto", "memory", "workers"], default=DEFAULTS.loader)
    add_running_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    # Neither an ingredient nor the bundle of a checkpoint's run may be written over.
    taken = {(run_bundle_of(i) or Path(i)).resolve() for i in args.ingredients}
    if Path(args.out).resolve() in taken:
        print(f"error: --out {args.out} is one of the ingredients (or a checkpoint's run bundle); name a new folder",
              file=sys.stderr)
        return 2
    try:
        out = make_soup(args.ingredients, args.out, command_line(argv, PROG))
    except (*USER_ERRORS, OSError) as exc:
        return report(exc)
    print(f"wrote the average of {len(args.ingredients)} models to {out}; evaluating it")
    return evaluate_cli.main([str(out), "--tta", args.tta, "--write", "--batch-size", str(args.batch_size),
                              "--loader", args.loader, "--workers", str(args.workers), "--device", args.device])


if __name__ == "__main__":
    sys.exit(main())
