"""Settings from files: `train --config` (the file sets defaults, flags win; every run writes its
resolved config.yaml, which repeats it) and `recipe` (steps run by the same code as the commands)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from classifier.cli import recipe, train
from classifier.config import RunConfig, TrainConfig
from classifier.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_train_config_defaults_are_run_config_defaults():
    """One set of defaults: fit()'s settings for a default run are TrainConfig's own defaults."""
    assert TrainConfig.from_run(RunConfig(), new_head=False) == TrainConfig()


def test_a_config_file_sets_defaults_and_flags_win(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("model: tutorial_cifar_cnn\nepochs: 7\nbatch-size: 16\nclasses: [cat, dog]\nlr: '0.02'\n")
    args, given = train.parse(["--config", str(config), "--epochs", "3"])
    cfg = train.config_from_args(args, given, command="test")
    assert (cfg.model, cfg.epochs, cfg.batch_size, cfg.classes, cfg.lr) == ("tutorial_cifar_cnn", 3, 16, ["cat", "dog"], 0.02)
    assert {"model", "epochs", "batch_size", "classes"} <= given  # chosen settings: a --recipe fills none of them


@pytest.mark.parametrize("content, message", [
    ("epoch: 3\n", "unknown setting 'epoch'; did you mean epochs"),
    ("optimizer: adam\n", "optimizer must be one of sgd, adamw"),
    ("lr: fast\n", "neither a number nor 'auto'"),
    ("- just a list\n", "a mapping of settings"),
])
def test_a_bad_config_file_is_one_clear_line(tmp_path, capsys, content, message):
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    assert train.main(["--config", str(config)]) == 2
    assert message in capsys.readouterr().err


def test_a_run_writes_its_settings_and_they_repeat_it(tiny_bundle):
    """The session's tiny run wrote OUT/config.yaml; read back, it gives the same RunConfig."""
    written = tiny_bundle.parent / "config.yaml"
    values = yaml.safe_load(written.read_text())
    args, given = train.parse(["--config", str(written)])
    again = train.config_from_args(args, given, command="again")
    assert {k: getattr(again, k) for k in values} == values


@pytest.mark.parametrize("name", ["cifar10-efficientnet-lite0.yaml", "cifar10-cnn.yaml", "tutorial-apparel.yaml"])
def test_the_shipped_recipes_read_as_the_commands_that_made_the_bundles(name, capsys):
    assert recipe.main([str(ROOT / "recipes" / name), "--dry-run", "--set", "data_dir=somewhere"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("python -m classifier ")]
    assert lines and all("--data-dir somewhere" in line for line in lines if " train " in line)
    if name.startswith("cifar10-efficientnet"):
        assert [line.split()[3] for line in lines] == ["train", "train", "evaluate", "train", "soup"]
        assert "--cutmix 1.0" in lines[3] and lines[4].endswith("--out runs/soup2 --tta flip --loader memory")
    if name == "tutorial-apparel.yaml":  # the lesson's own net on its own data
        assert len(lines) == 1 and "--model tutorial_apparel_cnn" in lines[0] and "--data fashion-mnist" in lines[0]


def test_a_recipe_runs_its_steps_and_skips_what_is_done(image_folder, tmp_path, capsys, one_torch_thread):
    out = tmp_path / "run"
    file = tmp_path / "recipe.yaml"
    file.write_text(yaml.safe_dump({"description": "a tiny one", "steps": [
        {"train": {"data": str(image_folder), "model": "fast_cnn", "model_args": {"widths": [8, 16]},
                   "epochs": 1, "batch_size": 16, "workers": 0, "mistakes": 0, "out": str(out)}},
        {"evaluate": {"bundle": str(out / "bundle"), "tta": "flip", "workers": 0}},
    ]}))
    assert recipe.main([str(file)]) == 0
    assert (out / "bundle" / "config.json").is_file() and "| test-time augmentation | flip-shift | flip |" in capsys.readouterr().out
    assert recipe.main([str(file)]) == 0
    assert "done already" in capsys.readouterr().out


def test_a_bad_recipe_is_one_clear_line(tmp_path, capsys):
    file = tmp_path / "recipe.yaml"
    file.write_text("steps:\n  - fly: {to: moon}\n")
    assert recipe.main([str(file)]) == 2
    assert "must name one command" in capsys.readouterr().err
    file.write_text("steps:\n  - evaluate: {bundle: x, nonsense: 1}\n")
    assert recipe.main([str(file)]) == 2
    assert "'nonsense' is not an option of `python -m classifier evaluate`" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        recipe.read_recipe(tmp_path / "missing.yaml")


def test_the_apparel_recipe_trains_the_lesson_net(tmp_path, capsys, one_torch_thread):
    """The recipe for real, on a stand-in Fashion-MNIST (60 grey images): its one-channel data
    reaches the one-channel net, and the bundle records the lesson's model."""
    from tests.conftest import make_fashion_mnist

    data_dir = make_fashion_mnist(tmp_path / "fmnist", train=60, test=20)
    out = tmp_path / "apparel"
    assert recipe.main([str(ROOT / "recipes" / "tutorial-apparel.yaml"), "--set", f"data_dir={data_dir}",
                        "--set", "epochs=1", "--set", f"out={out}", "--set", "workers=0",
                        "--set", "mistakes=0"]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"] == "tutorial_apparel_cnn"
    bundle = json.loads((out / "bundle" / "config.json").read_text())
    assert bundle["architecture"] == "tutorial_apparel_cnn" and bundle["pretrained_cfg"]["input_size"] == [1, 28, 28]
    assert "2,174 parameters" in capsys.readouterr().out


def test_a_search_step_takes_set_as_its_own_options_or_as_every_trials_setting(tmp_path, capsys):
    """--set reaches a search step as the option it has (data_dir, trials), or else as a fixed
    setting of every trial (batch_size); the grid may be spelt by its flag's name."""
    file = tmp_path / "recipe.yaml"
    file.write_text(yaml.safe_dump({"steps": [{"search": {
        "model": "tutorial_tuning_cnn", "grid": ["c1=16,32", "l1=64"], "set": ["lr=0.01"], "out": "runs/s"}}]}))
    assert recipe.main([str(file), "--dry-run", "--set", "data_dir=x", "--set", "batch_size=64",
                        "--set", "trials=1"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("python -m classifier search ") and "--grid c1=16,32 l1=64 " in line
    assert "--data-dir x" in line and "--trials 1" in line and "--set lr=0.01 batch_size=64 " in line
    assert recipe.step_state("search", {"out": str(tmp_path), "retrain_best": True}) == "new"


@pytest.mark.parametrize("lesson, message", [
    ({"reported": "x", "needs": ["data"]}, "needs must be a mapping"),
    ({"reported": "x", "needs": {"photos": "where they are"}}, "unknown setting 'photos'"),
])
def test_a_lessons_needs_are_settings_with_what_they_are(tmp_path, capsys, lesson, message):
    file = tmp_path / "recipe.yaml"
    file.write_text(yaml.safe_dump({"lesson": lesson, "steps": [{"train": {"epochs": 1}}]}))
    assert recipe.main([str(file), "--dry-run"]) == 2
    assert message in capsys.readouterr().err
