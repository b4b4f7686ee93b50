"""python -m classifier evaluate: a bundle evaluated again, as training did, and optionally made its own."""

import json
import shutil

import pytest

from classifier.bundle import load_bundle
from classifier.app_logic import model_summary
from classifier.cli.evaluate import main
from classifier.predict import Predictor
from tests.conftest import make_image_folder


def read(bundle, name):
    return json.loads((bundle / name).read_text())


def test_the_same_settings_reproduce_the_recorded_figures(tiny_bundle, capsys, one_torch_thread):
    def stamps():
        return {p.relative_to(tiny_bundle): p.stat().st_mtime_ns for p in tiny_bundle.rglob("*") if p.is_file()}

    before = stamps()
    assert main([str(tiny_bundle), "--workers", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    recorded = read(tiny_bundle, "eval/metrics.json")
    # The accuracy row shows the recorded figure and the measured one, and they are the same.
    row = next(line for line in out.splitlines() if line.startswith("| accuracy |"))
    assert row == f"| accuracy | {recorded['accuracy']:.2%} | {recorded['accuracy']:.2%} |"
    assert "| test-time augmentation | none | none |" in out
    # Without --write nothing in the bundle changes.
    assert stamps() == before


def test_write_makes_a_tta_evaluation_the_bundles_own(tiny_bundle, tmp_path, capsys, one_torch_thread):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    trained = read(bundle, "eval/metrics.json")
    assert main([str(bundle), "--tta", "flip", "--mistakes", "3", "--workers", "0", "--device", "cpu",
                 "--write"]) == 0
    assert "wrote" in capsys.readouterr().out
    metrics, config = read(bundle, "eval/metrics.json"), read(bundle, "config.json")["classifier"]
    assert metrics["tta"] == config["tta"] == "flip"
    assert config["temperature"] == metrics["calibration"]["temperature"]
    assert config["metrics"]["accuracy"] == metrics["accuracy"]
    # What describes training is carried over; how it was evaluated is recorded.
    assert metrics["epochs_trained"] == trained["epochs_trained"] and metrics["train_seconds"] == trained["train_seconds"]
    assert config["evaluation_command"].startswith("python -m classifier evaluate ") and "--tta flip" in config["evaluation_command"]
    assert config["command"] == read(tiny_bundle, "config.json")["classifier"]["command"]
    # The earlier evaluation's mistakes are gone, not left beside the new ones.
    assert len(read(bundle, "eval/mistakes.json")) == len(list((bundle / "eval" / "mistakes").iterdir())) <= 3
    # The Predictor (and so the app) now predicts as it was measured; the card says so.
    assert load_bundle(bundle).tta == "flip" and Predictor(bundle).tta == "flip"
    card = (bundle / "README.md").read_text()
    assert "mode `flip`" in card and config["evaluation_command"] in card
    assert "| Evaluation command | `python -m classifier evaluate " in model_summary(load_bundle(bundle), str(bundle))


def test_a_labelled_folder_with_some_of_the_models_classes_is_evaluated(tiny_bundle, tmp_path, capsys):
    other = make_image_folder(tmp_path / "other", per_class=6, seed=7)
    shutil.rmtree(other / "triangle")  # two of the bundle's three classes
    assert main([str(tiny_bundle), "--data", str(other), "--workers", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "all 12 images, 2 of the model's 3 classes" in out
    line = next(line for line in out.splitlines() if line.startswith("accuracy "))
    assert "(95% CI " in line and "n=12)" in line
    rows = [line for line in out.splitlines() if line.startswith("| ") and "|---" not in line][1:]
    assert [row.split("|")[1].strip() for row in rows] == ["circle", "square"]  # only the classes it has


def test_data_with_a_class_the_model_lacks_is_one_error_line(tiny_bundle, tmp_path, capsys):
    other = make_image_folder(tmp_path / "other", per_class=3)
    (other / "triangle").rename(other / "hexagon")
    assert main([str(tiny_bundle), "--data", str(other), "--workers", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "hexagon are not the model's" in err and "Traceback" not in err


def test_a_missing_bundle_is_one_error_line(tmp_path, capsys):
    assert main([str(tmp_path / "nothing")]) == 2
    assert "no such bundle" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--tta mirror", "--loader disk"])
def test_unknown_choices_are_refused_by_argparse(tiny_bundle, flag):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tiny_bundle), *flag.split()])
    assert exit_info.value.code == 2


def test_write_refuses_a_hub_bundle_before_downloading_it(capsys):
    assert main(["owner/name", "--write"]) == 2
    assert "is on the Hub" in capsys.readouterr().err
