"""classifier.evaluate: metrics against hand-computed values, calibration, mistakes, the report files."""

import json

import numpy as np
import pytest
import torch

from classifier.data import Split
from classifier.evaluate import (calibrated_metrics, compute_metrics, expected_calibration_error, fit_temperature,
                                 rank_mistakes, sample_predictions, save_report)

CLASSES = ["a", "b", "c"]


def logits_for(predicted, confidence=4.0, num_classes=3):
    logits = torch.zeros(len(predicted), num_classes)
    logits[torch.arange(len(predicted)), torch.tensor(predicted)] = confidence
    return logits


def test_metrics_match_hand_computation():
    targets = torch.tensor([0, 0, 0, 1, 1, 2])
    predicted = [0, 0, 1, 1, 2, 2]
    m = compute_metrics(logits_for(predicted), targets, CLASSES)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    a, b, c = m["per_class"]
    assert (a["precision"], a["recall"], a["support"]) == (1.0, pytest.approx(2 / 3), 3)
    assert (b["precision"], b["recall"]) == (0.5, 0.5)
    assert (c["precision"], c["recall"], c["f1"]) == (0.5, 1.0, pytest.approx(2 / 3))
    assert a["f1"] == pytest.approx(0.8)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    expected_loss = torch.nn.functional.cross_entropy(logits_for(predicted), targets).item()
    assert m["loss"] == pytest.approx(expected_loss)


def test_temperature_recovers_overconfidence():
    torch.manual_seed(0)
    n = 4000
    true_logits = torch.randn(n, 5) * 1.5
    targets = torch.distributions.Categorical(logits=true_logits).sample()
    overconfident = true_logits * 3  # a model three times too sure of itself
    temperature = fit_temperature(overconfident, targets)
    assert temperature == pytest.approx(3.0, rel=0.1)
    before = expected_calibration_error(overconfident.softmax(1), targets)
    after = expected_calibration_error((overconfident / temperature).softmax(1), targets)
    assert after < before / 3


def test_calibrated_metrics_fit_on_validation_and_report_both():
    torch.manual_seed(1)
    logits = torch.randn(600, 3) * 4
    targets = torch.distributions.Categorical(logits=logits / 4).sample()
    m = calibrated_metrics(logits[:300], targets[:300], logits[300:], targets[300:], CLASSES)
    cal = m["calibration"]
    assert cal["fitted_on"] == "validation" and cal["temperature"] > 1.5
    assert cal["ece_after"] < cal["ece_before"] and m["temperature"] == cal["temperature"]
    # Temperature never changes which class wins, so accuracy is the same before and after.
    assert m["accuracy"] == compute_metrics(logits[:300], targets[:300], CLASSES)["accuracy"]


def test_mistakes_are_ranked_by_loss():
    logits = torch.tensor([[5.0, 0, 0], [0, 1.0, 0], [0, 0, 9.0], [0, 3.0, 0]])
    targets = torch.tensor([0, 0, 0, 1])
    mistakes = rank_mistakes(logits, targets, torch.tensor([10, 11, 12, 13]), CLASSES)
    assert [m["index"] for m in mistakes] == [12, 11]  # the confident mistake first; right ones absent
    assert mistakes[0]["true"] == "a" and mistakes[0]["predicted"] == "c" and mistakes[0]["p_predicted"] > 0.99


def test_report_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    logits = logits_for([0, 2, 2, 1, 1, 2])
    metrics = compute_metrics(logits, targets, CLASSES)
    mistakes = rank_mistakes(logits, targets, torch.arange(6), CLASSES)
    samples = sample_predictions(logits, targets, torch.arange(6), CLASSES, count=6)
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "train_acc": 0.5, "val_acc": 0.4}]
    out = save_report(tmp_path / "eval", metrics, mistakes, Split(images, targets.numpy()), CLASSES,
                      history=history, samples=samples)
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == pytest.approx(4 / 6)
    index = json.loads((out / "mistakes.json").read_text())
    assert len(index) == 2 and all((out / m["file"]).exists() for m in index)
    saved = np.asarray(__import__("PIL.Image").Image.open(out / index[0]["file"]))
    assert np.array_equal(saved, images[index[0]["index"]])  # the mistake image is that test image
    for name in ("confusion_matrix.png", "samples.png", "curves.png"):
        assert (out / name).stat().st_size > 2000
    assert json.loads((out / "confusion_matrix.json").read_text())["labels"] == CLASSES


def test_temperature_stays_bounded_on_a_perfectly_separated_set():
    logits = logits_for([0, 1, 2, 0, 1, 2, 0, 1, 2], confidence=2.0)
    targets = torch.tensor([0, 1, 2] * 3)  # all right: the NLL keeps falling as T -> 0
    from classifier.evaluate import MIN_TEMPERATURE

    assert MIN_TEMPERATURE <= fit_temperature(logits, targets) < 0.2
