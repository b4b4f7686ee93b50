"""`python -m classifier tutorial NAME`: run a lesson's recipe and compare its figure with the lesson's.

    python -m classifier tutorial                              the lessons, one line each
    python -m classifier tutorial apparel --dry-run            the commands, not run
    python -m classifier tutorial apparel --set data_dir=path/to/fashion-mnist

A lesson is the recipe recipes/tutorial-NAME.yaml, run exactly as `python -m classifier recipe` runs
it; its `lesson: {reported: ...}` field is the figure the lesson reported, printed after the run
beside the test accuracy measured here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from classifier.bundle import Bundle, read_config
from classifier.cli import recipe
from classifier.cli.common import report
from classifier.config import load_yaml
from classifier.errors import ConfigError
from classifier.run import RUN_BUNDLE_DIR

# The lessons are the files named tutorial-*.yaml here, so a new lesson is one new file and the
# table cannot disagree with what is shipped.
RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
PREFIX = "tutorial-"


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
    content = load_yaml(path, "recipe file")
    return str(content.get("description", "")).strip().split("\n")[0] if isinstance(content, dict) else ""


def listing(table: dict[str, Path]) -> str:
    width = max(map(len, table), default=0)
    return "\n".join(f"  {name:<{width}}  {first_line(path)}" for name, path in table.items())


def find(name: str, table: dict[str, Path]) -> Path:
    if name not in table:
        raise ConfigError(f"no lesson '{name}'; the lessons: {', '.join(table) or 'none'} "
                          f"(`python -m classifier tutorial` lists them)")
    return table[name]


def measured(planned: list[tuple[str, dict, list[str]]]) -> str:
    """The test accuracy of the bundle the recipe's last train step made, as the bundle recorded it."""
    outs = [options["out"] for command, options, _ in planned if command == "train"]
    if not outs:
        return "not measured (the recipe trains nothing)"
    path = Path(str(outs[-1])) / RUN_BUNDLE_DIR
    try:  # Bundle.metrics() without the weights: only the recorded figures are needed
        metrics = Bundle(model=None, config=read_config(path), path=path).metrics()
    except Exception as exc:  # a missing or damaged bundle: say so rather than fail after a whole run
        return f"not measured ({path}: {exc})"
    accuracy = metrics.get("accuracy")
    return f"{accuracy:.2%} test accuracy ({path})" if accuracy is not None else f"not measured ({path})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    table = lessons()
    if not table:  # an installed wheel carries the library, not the recipes
        return report(ConfigError(f"no lessons: no {PREFIX}*.yaml in {RECIPES_DIR} (run from a checkout of the project)"))
    if args.name is None:
        print("Lessons (python -m classifier tutorial NAME):\n" + listing(table))
        return 0
    try:
        path = find(args.name, table)
        content = load_yaml(path, "recipe file")
        lesson = recipe.read_lesson(content, path)
        _, planned = recipe.plan(path, args.set)
    except ConfigError as exc:
        return report(exc)
    argv = [str(path), *(f"--set={item}" for item in args.set), *(["--dry-run"] if args.dry_run else [])]
    code = recipe.main(argv)  # the recipe's own code runs the steps, so the two cannot drift apart
    if code != 0:
        return code
    if args.dry_run:
        print(f"\nlesson '{args.name}': reported {lesson.get('reported', 'no figure')}")
        return 0
    print(f"\nlesson '{args.name}': reported {lesson.get('reported', 'no figure')}; measured {measured(planned)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
