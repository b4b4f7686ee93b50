"""`python -m classifier tutorial NAME`: run a lesson's recipe and compare its figure with the lesson's.

    python -m classifier tutorial                              the lessons, one line each
    python -m classifier tutorial apparel --dry-run            the commands, not run
    python -m classifier tutorial apparel --set data_dir=path/to/fashion-mnist

A lesson is the recipe recipes/tutorial-NAME.yaml, run exactly as `python -m classifier recipe` runs
it; its `lesson: {reported: ...}` field is the figure the lesson reported, printed after the run
beside the test accuracy measured here. The run folder of the bundle the lesson made then gets the
lessons' pictures of the network, in figures/ (as `python -m classifier report model --bundle`
draws them): every convolution layer's filters, one test image's channels with their pixel values,
a hand-set edge kernel applied to that image, and the feature maps it produces.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from classifier.bundle import EVAL_DIR, MISTAKES_DIR, Bundle, read_config
from classifier.cli import recipe
from classifier.cli import report as report_command
from classifier.cli.common import report
from classifier.errors import USER_ERRORS, ConfigError

# The lessons are the files named tutorial-*.yaml here, so a new lesson is one new file and the
# table cannot disagree with what is shipped.
RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
PREFIX = "tutorial-"
FIGURES_DIR = "figures"  # beside the lesson's bundle, in its run folder


def lessons(folder: Path | None = None) -> dict[str, Path]:
    """lesson name -> its recipe file, in name order."""
    folder = RECIPES_DIR if folder is None else folder
    return {path.stem[len(PREFIX):]: path for path in sorted(folder.glob(f"{PREFIX}*.yaml"))}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m classifier tutorial", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("name", nargs="?", help="the lesson, e.g. apparel; none: list the lessons")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting for every train step, as in `recipe --set`")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    return p


def first_line(path: Path) -> str:
    try:
        return recipe.read_recipe(path).description.split("\n")[0]
    except ConfigError as exc:  # one broken lesson must not hide the others
        return f"(cannot be read: {exc})"


def listing(table: dict[str, Path]) -> str:
    width = max(map(len, table), default=0)
    return "\n".join(f"  {name:<{width}}  {first_line(path)}" for name, path in table.items())


def find(name: str, table: dict[str, Path]) -> Path:
    if name not in table:
        raise ConfigError(f"no lesson '{name}'; the lessons: {', '.join(table) or 'none'} "
                          f"(`python -m classifier tutorial` lists them)")
    return table[name]


def made_bundle(planned: recipe.Recipe) -> Path | None:
    """The bundle of the recipe's last step that makes one (train, or search --retrain-best)."""
    bundles = [recipe.bundle_of(command, options) for command, options, _ in planned.steps]
    return next((bundle for bundle in reversed(bundles) if bundle is not None), None)


def measured(bundle: Path | None) -> str:
    """The accuracy of `bundle` on the split its evaluation shows (test, or the larger validation
    split when the test split was carved from a few training images), as the bundle recorded it."""
    if bundle is None:
        return "not measured (the recipe trains nothing)"
    try:  # Bundle.metrics() without the weights: only the recorded figures are needed
        metrics = Bundle(model=None, config=read_config(bundle), path=bundle).metrics()
    except (*USER_ERRORS, OSError, ValueError) as exc:  # no bundle, or damaged: say so rather than fail after a whole run
        return f"not measured ({bundle}: {exc})"
    accuracy = metrics.get("accuracy")
    if accuracy is None:
        return f"not measured ({bundle})"
    n = metrics.get("num_samples")
    size = f", n={n:,}" if isinstance(n, int) else ""  # a bundle of an older format may lack it
    return f"{accuracy:.2%} {metrics.get('split', 'test')} accuracy{size} ({bundle})"


def figures(bundle: Path) -> int:
    """`report model` on the lesson's bundle, into the run folder's figures/; its image is the
    first of the test images the network got wrong (the lesson's own data; a grey one for a grey
    network), or without any, the report's own example photo."""
    mistakes = sorted((bundle / EVAL_DIR / MISTAKES_DIR).glob("*.png"))
    argv = ["model", "--bundle", str(bundle), "--out", str(bundle.parent / FIGURES_DIR)]
    return report_command.main(argv + (["--image", str(mistakes[0])] if mistakes else []))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    table = lessons()
    if not table:  # an installed wheel carries the library, not the recipes
        return report(ConfigError(f"no lessons: no {PREFIX}*.yaml in {RECIPES_DIR} (run from a checkout of the project)"))
    if args.name is None:
        print("Lessons (python -m classifier tutorial NAME):\n" + listing(table))
        return 0
    try:
        planned = recipe.plan(find(args.name, table), args.set)  # read and checked once, then run as planned
    except ConfigError as exc:
        return report(exc)
    code = recipe.execute(planned, args.dry_run)  # the recipe's own code runs the steps, so the two cannot drift apart
    if code != 0:
        return code
    reported = planned.lesson.get("reported", "no figure")
    if args.dry_run:
        print(f"\nlesson '{args.name}': reported {reported}")
        return 0
    bundle = made_bundle(planned)
    if bundle is not None and (code := figures(bundle)) != 0:
        return code
    print(f"\nlesson '{args.name}': reported {reported}; measured {measured(bundle)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
