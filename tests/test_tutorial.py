"""`python -m classifier tutorial`: lessons are the recipes/tutorial-*.yaml files, run by `recipe`'s
own code, with the lesson's reported figure printed beside the measured one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from classifier.cli import recipe, tutorial
from classifier.models import count_parameters, create_model
from tests.conftest import draw_shape


def test_the_lessons_are_the_tutorial_recipes():
    table = tutorial.lessons()
    assert table["apparel"].name == "tutorial-apparel.yaml"
    assert all(path.name == f"tutorial-{name}.yaml" for name, path in table.items())


def test_no_name_lists_each_lesson_with_its_first_description_line(capsys):
    assert tutorial.main([]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(lines) == set(tutorial.lessons()) == {"apparel", "cifar10", "cifar3", "transfer", "tuning"}
    assert lines["apparel"].split(None, 1)[1].startswith("The apparel lesson: Fashion-MNIST")
    assert "tiny network" not in out  # the description's second line is left out


def test_a_dry_run_prints_the_commands_and_the_lessons_figure(capsys):
    assert tutorial.main(["apparel", "--dry-run", "--set", "data_dir=somewhere"]) == 0
    out = capsys.readouterr().out
    trains = [line for line in out.splitlines() if line.startswith("python -m classifier train ")]
    assert len(trains) == 1 and "--model tutorial_apparel_cnn" in trains[0] and "--data-dir somewhere" in trains[0]
    assert "reported 71% test accuracy (about 72% validation)" in out and "; measured" not in out


def test_an_unknown_lesson_is_one_clear_line_and_status_2(capsys):
    assert tutorial.main(["shoes"]) == 2
    err = capsys.readouterr().err
    assert "no lesson 'shoes'" in err and "apparel" in err


def test_a_bad_setting_is_refused_before_anything_runs(capsys):
    assert tutorial.main(["apparel", "--set", "epoch=3"]) == 2
    assert "epoch" in capsys.readouterr().err


def test_after_the_run_the_reported_figure_is_beside_the_measured_one(tiny_bundle, monkeypatch, capsys):
    """The run itself is recipe.execute's (tested in test_recipes and below); here it is stood in
    for, and the bundle it would have made is the session's tiny one. The recipe is planned once."""
    runs, drawn = [], []
    monkeypatch.setattr(recipe, "execute", lambda planned, dry_run: runs.append(planned) or 0)
    monkeypatch.setattr(tutorial, "figures", lambda bundle: drawn.append(bundle) or 0)
    assert tutorial.main(["apparel", "--set", f"out={tiny_bundle.parent}"]) == 0
    (planned,) = runs
    assert [(command, options["out"]) for command, options, _ in planned.steps] == [("train", str(tiny_bundle.parent))]
    assert planned.lesson["reported"] == "71% test accuracy (about 72% validation)"
    assert drawn == [tiny_bundle]
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("lesson 'apparel': reported 71% test accuracy (about 72% validation); measured ")
    assert "% test accuracy, n=" in line.split("measured ")[1]


def test_measured_says_so_when_there_is_no_bundle(tmp_path):
    assert tutorial.measured(tmp_path / "bundle").startswith(f"not measured ({tmp_path / 'bundle'}: ")
    assert tutorial.measured(None) == "not measured (the recipe trains nothing)"
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "config.json").write_text("{not json")
    assert "not valid JSON" in tutorial.measured(tmp_path / "bundle")


def test_the_bundle_measured_is_the_last_one_the_recipe_makes():
    cifar3 = recipe.plan(tutorial.lessons()["cifar3"], ["data_dir=x"])
    assert tutorial.made_bundle(cifar3) == Path("runs/tutorial-cifar3-cnn/bundle")  # the CNN, not the MLP
    tuning = recipe.plan(tutorial.lessons()["tuning"], ["data_dir=x"])
    assert tutorial.made_bundle(tuning) == Path("runs/tutorial-tuning/best/bundle")  # search --retrain-best's


@pytest.mark.parametrize("text, message", [
    ("lesson: just words\nsteps:\n  - evaluate: {bundle: x}\n", "lesson must be a mapping"),
    ("lesson: {reported: [71]}\nsteps:\n  - evaluate: {bundle: x}\n", "lesson must be a mapping"),
    ("lessons: {reported: '71%'}\nsteps:\n  - evaluate: {bundle: x}\n", "'lessons' is not a part of a recipe"),
])
def test_the_recipe_loader_checks_the_lesson_field(tmp_path, capsys, text, message):
    file = tmp_path / "recipe.yaml"
    file.write_text(text)
    assert recipe.main([str(file), "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_without_the_recipes_folder_it_says_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tutorial, "RECIPES_DIR", tmp_path)
    assert tutorial.main([]) == 2
    assert f"no tutorial-*.yaml in {tmp_path}" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The four lessons beside apparel: each plans as the lesson was written, and runs on a handful of
# images made here (a few seconds each on one thread), figures and measured figure included.

CIFAR3 = ("airplane", "automobile", "ship")


def make_cifar_like(root: Path, per_class: int = 8) -> Path:
    """root/{train,test}/<class>/*.png: 32 px shapes under three CIFAR-10 class names, the layout a
    CIFAR-10 --data-dir may have (and a folder of photos too)."""
    import numpy as np

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name, shape in zip(CIFAR3, ("circle", "square", "triangle")):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                draw_shape(shape, 32, rng).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.parametrize("name, model, flags", [
    ("cifar10", "tutorial_cifar_cnn", ["--epochs 30", "--batch-size 16", "--lr 0.01", "--momentum 0.0",
                                       "--no-nesterov", "--schedule constant"]),
    ("cifar3", "tutorial_tanh_cnn", ["--classes airplane,automobile,ship"]),
    ("transfer", "tf_efficientnet_lite0", ["--pretrained --pretrained-source pypi", "--lr auto", "--patience 3",
                                           "--data photos"]),
    ("tuning", "tutorial_tuning_cnn", ["--grid c1=32,48 c2=64,96 l1=128,256", "--trial-epochs 10",
                                       "--retrain-best --epochs 30 --retrain-patience 3"]),
])
def test_each_lesson_plans_as_the_lesson_was_written(name, model, flags, capsys):
    settings = ["--set", "data=photos"] if name == "transfer" else ["--set", "data_dir=cifar.tar.gz"]
    assert tutorial.main([name, "--dry-run", *settings]) == 0
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if line.startswith("python -m classifier ")]
    assert f"--model {model}" in commands[-1] and all(flag in commands[-1] for flag in flags)
    if name == "cifar3":  # the fully connected net first, on the same three classes
        assert len(commands) == 2 and "--model tutorial_mlp --epochs 10" in commands[0]
        assert "--classes airplane,automobile,ship" in commands[0]
    assert f"lesson '{name}': reported " in out and "; measured" not in out  # a dry run measures nothing


def test_the_lessons_networks_have_the_lessons_parameter_counts():
    """The CIFAR-3 lesson printed 3,738,506 and 18,354: its fully connected net and small CNN with a
    10-way head (on the 3 classes they are 3,737,603 and 18,123, as the recipe says)."""
    lessons = {name: yaml.safe_load(path.read_text()) for name, path in tutorial.lessons().items()}
    models = [step["train"]["model"] for step in lessons["cifar3"]["steps"]]
    assert models == ["tutorial_mlp", "tutorial_tanh_cnn"]
    assert [count_parameters(create_model(m, num_classes=10)) for m in models] == [3_738_506, 18_354]
    assert [count_parameters(create_model(m, num_classes=3)) for m in models] == [3_737_603, 18_123]
    assert "3,737,603" in lessons["cifar3"]["description"] and "18,123" in lessons["cifar3"]["description"]
    assert count_parameters(create_model("tutorial_cifar_cnn", num_classes=10)) == 541_094
    assert "541,094" in lessons["cifar10"]["description"]
    tuning = create_model("tutorial_tuning_cnn", num_classes=10)  # the lesson's best widths are the defaults
    assert count_parameters(tuning) == 6_553_098 and "6,553,098" in lessons["tuning"]["description"]
    assert [type(m).__name__ for m in tuning.features if type(m).__name__ == "Conv2d"] == ["Conv2d"] * 4
    assert tuning.features[9].stride == (2, 2)  # conv4, the only downsampling


def test_a_lesson_that_needs_a_users_data_says_so_before_anything_runs(capsys):
    assert tutorial.main(["transfer"]) == 2
    assert "give --set data=...: a folder of photos, one subfolder per class" in capsys.readouterr().err


def _run_lesson(name: str, settings: list[str], tmp_path: Path, monkeypatch, capsys) -> str:
    monkeypatch.chdir(tmp_path)  # the recipes' outs are relative: runs/...
    assert tutorial.main([name, *(f"--set={item}" for item in ["workers=0", *settings])]) == 0
    return capsys.readouterr().out


def _figures_and_line(out: str, folder: Path, name: str, architecture: str, colour: bool = True) -> None:
    bundle = json.loads((folder / "bundle" / "config.json").read_text())
    assert bundle["architecture"] == architecture
    drawn = {path.name for path in (folder / "figures").glob("*.png")}
    assert {"conv_filters.png", "edges.png", "feature_maps.png"} <= drawn
    assert ("channels.png" in drawn) == colour
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"lesson '{name}': reported ") and "% test accuracy, n=" in last
    assert last.endswith(f"{folder.name}/bundle)")  # the bundle it measured: the lesson's, not an earlier step's


def test_the_cifar10_lesson_runs(tmp_path, monkeypatch, capsys, one_torch_thread):
    data = make_cifar_like(tmp_path / "cifar")
    out = _run_lesson("cifar10", [f"data_dir={data}", "epochs=1"], tmp_path, monkeypatch, capsys)
    _figures_and_line(out, tmp_path / "runs" / "tutorial-cifar10", "cifar10", "tutorial_cifar_cnn")


def test_the_cifar3_lesson_runs_both_networks(tmp_path, monkeypatch, capsys, one_torch_thread):
    data = make_cifar_like(tmp_path / "cifar")
    out = _run_lesson("cifar3", [f"data_dir={data}", "epochs=1"], tmp_path, monkeypatch, capsys)
    assert "3,737,603 parameters" in out and "18,123 parameters" in out
    assert not (tmp_path / "runs" / "tutorial-cifar3-mlp" / "figures").exists()  # the lesson's figure is the CNN's
    _figures_and_line(out, tmp_path / "runs" / "tutorial-cifar3-cnn", "cifar3", "tutorial_tanh_cnn")


def test_the_transfer_lesson_runs_on_a_folder_of_photos(tmp_path, monkeypatch, capsys, one_torch_thread):
    photos = make_cifar_like(tmp_path / "photos")
    out = _run_lesson("transfer", [f"data={photos}", "epochs=1", "image_size=64", "lr_finder_steps=10",
                                   "batch_size=8"], tmp_path, monkeypatch, capsys)
    folder = tmp_path / "runs" / "tutorial-transfer"
    assert (folder / "bundle" / "eval" / "lr_finder.png").is_file()  # lr: auto ran the range test
    assert json.loads((folder / "bundle" / "config.json").read_text())["classifier"]["pretrained"] is True
    _figures_and_line(out, folder, "transfer", "tf_efficientnet_lite0")


def test_the_tuning_lesson_searches_then_retrains_the_winner(tmp_path, monkeypatch, capsys, one_torch_thread):
    data = make_cifar_like(tmp_path / "cifar")
    out = _run_lesson("tuning", [f"data_dir={data}", "trials=2", "trial_epochs=1", "epochs=1", "batch_size=8"],
                      tmp_path, monkeypatch, capsys)
    folder = tmp_path / "runs" / "tutorial-tuning"
    assert "| c1 | c2 | l1 |" in (folder / "results.md").read_text()
    assert len(list((folder / "trials").iterdir())) == 2  # trials=2: the grid's first two points
    config = json.loads((folder / "best" / "bundle" / "config.json").read_text())
    assert config["model_args"]["c1"] == 32 and config["model_args"]["l1"] in (128, 256)
    assert config["classifier"]["training"]["patience"] == 3  # the winner's run stops early (--retrain-patience)
    _figures_and_line(out, folder / "best", "tuning", "tutorial_tuning_cnn")
    with Image.open(folder / "best" / "figures" / "conv_filters.png") as image:  # four panels: a tall figure
        assert image.height > image.width


def test_search_settings_are_refused_where_the_recipe_has_no_search(capsys):
    assert tutorial.main(["apparel", "--set", "trials=2", "--dry-run"]) == 2
    assert "unknown setting 'trials'" in capsys.readouterr().err


def test_one_out_for_two_networks_is_refused(capsys):
    assert tutorial.main(["cifar3", "--set", "out=here", "--dry-run"]) == 2
    assert "2 steps that make a bundle" in capsys.readouterr().err
