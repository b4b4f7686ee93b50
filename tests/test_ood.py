"""The out-of-distribution flag: fitted on validation logits, stored in the bundle, measured on
out-of-domain images built offline, shown on the card, and what the Predictor and headline do with it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from classifier import app_logic as logic
from classifier import ood
from classifier.bundle import OOD_FIELD, load_bundle
from classifier.predict import Predictor
from conftest import draw_shape, make_image_folder


@pytest.fixture(scope="module")
def ood_bundle(tmp_path_factory):
    """A small fast_cnn trained on shapes, with validation images enough (24) to fit a threshold."""
    from classifier.config import RunConfig
    from classifier.run import run

    base = tmp_path_factory.mktemp("ood")
    data = make_image_folder(base / "shapes", per_class=80, splits=("train", "test"))
    result = run(RunConfig(data=str(data), model="fast_cnn", model_args={"widths": [16, 32, 64]}, epochs=2,
                           batch_size=32, lr=0.05, workers=0, out=str(base / "run")))
    return result.bundle_dir


def test_threshold_keeps_the_asked_share_of_validation_images():
    logits = torch.randn(1000, 10, generator=torch.Generator().manual_seed(0)) * 3
    record = ood.fit_threshold(logits, temperature=0.5)
    scores = ood.energy(logits, 0.5)
    kept = float((scores >= record["threshold"]).double().mean())
    assert kept == pytest.approx(ood.KEEP_IN_DOMAIN, abs=0.002)
    assert record["score"] == "energy" and record["num_fitted"] == 1000
    # The energy is the logsumexp of the calibrated logits.
    assert torch.allclose(scores, torch.logsumexp(logits / 0.5, -1))


def test_a_bundle_without_a_threshold_never_flags():
    assert not ood.is_out_of_domain(-1e9, None)
    assert ood.is_out_of_domain(1.0, 2.0) and not ood.is_out_of_domain(3.0, 2.0)


@pytest.mark.parametrize("kind", ood.SYNTHETIC_KINDS)
def test_synthetic_images_are_repeatable_and_of_their_kind(kind):
    images = ood.synthetic_images(kind, 8, size=48)
    assert images.shape == (8, 48, 48, 3) and images.dtype == np.uint8
    assert np.array_equal(images, ood.synthetic_images(kind, 8, size=48))  # the same for a seed
    assert len({im.tobytes() for im in images}) == 8  # but no two alike
    if kind == "flat colour":
        assert all(len(np.unique(im.reshape(-1, 3), axis=0)) == 1 for im in images)
    if kind == "text":  # dark and light screens alike: mostly background, some ink
        for im in images:
            _, counts = np.unique(im.reshape(-1, 3), axis=0, return_counts=True)
            assert 0.4 < counts.max() / counts.sum() < 0.99, counts.max() / counts.sum()


def test_too_few_validation_images_fit_no_threshold(tiny_bundle):
    metrics = json.loads((tiny_bundle / "eval" / "metrics.json").read_text())
    assert "ood" not in metrics and load_bundle(tiny_bundle).ood_threshold is None


def test_training_stores_the_threshold_and_measures_its_rates(ood_bundle):
    tiny_bundle = ood_bundle
    config = json.loads((tiny_bundle / "config.json").read_text())
    metrics = json.loads((tiny_bundle / "eval" / "metrics.json").read_text())
    record = metrics["ood"]
    assert config["classifier"][OOD_FIELD] == {k: record[k] for k in ("score", "threshold", "keep")}
    assert load_bundle(tiny_bundle).ood_threshold == pytest.approx(record["threshold"])
    shown = metrics["split"]
    assert record["in_domain"][shown]["n"] == metrics["num_samples"]
    assert 0 <= record["in_domain"][shown]["flagged"] <= 1
    rates = record["out_of_domain"]
    assert set(rates) == {*ood.SYNTHETIC_KINDS, "pooled"}
    assert rates["pooled"]["n"] == len(ood.SYNTHETIC_KINDS) * ood.SYNTHETIC_PER_KIND
    card = (tiny_bundle / "README.md").read_text()
    assert "## Out-of-distribution flag" in card and f"{record['threshold']:.4g}" in card
    assert f"{rates['pooled']['flagged']:.1%}" in card


def test_predictor_scores_an_image_in_the_same_pass(ood_bundle, tmp_path):
    tiny_bundle = ood_bundle
    predictor = Predictor(tiny_bundle)
    path = tmp_path / "square.png"
    draw_shape("square", 64).save(path)
    probabilities, score = predictor.predict_scored(path)
    assert probabilities == pytest.approx(predictor.predict(path))
    logits = predictor.calibrated_logits(predictor.preprocess(path).unsqueeze(0))[0]
    assert score == pytest.approx(float(torch.logsumexp(logits, -1)))
    assert predictor.ood_threshold == load_bundle(tiny_bundle).ood_threshold


def with_threshold(source, dest, threshold):
    """A copy of a bundle with another out-of-distribution threshold, or none (None)."""
    shutil.copytree(source, dest)
    config = json.loads((dest / "config.json").read_text())
    if threshold is None:
        config["classifier"].pop(OOD_FIELD, None)
    else:
        config["classifier"][OOD_FIELD] = {"score": "energy", "threshold": threshold, "keep": 0.95}
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_headline_says_none_of_the_classes_past_the_threshold(tiny_bundle, tmp_path):
    path = tmp_path / "circle.png"
    draw_shape("circle", 64).save(path)
    flagging = Predictor(with_threshold(tiny_bundle, tmp_path / "flags-all", 1e6))  # every energy is below
    prediction = logic.classify(flagging, path)
    top, p = next(iter(prediction.probabilities.items()))
    assert prediction.out_of_domain
    assert prediction.headline() == (f"This may be none of the model's classes "
                                     f"(closest: {top} {logic.format_probability(p)})")
    # A bundle without the field behaves as before: the usual headline, never the flag.
    plain = logic.classify(Predictor(with_threshold(tiny_bundle, tmp_path / "none", None)), path)
    assert not plain.out_of_domain and plain.headline() == logic.headline(plain.probabilities)
