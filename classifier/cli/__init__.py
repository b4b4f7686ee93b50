"""Every command line of the project, in one place: `python -m classifier <command>` (or the
`classifier` console script). Each command is a module here with `build_parser()` and `main(argv)`;
the library under classifier/ never imports this package.

A command's module is imported only when it runs, so `python -m classifier predict` loads what
prediction needs and nothing of training.
"""

from __future__ import annotations

import difflib
import importlib
import sys

from classifier import __version__

# command -> (module under classifier.cli, one line of help); the order is the order of --help.
COMMANDS = {
    "train": ("train", "train or fine-tune a model and save it as a bundle (also: training/finetune.py)"),
    "evaluate": ("evaluate", "evaluate a bundle again on its test split, or on your own labelled data"),
    "predict": ("predict", "classify images, folders of images or a CSV of ids with a bundle"),
    "lr-find": ("lr_find", "learning-rate range test: plot loss against learning rate and suggest one"),
    "search": ("search", "hyperparameter search (grid, TPE or random) with early stopping"),
    "soup": ("soup", "average the weights of several bundles into one bundle, and evaluate it"),
    "recipe": ("recipe", "run a recipe file: the steps (train, evaluate, soup) that make a model"),
    "tutorial": ("tutorial", "run a lesson's recipe (e.g. apparel) and compare its figure with the lesson's"),
    "report": ("report", "reports: a dataset's statistics, a model's layers, a bundle's predictions"),
    "push": ("push", "upload a bundle with its model card to the Hugging Face Hub"),
    "pull": ("pull", "download a bundle from the Hugging Face Hub and check that it loads"),
    "export": ("export", "export a bundle to ONNX (model.onnx) and check it against torch"),
    "deploy": ("deploy", "deploy the demo app with chosen bundles to a Hugging Face Space"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m classifier <command> [options]   (or: classifier <command> ...)", "",
             "Image classification from dataset to demo. Commands:", ""]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "`python -m classifier <command> --help` lists a command's options.",
              "The demo app: python app.py [--model BUNDLE]"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name in ("-V", "--version"):
        print(__version__)
        return 0
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown command '{name}'{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"classifier.cli.{COMMANDS[name][0]}")
    return module.main(rest)
