"""The bundles that ship in assets/models: they load, stay small, report what their evaluation
measured, and name the real photos in assets/examples (each file is named after its class)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from classifier.bundle import load_bundle
from classifier.app_logic import EXAMPLES_DIR, MODELS_DIR, PREFERRED_MODELS, default_model, example_images, find_bundles
from classifier.model_card import render_model_card
from classifier.predict import Predictor
from classifier.tta import tta_mode

BUNDLES = find_bundles(MODELS_DIR)
MAX_SHIPPED_WEIGHTS = 25_000_000  # bytes: the app issue's limit for all shipped weights together
EXAMPLES = [Path(p) for p in example_images()]  # the photos the app offers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_default_model_ships():
    assert PREFERRED_MODELS[0] in BUNDLES, f"{PREFERRED_MODELS[0]} is missing from {MODELS_DIR}"
    assert default_model(BUNDLES) == PREFERRED_MODELS[0]


def test_shipped_weights_stay_under_25_mb():
    total = sum(Path(path, "model.safetensors").stat().st_size for path in BUNDLES.values())
    assert total < MAX_SHIPPED_WEIGHTS, f"{total / 2**20:.1f} MB of weights in {MODELS_DIR}"


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_config_reports_the_evaluation_it_ran(name):
    folder = Path(BUNDLES[name])
    config = json.loads((folder / "config.json").read_text())["classifier"]
    measured = json.loads((folder / "eval" / "metrics.json").read_text())
    assert config["metrics"]["accuracy"] == measured["accuracy"]
    assert config["temperature"] == measured["calibration"]["temperature"]
    assert tta_mode(config.get("tta")) == tta_mode(measured.get("tta"))  # the Predictor predicts as measured
    assert config["num_test"] == measured["num_samples"] == sum(map(sum, measured["confusion_matrix"]))
    # Trained by the project's command line, or averaged from bundles it trained (classifier.soup).
    assert config["command"].startswith(("python training/finetune.py", "python -m classifier.soup"))


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_names_every_example_photo(name):
    bundle = load_bundle(BUNDLES[name])
    predictor = Predictor(bundle)
    assert EXAMPLES, f"no example photos in {EXAMPLES_DIR}"
    wrong = {}
    for photo in EXAMPLES:
        assert photo.stem in bundle.label_names, f"{photo.name} is not named after a class"
        top = next(iter(predictor.predict(photo)))
        if top != photo.stem:
            wrong[photo.name] = top
    assert not wrong, f"{name} misnames {wrong}"


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_the_cards_plain_timm_snippet_predicts_as_the_predictor(name):
    """The model card's timm code (plain timm, or timm after `import classifier` for our CNNs), run as written (the Hub id swapped for the folder),
    gives the Predictor's probabilities: same shrinking of photos, TTA and temperature."""
    import torch

    folder = Path(BUNDLES[name])
    card = render_model_card(folder)
    code = "import timm\n" + card.split("```python\nimport timm\n", 1)[1].split("```", 1)[0]
    photo = EXAMPLES[0]
    code = code.replace("hf-hub:OWNER/NAME", f"local-dir:{folder}").replace("photo.jpg", str(photo))
    namespace: dict = {}
    exec(compile(code, f"{name}/README.md", "exec"), namespace)  # noqa: S102  (our own generated card)
    expected = Predictor(load_bundle(folder)).predict(photo)
    got = namespace["probabilities"]
    labels = namespace["labels"]
    # Tight: leaving out the mirror TTA moves the lite0 soup's probabilities for this photo by 1.5e-4.
    torch.testing.assert_close(got, torch.tensor([expected[label] for label in labels]), atol=1e-5, rtol=0)


# The card's first way to load the model, run as a stranger would: a fresh interpreter in isolated
# mode (-I: no PYTHONPATH, no script folder on the path), outside the repository, where importing
# this project is refused too (an editable install would otherwise still find it).
STRANGER = """
import contextlib, importlib.abc, io, json, sys

class NoProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "classifier":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoProject())
code, photos = sys.argv[1], json.loads(sys.argv[2])
answers = []
for photo in photos:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code.replace("photo.jpg", photo), "card", "exec"), {"__name__": "__main__"})
    answers.append(printed.getvalue().strip().splitlines()[-1])
print(json.dumps({"answers": answers, "project": sorted(m for m in sys.modules if m.startswith("classifier"))}))
"""


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_the_cards_first_way_loads_the_model_without_this_project(name, tmp_path):
    """The snippet the card gives first (plain timm, or onnxruntime on model.onnx for our own CNNs)
    needs nothing from this project and names each example photo as the Predictor does."""
    import subprocess
    import sys

    folder = Path(BUNDLES[name])
    card = render_model_card(folder)
    usage = card[card.index("## How to use"):]
    first = usage.split("```python\n", 1)[1].split("```", 1)[0]
    assert "import classifier" not in first and "from classifier" not in first  # not one import of ours
    if "import onnxruntime" in first:
        assert card.split("library_name: ", 1)[1].split("\n", 1)[0] == "onnx"
    else:
        assert card.split("library_name: ", 1)[1].split("\n", 1)[0] == "timm"
    code = first.replace("hf-hub:OWNER/NAME", f"local-dir:{folder}").replace('"model.onnx"', f'"{folder / "model.onnx"}"')
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-I", "-c", STRANGER, code, json.dumps([str(p) for p in EXAMPLES])],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["project"] == []
    predictor = Predictor(load_bundle(folder))
    expected = [next(iter(predictor.predict(photo))) for photo in EXAMPLES]
    assert result["answers"] == expected


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_names_no_example_photo_none_of_the_classes_and_flags_most_junk(name):
    """The out-of-distribution flag (classifier.ood) stored by the bundle's evaluation: silent on
    real photos of its classes, loud on images of none of them, as the app computes it."""
    from PIL import Image

    from classifier import ood

    predictor = Predictor(load_bundle(BUNDLES[name]))
    assert predictor.ood_threshold is not None, f"{name} has no out-of-distribution threshold: evaluate it again"
    flagged = [photo.name for photo in EXAMPLES if predictor.out_of_domain(predictor.predict_scored(photo)[1])]
    assert not flagged, f"{name} calls {flagged} none of its classes"
    junk = [Image.fromarray(image) for kind in ("flat colour", "gradient", "noise")
            for image in ood.synthetic_images(kind, 10, seed=1)]
    share = sum(predictor.out_of_domain(predictor.predict_scored(image)[1]) for image in junk) / len(junk)
    assert share > 0.8, f"{name} flags only {share:.0%} of flat colours, gradients and noise"
    recorded = json.loads((Path(BUNDLES[name]) / "eval" / "metrics.json").read_text())["ood"]
    assert recorded["in_domain"]["test"]["flagged"] < 0.07  # ~5% by construction, on the test split
    assert recorded["out_of_domain"]["pooled"]["flagged"] > 0.5
