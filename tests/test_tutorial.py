"""`python -m classifier tutorial`: lessons are the recipes/tutorial-*.yaml files, run by `recipe`'s
own code, with the lesson's reported figure printed beside the measured one."""

from __future__ import annotations

import pytest

from classifier.cli import recipe, tutorial


def test_the_lessons_are_the_tutorial_recipes():
    table = tutorial.lessons()
    assert table["apparel"].name == "tutorial-apparel.yaml"
    assert all(path.name == f"tutorial-{name}.yaml" for name, path in table.items())


def test_no_name_lists_each_lesson_with_its_first_description_line(capsys):
    assert tutorial.main([]) == 0
    out = capsys.readouterr().out
    assert "  apparel  The apparel lesson: Fashion-MNIST" in out
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
    """The run itself is recipe.main's (tested in test_recipes); here it is stood in for, and the
    bundle it would have made is the session's tiny one."""
    calls = []
    monkeypatch.setattr(recipe, "main", lambda argv: calls.append(argv) or 0)
    assert tutorial.main(["apparel", "--set", f"out={tiny_bundle.parent}"]) == 0
    assert calls == [[str(tutorial.lessons()["apparel"]), f"--set=out={tiny_bundle.parent}"]]
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("lesson 'apparel': reported 71% test accuracy (about 72% validation); measured ")
    assert "% test accuracy (" in line.split("measured ")[1]


def test_measured_says_so_when_there_is_no_bundle(tmp_path):
    assert tutorial.measured([("train", {"out": tmp_path}, [])]).startswith("not measured")
    assert tutorial.measured([("evaluate", {}, [])]) == "not measured (the recipe trains nothing)"


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
