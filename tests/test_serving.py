"""Serving on either runtime (classifier.serving): the app's ModelStore and `predict` pick torch or
onnxruntime through one function, and the ONNX path classifies an image, through the app's own
logic, in a process that cannot import torch, as the torch Predictor does."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from classifier import app_logic
from classifier.bundle import CONFIG_FILE
from classifier.errors import BundleError, UserError
from classifier.onnx_runtime import ONNX_FILE
from classifier.predict import Predictor
from classifier.serving import BundleOnnxPredictor, load_predictor, pick_runtime
from conftest import WITHOUT_TORCH

ROOT = Path(__file__).resolve().parents[1]
CNN = ROOT / "assets" / "models" / "cifar10-cnn"  # ships its model.onnx (python -m classifier export)
LITE0 = ROOT / "assets" / "models" / "cifar10-efficientnet-lite0"  # ships none: plain timm loads it
EXAMPLES = sorted(str(p) for p in (ROOT / "assets" / "examples").glob("*.jpg"))
TOLERANCE = 1e-4  # as tests/test_export.py: kernels differ by ~1e-6; a lost TTA view moves ~1e-2

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The app's logic in a child interpreter where torch, torchvision and timm cannot be imported (a
# Space whose requirements install onnxruntime only): runtime "auto" must find the model.onnx.
APP_WITHOUT_TORCH = WITHOUT_TORCH + """
from classifier import app_logic

store = app_logic.ModelStore(app_logic.model_choices(sys.argv[1]), runtime="auto", threads=1)
name = app_logic.default_model(store.choices)
images = json.loads(sys.argv[2])
answers = [app_logic.classify(store.get(name), image).probabilities for image in images]
summary = app_logic.model_summary(store.bundle(name), store.location(name))
report = app_logic.EvalReport.from_bundle(store.bundle(name))
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "torchvision", "timm"))
print(json.dumps({"name": name, "kind": type(store.get(name)).__name__, "answers": answers, "loaded": loaded,
                  "summary": summary, "gallery": len(report.gallery())}))
"""


@pytest.fixture(scope="module")
def cnn_only(tmp_path_factory) -> Path:
    """A models folder holding the shipped CNN alone (it and its model.onnx linked, not copied)."""
    folder = tmp_path_factory.mktemp("models")
    (folder / CNN.name).symlink_to(CNN, target_is_directory=True)
    return folder


def test_the_app_logic_serves_onnx_without_torch_as_torch_does(cnn_only):
    done = subprocess.run([sys.executable, "-c", APP_WITHOUT_TORCH, str(cnn_only), json.dumps(EXAMPLES)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["loaded"] == [] and result["kind"] == "BundleOnnxPredictor"
    assert "1,971,352" in result["summary"] and result["gallery"] > 0  # the Model and Mistakes tabs' facts
    expected = Predictor(CNN).predict_batch(EXAMPLES)
    assert len(result["answers"]) == len(EXAMPLES) >= 9
    for ours, theirs in zip(result["answers"], expected):
        assert next(iter(ours)) == next(iter(theirs))  # the same top class
        assert set(ours) == set(theirs)
        assert max(abs(ours[label] - theirs[label]) for label in theirs) < TOLERANCE


def test_the_store_takes_the_runtime_asked_for(cnn_only):
    for runtime, kind in (("onnx", BundleOnnxPredictor), ("torch", Predictor), ("auto", Predictor)):
        store = app_logic.ModelStore(app_logic.model_choices(cnn_only), runtime=runtime, threads=1)
        predictor = store.get(CNN.name)
        assert type(predictor) is kind, runtime
        assert store.bundle(CNN.name).label_names == predictor.labels


def test_pick_runtime():
    assert pick_runtime("auto", CNN) == "torch"  # torch is installed here
    assert pick_runtime("onnx", CNN) == "onnx"
    with pytest.raises(BundleError, match=f"no {ONNX_FILE}.*python -m classifier export"):
        pick_runtime("onnx", LITE0)
    with pytest.raises(UserError, match="expected one of auto, torch, onnx"):
        pick_runtime("tensorflow", CNN)


def test_a_stale_export_and_another_tta_are_refused(tmp_path):
    bundle = tmp_path / "cnn"
    shutil.copytree(CNN, bundle, ignore=shutil.ignore_patterns("eval"))
    with pytest.raises(UserError, match="the ONNX graph holds the bundle's own"):
        load_predictor(bundle, "onnx", tta="none")
    config = json.loads((bundle / CONFIG_FILE).read_text())
    config["classifier"]["temperature"] = 2.0  # re-calibrated after the export
    (bundle / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(BundleError, match="exported from an older state.*temperature.*export it again"):
        load_predictor(bundle, "onnx")


def test_predict_command_on_onnx_answers_as_on_torch(capsys):
    from classifier.cli.predict import main

    answers = {}
    for runtime in ("onnx", "torch"):
        assert main([str(CNN), *EXAMPLES[:4], "--json", "--top-k", "3", "--runtime", runtime]) == 0
        answers[runtime] = json.loads(capsys.readouterr().out)
    for ours, theirs in zip(answers["onnx"], answers["torch"]):
        assert list(ours["predictions"]) == list(theirs["predictions"])
        assert max(abs(ours["predictions"][k] - theirs["predictions"][k]) for k in theirs["predictions"]) < TOLERANCE


PREDICT_WITHOUT_TORCH = WITHOUT_TORCH + """
from classifier.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_predict_command_serves_onnx_without_torch():
    """`python -m classifier predict` on runtime auto, where torch cannot be imported: onnxruntime."""
    done = subprocess.run([sys.executable, "-c", PREDICT_WITHOUT_TORCH, "predict", str(CNN), *EXAMPLES[:3], "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout)
    expected = Predictor(CNN).predict_batch(EXAMPLES[:3])
    assert [next(iter(a["predictions"])) for a in answers] == [next(iter(e)) for e in expected]
