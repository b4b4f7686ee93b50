"""ONNX export (classifier.export) and the torch-free runtime (classifier.onnx_runtime), on both
shipped bundles: the exported graph answers as the Predictor does, TTA and temperature included,
carries what a runtime needs in its metadata, and serves from a process that cannot import torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from classifier.bundle import Bundle, load_bundle
from classifier.export import bundle_sample_images, export_onnx, onnx_metadata, verify_onnx
from classifier.images import open_image
from classifier.onnx_runtime import (FORMAT_KEY, INFO_FILE, INPUT_NAME, LOGITS_NAME, ONNX_FILE,
                                     PROBABILITIES_NAME, EvalTransform, OnnxModelError, OnnxPredictor)
from classifier.predict import Predictor
from conftest import WITHOUT_TORCH

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR, EXAMPLES_DIR = ROOT / "assets" / "models", ROOT / "assets" / "examples"
BUNDLES = ("cifar10-efficientnet-lite0", "cifar10-cnn")
# onnxruntime and torch run the same float32 graph with different kernels (and orders of summation);
# they agree within 3e-6 in probability on these images and all 200 thumbnails. 1e-4 leaves room for other CPUs' kernels
# and still catches any real divergence (a lost TTA view or temperature moves probabilities by 1e-2).
TOLERANCE = 1e-4
THUMBNAILS = 20  # of each bundle's eval/mistakes: real CIFAR-10 test images the model gets wrong

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def odd_images(folder: Path) -> list[Path]:
    """Images that take every branch of the preprocessing: portrait and landscape (crop), smaller
    than the input (upscale), grey, transparent, palette and 16-bit pixels."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)

    def noise(height, width, channels=3):
        return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)

    images = {
        "portrait.png": Image.fromarray(noise(90, 50)),
        "landscape.jpg": Image.fromarray(noise(120, 301)),
        "tiny.png": Image.fromarray(noise(5, 7)),
        "grey.png": Image.fromarray(noise(64, 64, 1)[..., 0], "L"),
        "transparent.png": Image.fromarray(noise(40, 41, 4), "RGBA"),
        "palette.png": Image.fromarray(noise(33, 47)).quantize(16),
        "sixteen-bit.png": Image.fromarray(rng.integers(0, 65536, (48, 48), dtype=np.uint16)),
    }
    for name, image in images.items():
        image.save(folder / name)
    return [folder / name for name in images]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    photos = sorted(EXAMPLES_DIR.glob("*.jpg")) + sorted((ROOT / "tests" / "assets").glob("*.jpg"))
    return photos + odd_images(tmp_path_factory.mktemp("odd"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """{bundle name: (bundle, its model.onnx)}, each exported once into a folder of its own."""
    out = {}
    for name in BUNDLES:
        bundle = load_bundle(MODELS_DIR / name)
        out[name] = bundle, export_onnx(bundle, tmp_path_factory.mktemp(name) / ONNX_FILE)
    return out


@pytest.mark.parametrize("name", BUNDLES)
def test_export_answers_as_the_predictor(exported, images, name):
    bundle, path = exported[name]
    sample = images + bundle_sample_images(bundle, THUMBNAILS)
    report = verify_onnx(bundle, path, sample)
    assert report["images"] == len(sample) >= 30
    assert report["top1_agreement"] == report["runtime_top1_agreement"] == 1.0, report
    assert report["max_abs_diff"] < TOLERANCE, report
    assert report["pixel_max_abs_diff"] == 0.0, report  # numpy + Pillow reproduce torchvision exactly
    assert report["runtime_max_abs_diff"] < TOLERANCE, report


# Preprocessing the shipped bundles do not use (both: centre crop, crop_pct 1, square inputs),
# over the fast_cnn bundle's config: each branch of timm's eval transform, and a source shrink.
PREPROCESSING = {
    "crop 0.875": dict(crop_pct=0.875),
    "non-square input": dict(input_size=[3, 40, 56], crop_pct=0.9, interpolation="bicubic"),
    "squash": dict(input_size=[3, 36, 30], crop_mode="squash", crop_pct=0.95, interpolation="nearest"),
    "border": dict(crop_mode="border", crop_pct=0.8, interpolation="lanczos"),
    "grey border": dict(input_size=[1, 28, 28], mean=[0.286], std=[0.353], crop_mode="border", crop_pct=1.0),
    "shrink to a 24x20 source": dict(input_size=[3, 64, 64], interpolation="box", source=[24, 20]),
}


@pytest.mark.parametrize("case", PREPROCESSING)
def test_runtime_preprocessing_is_the_bundles_to_the_bit(images, case):
    shipped = load_bundle(MODELS_DIR / "cifar10-cnn")
    changes = dict(PREPROCESSING[case])
    source = changes.pop("source", None)
    config = {**shipped.config, "pretrained_cfg": {**shipped.pretrained_cfg, **changes},
              "classifier": {**shipped.project, "source_image_size": source}}
    bundle = Bundle(shipped.model, config, shipped.path)
    theirs, ours = Predictor(bundle), EvalTransform(onnx_metadata(bundle))
    for path in images:
        image = open_image(path, channels=bundle.in_chans)
        expected = theirs.preprocess(image).numpy()
        assert expected.shape == (bundle.in_chans, *bundle.pretrained_cfg["input_size"][1:])
        np.testing.assert_array_equal(ours(image), expected, err_msg=f"{case}: {path.name}")


@pytest.mark.parametrize("name", BUNDLES)
def test_export_describes_itself(exported, name):
    import onnx

    bundle, path = exported[name]
    model = onnx.load(str(path))
    assert not list(path.parent.glob("*.data")), "the weights belong inside model.onnx"
    props = {p.key: json.loads(p.value) for p in model.metadata_props}
    cfg = bundle.pretrained_cfg
    assert props[FORMAT_KEY] == 1
    assert props["label_names"] == bundle.label_names
    assert props["input_size"] == cfg["input_size"]
    assert (props["mean"], props["std"]) == (cfg["mean"], cfg["std"])
    assert (props["interpolation"], props["crop_pct"]) == (cfg["interpolation"], cfg["crop_pct"])
    assert props["crop_mode"] == "center"
    assert props["source_image_size"] == bundle.project.get("source_image_size")
    assert (props["tta"], props["temperature"]) == (bundle.tta, bundle.temperature)
    info = json.loads((path.parent / INFO_FILE).read_text())
    assert info["file"] == ONNX_FILE and all(info[key] == value for key, value in props.items())
    (graph_input,) = model.graph.input
    assert graph_input.name == INPUT_NAME
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == cfg["input_size"]  # any batch size
    assert [o.name for o in model.graph.output] == [LOGITS_NAME, PROBABILITIES_NAME]


# Run in a child interpreter where torch, torchvision and timm cannot be imported, as on an
# inference-only install: a meta-path finder ahead of the real ones refuses them.
TORCH_FREE = WITHOUT_TORCH + """
try:
    import torch
    sys.exit("the blocker let torch in")
except ModuleNotFoundError:
    pass

from classifier.onnx_runtime import OnnxPredictor

models, images = json.loads(sys.argv[1]), json.loads(sys.argv[2])
answers = {}
for name, path in models.items():
    predictor = OnnxPredictor(path, threads=1)
    answers[name] = {"labels": predictor.labels, "batch": predictor.predict_batch(images),
                     "first_top3": predictor.predict(images[0], top_k=3)}
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "torchvision", "timm"))
print(json.dumps({"answers": answers, "loaded": loaded}))
"""


def test_runtime_serves_without_torch(exported, images):
    models = {name: str(path) for name, (_, path) in exported.items()}
    paths = [str(p) for p in images]
    done = subprocess.run([sys.executable, "-c", TORCH_FREE, json.dumps(models), json.dumps(paths)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["loaded"] == []
    for name, answers in result["answers"].items():
        predictor = Predictor(exported[name][0])
        assert answers["labels"] == predictor.labels
        expected = predictor.predict_batch(paths)
        for ours, theirs in zip(answers["batch"], expected):
            assert next(iter(ours)) == next(iter(theirs))  # the same top class
            assert max(abs(ours[label] - theirs[label]) for label in theirs) < TOLERANCE
        assert list(answers["first_top3"]) == list(expected[0])[:3]


def test_unusable_files_are_refused_clearly(exported, tmp_path):
    import onnx

    with pytest.raises(OnnxModelError, match="no such file"):
        OnnxPredictor(tmp_path / "absent.onnx")
    with pytest.raises(OnnxModelError, match=f"no {ONNX_FILE} in this folder"):
        OnnxPredictor(tmp_path)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all" * 10)
    with pytest.raises(OnnxModelError, match="not an ONNX model onnxruntime can load"):
        OnnxPredictor(garbage)
    _, good = exported["cifar10-cnn"]
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(OnnxModelError, match="not an ONNX model onnxruntime can load"):
        OnnxPredictor(truncated)
    foreign = onnx.load(str(good))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    with pytest.raises(OnnxModelError, match="without this project's metadata"):
        OnnxPredictor(tmp_path / "foreign.onnx")
