"""`python -m classifier recipe FILE.yaml`: run the steps that make a model, as written in a recipe.

    python -m classifier recipe recipes/cifar10-efficientnet-lite0.yaml --dry-run      the commands, not run
    python -m classifier recipe recipes/cifar10-cnn.yaml --set data_dir=path/to/cifar10-jpeg.tar.gz

A recipe is a YAML file with a list of `steps`, each one command (train, search, evaluate, soup,
predict, report) and its options, spelt as in the command's --help (its flag or its name there,
with underscores or hyphens); a lesson's recipe (`python -m classifier tutorial`) also says the
figure the lesson reported:

    description: what it makes and how good it was
    lesson: {reported: "71% test accuracy"}
    steps:
      - train: {data: cifar10, model: fast_cnn, epochs: 10, out: runs/fast10}
      - evaluate: {bundle: runs/fast10/bundle, tta: flip, write: true}

A file that is a plain mapping of training settings (what `train --config` reads) is a recipe of
one train step. A train step whose bundle is already there is done and skipped; one that was
interrupted (OUT/last.pt, no bundle) goes on with --resume; a search step with --retrain-best is
done when OUT/best/bundle is there (an interrupted search resumes by itself). `--set NAME=VALUE`
overrides a setting of every train and search step (where the data lives, the device): a search
takes it as its own option where it has one (data_dir, epochs, out) and as a setting of every
trial otherwise (batch_size); a NAME that only a search has (trials, trial_epochs) is for the
search steps alone. Each step is run by the same code as the command line, so `--dry-run` prints
exactly the commands to type instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from classifier.bundle import CONFIG_FILE
from classifier.cli import COMMANDS
from classifier.cli.common import report
from classifier.config import RUN_FIELDS, check_settings, load_yaml
from classifier.errors import ConfigError
from classifier.loop import LAST_CHECKPOINT
from classifier.run import RUN_BUNDLE_DIR

STEP_COMMANDS = ("train", "search", "evaluate", "soup", "predict", "report")
# The steps that make a bundle, and so take --set and can be done already.
MAKING = ("train", "search")
SEARCH_BEST = "best"  # search --retrain-best trains the winner in OUT/best (classifier.search.retrain_best)
RECIPE_KEYS = ("description", "steps", "lesson")  # a misspelt key is an error, not silently ignored


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m classifier recipe", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("recipe", help="a recipe file, e.g. recipes/cifar10-cnn.yaml")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting for every train and search step, e.g. data_dir=../data/cifar10-jpeg.tar.gz or device=cuda")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    p.add_argument("--from-step", type=int, default=1, help="start at this step (1 = the first)")
    return p


@dataclass
class Recipe:
    description: str
    lesson: dict  # {reported: "..."} for a lesson's recipe, else {}
    steps: list  # [(command, options), ...], as written; or, planned, [(command, options, argv), ...]


def read_recipe(path: str | Path) -> Recipe:
    """A recipe file: its description, lesson and [(command, options), ...], checked."""
    content = load_yaml(path, "recipe file")
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: a recipe is a mapping with a list of steps")
    if "steps" not in content:  # a plain config file: one train step
        return Recipe("", {}, [("train", check_settings(content, str(path)))])
    unknown = sorted(str(key) for key in content if key not in RECIPE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: '{unknown[0]}' is not a part of a recipe ({', '.join(RECIPE_KEYS)})")
    lesson = read_lesson(content, path)
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
    return Recipe(str(content.get("description", "")).strip(), lesson, steps)


def read_lesson(content: dict, path: str | Path) -> dict:
    """The recipe's `lesson` mapping ({} when it has none); its `reported` figure must be text, and
    its `needs`, the settings a user must give with --set (a folder of their own photos), a mapping
    of each one's name to what it is."""
    lesson = content.get("lesson") or {}
    if not isinstance(lesson, dict) or not isinstance(lesson.get("reported", ""), str):
        raise ConfigError(f"{path}: lesson must be a mapping like {{reported: \"71% test accuracy\"}}")
    needs = lesson.get("needs", {})
    if not isinstance(needs, dict) or not all(isinstance(v, str) for v in needs.values()):
        raise ConfigError(f"{path}: lesson's needs must be a mapping like {{data: \"a folder of photos\"}}")
    check_settings(needs, f"{path}: lesson's needs")
    return lesson


def _actions(command: str) -> dict[str, argparse.Action]:
    """A command's options by their names: the parser's dest and each long flag (search's --grid
    stores into `space`, and a recipe may say either)."""
    parser = importlib.import_module(f"classifier.cli.{COMMANDS[command][0]}").build_parser()
    actions = {}
    for action in parser._actions:
        if action.dest == "help":
            continue
        actions[action.dest] = action
        for flag in action.option_strings:
            if flag.startswith("--"):
                actions.setdefault(flag[2:].replace("-", "_"), action)
    return actions


def step_argv(command: str, options: dict) -> list[str]:
    """The command line of a step: positionals by their names in the command's parser, then options."""
    actions = _actions(command)
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


def bundle_of(command: str, options: dict) -> Path | None:
    """The bundle a making step leaves (train: OUT/bundle; search --retrain-best: OUT/best/bundle),
    or None for a step that makes none."""
    if command == "train":
        return Path(str(options["out"])) / RUN_BUNDLE_DIR
    if command == "search" and options.get("retrain_best", options.get("retrain-best")):
        return Path(str(options.get("out", "runs/search"))) / SEARCH_BEST / RUN_BUNDLE_DIR
    return None


def step_state(command: str, options: dict) -> str:
    """"done" (its bundle exists), "interrupted" (a train step's checkpoint, no bundle) or "new"."""
    bundle = bundle_of(command, options)
    if bundle is not None and (bundle / CONFIG_FILE).is_file():
        return "done"
    if command == "train" and (Path(str(options["out"])) / LAST_CHECKPOINT).is_file():
        return "interrupted"
    return "new"


def _search_options(options: dict, overrides: dict, searched: dict) -> dict:
    """A search step with the --set overrides: as its own option where it has one, else as a fixed
    setting of every trial (its --set NAME=VALUE list)."""
    options = dict(options)
    actions = _actions("search")
    fixed = options.get("set") or []
    fixed = [fixed] if isinstance(fixed, str) else list(fixed)
    for name, value in {**overrides, **searched}.items():
        if name in actions and name != "set":
            options[name] = value
        else:
            fixed.append(f"{name}={','.join(map(str, value)) if isinstance(value, list) else value}")
    if fixed:
        options["set"] = fixed
    return options


def plan(recipe: str | Path, settings: list[str]) -> Recipe:
    """The recipe with its steps as they will run, [(command, options, argv), ...], with the --set
    NAME=VALUE `settings` in every train and search step; ConfigError for a bad recipe or setting."""
    if any("=" not in item for item in settings):
        raise ConfigError("--set takes NAME=VALUE, e.g. --set data_dir=../data/cifar10-jpeg.tar.gz")
    given = dict(item.split("=", 1) for item in settings)
    written = read_recipe(recipe)
    # What the recipe cannot know (where a user's own photos are) is asked for before anything runs,
    # rather than a default standing in for it (data's default is CIFAR-10).
    missing = {name: what for name, what in written.lesson.get("needs", {}).items()
               if name not in {key.replace("-", "_") for key in given}}
    if missing:
        raise ConfigError(f"{recipe}: give " + "; ".join(f"--set {name}=...: {what}" for name, what in missing.items()))
    # A name only a search has (trials, trial_epochs) is for the search steps; any other must be
    # a training setting, checked (a misspelt one is an error, not silently ignored).
    search_only = {} if not any(command == "search" for command, _ in written.steps) else {
        name: value for name, value in given.items()
        if name.replace("-", "_") not in RUN_FIELDS and name.replace("-", "_") in _actions("search")}
    overrides = check_settings({k: v for k, v in given.items() if k not in search_only}, "--set")
    making = sum(command in MAKING for command, _ in written.steps)
    if "out" in overrides and making > 1:  # the second step would find the first one's bundle, and skip
        raise ConfigError(f"--set out=...: the recipe has {making} steps that make a bundle, and each needs its "
                          f"own folder; run it from another folder instead (the outs are relative)")
    search_only = {name.replace("-", "_"): value for name, value in search_only.items()}
    planned = []
    for number, (command, options) in enumerate(written.steps, start=1):
        if command in MAKING:
            # A step's own folder, so that a rerun knows it is done (train's default is a new one each time).
            options = {"out": f"runs/{Path(recipe).stem}-step{number}", **options}
            options = ({**options, **overrides} if command == "train"
                       else _search_options(options, overrides, search_only))
        planned.append((command, options, step_argv(command, options)))
    return Recipe(written.description, written.lesson, planned)


def execute(planned: Recipe, dry_run: bool = False, from_step: int = 1) -> int:
    """Run (or with `dry_run` print) a planned recipe's steps from step `from_step`; the exit status."""
    if planned.description:
        print(planned.description + "\n")
    steps = planned.steps
    for number, (command, options, step) in enumerate(steps, start=1):
        if number < from_step:
            continue
        state = step_state(command, options) if command in MAKING else "new"
        if state == "interrupted":
            step = [*step, "--resume"]
        line = f"python -m classifier {command} {shlex.join(step)}"
        if dry_run:
            print(line)
            continue
        if state == "done":
            print(f"step {number}/{len(steps)}: done already ({bundle_of(command, options)})")
            continue
        print(f"step {number}/{len(steps)}: {line}", flush=True)
        code = importlib.import_module(f"classifier.cli.{COMMANDS[command][0]}").main(step)
        if code != 0:
            print(f"error: step {number} ({command}) ended with exit status {code}; fix it and run the recipe "
                  f"again (finished train steps are skipped, an interrupted one resumes)", file=sys.stderr)
            return code
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        planned = plan(args.recipe, args.set)
    except ConfigError as exc:
        return report(exc)
    return execute(planned, args.dry_run, args.from_step)


if __name__ == "__main__":
    sys.exit(main())
