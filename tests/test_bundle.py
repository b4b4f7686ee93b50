"""classifier.bundle and classifier.predict: a saved model comes back identical, from config and weights."""

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from classifier.bundle import BundleError, load_bundle, make_config, save_bundle
from classifier.models import create_model
from classifier.predict import Predictor


def _save(tmp_path, name="fast_cnn", **model_args):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, **model_args).eval()
    config = make_config(model, architecture=name, label_names=["x", "y", "z"], model_args=model_args | {"in_chans": 3},
                         input_size=(3, 32, 32), mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2),
                         interpolation="bilinear", crop_pct=1.0, project={"dataset": "toy", "temperature": 2.0})
    return model, save_bundle(tmp_path / "bundle", model, config)


def test_load_gives_identical_predictions(tmp_path):
    model, path = _save(tmp_path, widths=[8, 16, 32])
    bundle = load_bundle(path)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), bundle.model(x))
    assert bundle.label_names == ["x", "y", "z"] and bundle.temperature == 2.0


def test_config_is_timm_hub_layout(tmp_path):
    _, path = _save(tmp_path, "resnet18")
    config = json.loads((path / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["num_classes"] == 3
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and config["pretrained_cfg"]["mean"] == [0.4] * 3
    assert "hf_hub_id" not in config["pretrained_cfg"] and "url" not in config["pretrained_cfg"]
    assert set(config["classifier"]["versions"]) >= {"torch", "timm", "classifier"}
    assert not list(path.glob("*.pt")) and not list(path.glob("*.bin"))  # safetensors only


@pytest.mark.parametrize("name, args", [("resnet18", {}), ("fast_cnn", {"widths": [8, 16, 32]})])
def test_plain_timm_loads_a_bundle(tmp_path, name, args):
    model, path = _save(tmp_path, name, **args)
    loaded = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.pretrained_cfg["label_names"] == ["x", "y", "z"]


def test_broken_bundles_are_named(tmp_path):
    _, path = _save(tmp_path, widths=[8, 16, 32])
    with pytest.raises(BundleError, match="no such bundle"):
        load_bundle(tmp_path / "missing")
    config = json.loads((path / "config.json").read_text())
    config["model_args"]["widths"] = [8, 16, 64]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="do not fit fast_cnn"):
        load_bundle(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="no model.safetensors"):
        load_bundle(path)


def test_predictor_on_the_trained_bundle(tiny_bundle):
    predictor = Predictor(tiny_bundle)
    shapes = tiny_bundle.parent.parent / "shapes" / "test"
    right = 0
    for kind in ("circle", "square", "triangle"):
        for path in sorted((shapes / kind).iterdir())[:5]:
            probs = predictor.predict(path)
            assert list(probs) and abs(sum(probs.values()) - 1) < 1e-5
            assert list(probs.values()) == sorted(probs.values(), reverse=True)
            right += next(iter(probs)) == kind
    assert right >= 11  # the 3-epoch model is far better than chance (5 of 15)
    rgba = Image.fromarray(np.zeros((50, 70, 4), np.uint8))
    assert len(predictor.predict(rgba, top_k=2)) == 2


def test_predictor_applies_the_temperature(tmp_path):
    model, path = _save(tmp_path, widths=[8, 16, 32])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    predictor = Predictor(path)
    x = predictor.preprocess(image)[None]
    with torch.no_grad():
        expected = (model(x) / 2.0).softmax(1)[0]
    probs = predictor.predict(image)
    assert probs["x"] == pytest.approx(float(expected[0]), abs=1e-6)
