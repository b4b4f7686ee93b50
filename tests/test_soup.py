"""python -m classifier soup: the weight average of bundles (or a run's last checkpoint), evaluated."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from classifier.bundle import load_bundle
from classifier.app_logic import model_summary
from classifier.cli.soup import main
from classifier.config import RunConfig
from classifier.run import run
from classifier.predict import Predictor
from classifier.soup import average_weights, short_name


def test_average_weights_means_floats_and_keeps_counters_and_dtypes():
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.float16), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 6.0], dtype=torch.float16), "n": torch.tensor(9)}
    out = average_weights([a, b])
    assert out["w"].dtype == torch.float16 and out["w"].tolist() == [2.0, 4.0]
    assert out["n"].item() == 5


@pytest.fixture(scope="module")
def second_run(tiny_bundle, tmp_path_factory):
    """One more epoch from tiny_bundle with other settings: its run folder (last.pt beside bundle/)."""
    out = tmp_path_factory.mktemp("second") / "run"
    run(RunConfig(data=str(tiny_bundle.parent.parent / "shapes"), model="fast_cnn", init_from=str(tiny_bundle),
                  epochs=1, batch_size=32, lr=0.02, mixup=0.4, workers=0, out=str(out),
                  command="python training/finetune.py --init-from tiny --mixup 0.4"))
    return out


def test_a_soup_is_the_mean_of_its_ingredients_and_is_evaluated(tiny_bundle, second_run, tmp_path, capsys,
                                                                  one_torch_thread):
    out = tmp_path / "soup"
    assert main([str(tiny_bundle), str(second_run / "last.pt"), "--out", str(out), "--tta", "flip",
                 "--workers", "0", "--device", "cpu"]) == 0
    # Nothing was recorded before: the table has the measured column only, validation accuracy
    # included (to choose between soups without the test set).
    printed = capsys.readouterr().out
    assert "| | measured now |" in printed and "| validation accuracy | " in printed
    first = load_file(str(tiny_bundle / "model.safetensors"))
    last = torch.load(second_run / "last.pt", map_location="cpu", weights_only=True)["model"]
    soup = load_file(str(out / "model.safetensors"))
    name = next(k for k, v in first.items() if v.is_floating_point() and not torch.equal(v, last[k]))
    torch.testing.assert_close(soup[name], (first[name] + last[name]) / 2)

    project = json.loads((out / "config.json").read_text())["classifier"]
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    # Measured on the test split of the ingredients' data, nothing carried over from them.
    assert metrics["tta"] == project["tta"] == "flip" and project["metrics"]["accuracy"] == metrics["accuracy"]
    assert metrics["num_samples"] == project["num_test"] and "epochs_trained" not in metrics
    assert 0 < metrics["val_accuracy"] <= 1
    assert project["command"].startswith("python -m classifier soup ")
    assert project["evaluation_command"].startswith("python -m classifier evaluate ")
    assert "started_from" not in project and "lr" not in project["training"]
    bundle_record, checkpoint_record = project["soup"]["ingredients"]
    assert bundle_record["bundle"] == str(tiny_bundle) and bundle_record["accuracy"] is not None
    # A checkpoint's figures are its own epoch's, not those of the best epoch its bundle holds.
    assert checkpoint_record["epoch"] == 1 and checkpoint_record["accuracy"] is None
    assert checkpoint_record["val_accuracy"] is not None
    assert checkpoint_record["command"].endswith("--mixup 0.4")
    assert checkpoint_record["started_from"]["bundle"] == str(tiny_bundle)

    # Not trained itself: its curves are its ingredients' (a run's last.pt: the epochs up to it).
    assert (out / "eval" / "curves.png").is_file() and short_name(str(second_run / "last.pt")) == second_run.name
    card = (out / "README.md").read_text()
    assert "eval/curves.png" in card
    assert "### Ingredient 2: `" + str(second_run / "last.pt") + "` (the weights of epoch 1" in card
    assert "--mixup 0.4" in card and project["command"] in card
    summary = model_summary(load_bundle(out), str(out))
    assert "| Averaged model 2 |" in summary and "| Averaging command |" in summary
    predictor = Predictor(out)
    assert predictor.tta == "flip" and predictor.temperature == metrics["calibration"]["temperature"]

    # Written again over itself: the earlier evaluation goes, the new one takes its place.
    (out / "eval" / "stale.txt").write_text("old")
    assert main([str(tiny_bundle), str(second_run / "bundle"), "--out", str(out), "--workers", "0",
                 "--device", "cpu"]) == 0
    assert not (out / "eval" / "stale.txt").exists()


def test_models_that_cannot_be_averaged_are_refused(tiny_bundle, tmp_path, capsys):
    other = shutil.copytree(tiny_bundle, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config["label_names"] = ["a", "b", "c"][: config["num_classes"]]
    (other / "config.json").write_text(json.dumps(config))
    assert main([str(tiny_bundle), str(other), "--out", str(tmp_path / "soup")]) == 2
    assert "differ in classes" in capsys.readouterr().err
    assert main([str(tiny_bundle), "--out", str(tmp_path / "soup")]) == 2
    assert "two ingredients or more" in capsys.readouterr().err
    assert main([str(tiny_bundle), str(other), "--out", str(other)]) == 2
    assert "is one of the ingredients" in capsys.readouterr().err
    assert main([str(tiny_bundle), str(tmp_path / "run" / "last.pt"), "--out", str(tmp_path / "run" / "bundle")]) == 2
    assert "is one of the ingredients" in capsys.readouterr().err
    assert main([str(tiny_bundle), str(tmp_path / "missing.pt"), "--out", str(tmp_path / "soup")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "soup").exists()


def test_a_checkpoint_with_a_moving_average_gives_the_average(second_run, tmp_path):
    """A run trained with --model-ema-decay validated and delivered its weights' average: that is
    the model its last.pt stands for, not the raw weights it keeps to resume."""
    from classifier.soup import load_ingredient

    run_dir = shutil.copytree(second_run, tmp_path / "run")
    checkpoint = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    checkpoint["ema"] = {k: v + 1 if v.is_floating_point() else v for k, v in checkpoint["model"].items()}
    torch.save(checkpoint, run_dir / "last.pt")
    weights = load_ingredient(str(run_dir / "last.pt")).bundle.model.state_dict()
    for key, value in checkpoint["ema"].items():
        assert torch.equal(weights[key], value), key
