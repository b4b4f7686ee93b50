"""The house rules, checked on the code itself (tests/house.py reads the imports with `ast`):

- no import cycle between the project's modules, counting imports inside functions too (so a
  function-local import cannot hide one);
- the library (classifier/ outside classifier/cli) never imports a command line;
- serving (the app, the Predictor, `predict`) loads no training code and no matplotlib;
- `python -m classifier --help` lists every command, and each command answers --help;
- the checker itself fails on a house that breaks the rules.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from classifier.cli import COMMANDS, usage
from tests.house import import_graph, library_imports_of_cli, cycles

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_cycles_and_the_library_never_imports_a_command_line():
    graph = import_graph(ROOT)
    assert "classifier.run" in graph and "classifier.cli.train" in graph  # it read the real house
    assert cycles(graph) == []
    assert library_imports_of_cli(graph) == []


def test_the_checker_finds_a_cycle_and_a_library_module_importing_a_command_line(tmp_path):
    package = tmp_path / "classifier"
    (package / "cli").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "cli" / "__init__.py").write_text("")
    (package / "a.py").write_text("from classifier import b\n")
    # A cycle closed by an import inside a function is still a cycle.
    (package / "b.py").write_text("def f():\n    from classifier.a import thing\n")
    (package / "c.py").write_text("from classifier.cli.tool import main\n")
    (package / "cli" / "tool.py").write_text("import classifier.c\n")
    graph = import_graph(tmp_path)
    assert sorted(map(sorted, cycles(graph))) == [["classifier.a", "classifier.b"], ["classifier.c", "classifier.cli.tool"]]
    assert library_imports_of_cli(graph) == [("classifier.c", "classifier.cli.tool")]


SERVING = """
import sys
import app, classifier.predict, classifier.app_logic, classifier.cli.predict
training = [m for m in sys.modules if m in {TRAINING}]
print("loaded:", training, "matplotlib" in sys.modules)
assert not training and "matplotlib" not in sys.modules, (training, "matplotlib" in sys.modules)
"""
TRAINING_MODULES = {"classifier.loop", "classifier.run", "classifier.lr_finder", "classifier.search", "classifier.soup",
                    "classifier.evaluate", "classifier.fastdata", "classifier.plots", "classifier.reevaluate",
                    "optuna", "matplotlib"}


def test_serving_imports_no_training_code_and_no_matplotlib():
    done = subprocess.run([sys.executable, "-c", SERVING.replace("{TRAINING}", repr(TRAINING_MODULES))], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def test_python_m_classifier_lists_every_command():
    done = subprocess.run([sys.executable, "-m", "classifier", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0
    for name in ["train", "evaluate", "predict", "search", "lr-find", "soup", "report", "push", "pull", "recipe"]:
        assert f"  {name} " in done.stdout, name
    assert done.stdout.strip() == usage().strip()
    unknown = subprocess.run([sys.executable, "-m", "classifier", "trian"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    assert unknown.returncode == 2 and "did you mean 'train'?" in unknown.stderr


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_answers_help(command, capsys):
    from classifier.cli import main

    try:
        code = main([command, "--help"])
    except SystemExit as done:  # argparse's way; train's torchrun @record turns it into a return of None
        code = done.code
    assert code in (0, None)
    assert f"python -m classifier {command}" in capsys.readouterr().out


def test_the_readme_names_real_commands_and_ci_runs_its_test_command():
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"\./run ([a-z-]+)", readme))
    assert {"app", "test", "train"} <= named
    assert named - {"app", "test"} <= set(COMMANDS), named - {"app", "test"} - set(COMMANDS)
    assert "./run test" in (ROOT / ".ci" / "run").read_text().splitlines()
