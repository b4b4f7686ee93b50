"""`python -m classifier recipe FILE.yaml`: run the steps that make a model, as written in a recipe.

    python -m classifier recipe recipes/cifar10-efficientnet-lite0.yaml --dry-run      the commands, not run
    python -m classifier recipe recipes/cifar10-cnn.yaml --set data_dir=path/to/cifar10-jpeg.tar.gz

A recipe is a YAML file with a list of `steps`, each one command (train, evaluate, soup, predict,
report) and its options, spelt as in the command's --help with underscores or hyphens; a lesson's
recipe (`python -m classifier tutorial`) also says the figure the lesson reported:

    description: what it makes and how good it was
    lesson: {reported: "71% test accuracy"}
    steps:
      - train: {data: cifar10, model: fast_cnn, epochs: 10, out: runs/fast10}
      - evaluate: {bundle: runs/fast10/bundle, tta: flip, write: true}

A file that is a plain mapping of training settings (what `train --config` reads) is a recipe of
one train step. A train step whose bundle is already there is done and skipped; one that was
interrupted (OUT/last.pt, no bundle) goes on with --resume; `--set NAME=VALUE` overrides a setting
of every train step (where the data lives, the device). Each step is run by the same code as the
command line, so `--dry-run` prints exactly the commands to type instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
from pathlib import Path

from classifier.bundle import CONFIG_FILE
from classifier.cli import COMMANDS
from classifier.cli.common import report
from classifier.config import check_settings, load_yaml
from classifier.errors import ConfigError
from classifier.loop import LAST_CHECKPOINT
from classifier.run import RUN_BUNDLE_DIR

STEP_COMMANDS = ("train", "evaluate", "soup", "predict", "report")
RECIPE_KEYS = ("description", "steps", "lesson")  # a misspelt key is an error, not silently ignored


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m classifier recipe", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("recipe", help="a recipe file, e.g. recipes/cifar10-cnn.yaml")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting for every train step, e.g. data_dir=../data/cifar10-jpeg.tar.gz or device=cuda")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    p.add_argument("--from-step", type=int, default=1, help="start at this step (1 = the first)")
    return p


def read_recipe(path: str | Path) -> tuple[str, list[tuple[str, dict]]]:
    """(description, [(command, options), ...]) of a recipe file."""
    content = load_yaml(path, "recipe file")
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: a recipe is a mapping with a list of steps")
    if "steps" not in content:  # a plain config file: one train step
        return "", [("train", check_settings(content, str(path)))]
    unknown = sorted(str(key) for key in content if key not in RECIPE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: '{unknown[0]}' is not a part of a recipe ({', '.join(RECIPE_KEYS)})")
    read_lesson(content, path)  # checked here so that `recipe` refuses a bad one too
    steps = []
    for number, step in enumerate(content["steps"] or [], start=1):
        if not isinstance(step, dict) or len(step) != 1 or next(iter(step)) not in STEP_COMMANDS:
            raise ConfigError(f"{path}: step {number} must name one command ({', '.join(STEP_COMMANDS)}) "
                              f"with its options, e.g. '- train: {{epochs: 5}}'")
        (command, options), = step.items()
        if not isinstance(options, dict):
            raise ConfigError(f"{path}: step {number} ({command}): its options must be a mapping")
        steps.append((command, options))
    if not steps:
        raise ConfigError(f"{path}: the recipe has no steps")
    return str(content.get("description", "")).strip(), steps


def read_lesson(content: dict, path: str | Path) -> dict:
    """The recipe's `lesson` mapping ({} when it has none); its `reported` figure must be text."""
    lesson = content.get("lesson") or {}
    if not isinstance(lesson, dict) or not isinstance(lesson.get("reported", ""), str):
        raise ConfigError(f"{path}: lesson must be a mapping like {{reported: \"71% test accuracy\"}}")
    return lesson


def step_argv(command: str, options: dict) -> list[str]:
    """The command line of a step: positionals by their names in the command's parser, then options."""
    parser = importlib.import_module(f"classifier.cli.{COMMANDS[command][0]}").build_parser()
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    positional, optional = [], []
    for key, value in options.items():
        name = str(key).replace("-", "_")
        action = actions.get(name)
        if action is None:
            raise ConfigError(f"'{key}' is not an option of `python -m classifier {command}`")
        if isinstance(value, dict):  # --model-args and the like take JSON
            value = json.dumps(value)
        values = value if isinstance(value, list) else [value]
        if not action.option_strings:
            positional += [str(v) for v in values]
            continue
        flag = next(s for s in action.option_strings if s.startswith("--"))
        if isinstance(value, bool) and action.nargs == 0:  # --flag (store_true), or --flag/--no-flag
            if value or isinstance(action, argparse.BooleanOptionalAction):
                optional.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list) and action.nargs not in ("+", "*"):
            optional += [flag, ",".join(map(str, value))]  # --classes a,b,c
        else:
            optional += [flag, *map(str, values)]
    return positional + optional


def train_state(options: dict) -> str:
    """"done" (its bundle exists), "interrupted" (a checkpoint, no bundle) or "new"."""
    out = Path(str(options["out"]))
    if (out / RUN_BUNDLE_DIR / CONFIG_FILE).is_file():
        return "done"
    return "interrupted" if (out / LAST_CHECKPOINT).is_file() else "new"


def plan(recipe: str | Path, settings: list[str]) -> tuple[str, list[tuple[str, dict, list[str]]]]:
    """(description, [(command, options, argv), ...]): the steps as they will run, with the --set
    NAME=VALUE `settings` in every train step; ConfigError for a bad recipe or setting."""
    overrides = check_settings(dict(item.split("=", 1) for item in settings if "=" in item), "--set")
    if any("=" not in item for item in settings):
        raise ConfigError("--set takes NAME=VALUE, e.g. --set data_dir=../data/cifar10-jpeg.tar.gz")
    description, steps = read_recipe(recipe)
    planned = []
    for number, (command, options) in enumerate(steps, start=1):
        if command == "train":
            # A step's own folder, so that a rerun knows it is done (train's default is a new one each time).
            options = {"out": f"runs/{Path(recipe).stem}-step{number}", **options, **overrides}
        planned.append((command, options, step_argv(command, options)))
    return description, planned


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        description, planned = plan(args.recipe, args.set)
    except ConfigError as exc:
        return report(exc)
    if description:
        print(description + "\n")
    for number, (command, options, step) in enumerate(planned, start=1):
        if number < args.from_step:
            continue
        state = train_state(options) if command == "train" else "new"
        if state == "interrupted":
            step = [*step, "--resume"]
        line = f"python -m classifier {command} {shlex.join(step)}"
        if args.dry_run:
            print(line)
            continue
        if state == "done":
            print(f"step {number}/{len(planned)}: done already ({options.get('out')}/{RUN_BUNDLE_DIR})")
            continue
        print(f"step {number}/{len(planned)}: {line}", flush=True)
        code = importlib.import_module(f"classifier.cli.{COMMANDS[command][0]}").main(step)
        if code != 0:
            print(f"error: step {number} ({command}) ended with exit status {code}; fix it and run the recipe "
                  f"again (finished train steps are skipped, an interrupted one resumes)", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
