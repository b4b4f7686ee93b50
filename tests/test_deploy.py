"""`python -m classifier deploy`: the Space's files staged from the repository and the chosen bundles,
listed by --dry-run, and uploaded to the stand-in Hub of tests/test_hub.py as a Gradio Space that
serves those bundles. Nothing here touches the network."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gradio
import pytest
import torch
from PIL import Image
import yaml

from classifier import app_logic, space
from classifier.bundle import load_bundle
from classifier.cli import deploy as deploy_cli
from classifier.errors import BundleError, HubError, UserError
from classifier.publish import files_to_upload
from conftest import WITHOUT_TORCH
from tests.test_hub import TOKEN, FakeHub, assert_token_nowhere, point_hub_client_at

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bundles(tiny_bundle, tmp_path) -> list[Path]:
    """Two runs' bundles (OUT/bundle, as train writes them), one with a checkpoint that must stay home."""
    first = shutil.copytree(tiny_bundle, tmp_path / "runs" / "shapes-a" / "bundle")
    second = shutil.copytree(tiny_bundle, tmp_path / "runs" / "shapes-b" / "bundle")
    torch.save({"epoch": 3}, first / "last.pt")
    return [first, second]


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    with FakeHub(TOKEN) as fake:
        point_hub_client_at(monkeypatch, tmp_path / "hf-home", fake.endpoint)
        yield fake


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("\n---\n")[0].removeprefix("---\n"))


def test_dry_run_lists_every_staged_file_and_uploads_nothing(fake_hub, bundles, tmp_path, capsys):
    staging = tmp_path / "staging"
    argv = ["--space", "alice/shapes-demo", "--dry-run", "--staging", str(staging)]
    assert deploy_cli.main(argv + [arg for b in bundles for arg in ("--model", str(b))]) == 0
    out = capsys.readouterr().out
    assert fake_hub.requests == []  # not even the repository was created
    assert f"would upload to {fake_hub.endpoint}/spaces/alice/shapes-demo" in out
    staged = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    listed = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in out.splitlines()
              if line.startswith("  ")}
    assert sorted(listed) == staged and f"{len(staged)} files" in out
    assert all(listed[path] == (staging / path).stat().st_size for path in staged)

    for name, bundle in zip(("shapes-a", "shapes-b"), bundles):  # named after their runs
        assert [p.removeprefix(f"assets/models/{name}/") for p in staged
                if p.startswith(f"assets/models/{name}/")] == files_to_upload(bundle)
    assert not any(p.endswith((".pt", ".pyc")) or "__pycache__" in p for p in staged)
    assert {"app.py", "classifier/__init__.py", "classifier/app_logic.py", "assets/examples/cat.jpg"} <= set(staged)
    assert (staging / "app.py").read_bytes() == (ROOT / "app.py").read_bytes()

    meta = front_matter((staging / "README.md").read_text())
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == gradio.__version__
    assert meta["app_file"] == "app.py" and meta["title"] == "shapes-demo"
    assert meta["python_version"].count(".") == 1
    assert "models" not in meta  # trained from scratch: no Hub model behind them
    attributes = (staging / ".gitattributes").read_text().splitlines()
    assert {line.split()[0] for line in attributes} == {"*.safetensors", "*.onnx", "*.png", "*.jpg"}
    assert all("filter=lfs" in line for line in attributes)
    requirements = (staging / "requirements.txt").read_text()
    pins = [line for line in requirements.splitlines() if line and not line.startswith("#")]
    names = {line.split(">")[0].split("=")[0] for line in pins}
    assert {"torch", "torchvision", "timm", "safetensors", "pillow", "pandas"} <= names
    assert not names & {"gradio", "optuna", "matplotlib", "onnx", "onnxscript"}
    assert "torch>=2.14" in pins  # the repository's own pin
    assert requirements.startswith("# Serving the demo app only")


def test_deploy_uploads_a_space_that_serves_the_bundles(fake_hub, bundles, tmp_path, capsys):
    assert deploy_cli.main(["--space", "alice/shapes-demo", "--model", str(bundles[0]), "--model", str(bundles[1]),
                            "--message", "first"]) == 0
    out = capsys.readouterr().out
    repo = fake_hub.repos["alice/shapes-demo"]
    assert (repo["type"], repo["sdk"], repo["private"]) == ("space", "gradio", False)
    assert ("POST", "/api/spaces/alice/shapes-demo/commit/main") in fake_hub.requests
    [commit] = fake_hub.commits
    assert commit["summary"] == "first"
    remote = fake_hub.files_at("alice/shapes-demo")
    assert f"deployed {len(remote)} files to {fake_hub.endpoint}/spaces/alice/shapes-demo" in out
    assert commit["oid"] in out
    assert_token_nowhere(TOKEN, out)

    # The Space's files, written out as the Space would check them out: the app finds both bundles.
    checkout = tmp_path / "checkout"
    for path, data in remote.items():
        (checkout / path).parent.mkdir(parents=True, exist_ok=True)
        (checkout / path).write_bytes(data)
    found = app_logic.find_bundles(checkout / "assets" / "models")
    assert sorted(found) == ["shapes-a", "shapes-b"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_bundle(found["shapes-a"]).model(x), load_bundle(bundles[0]).model(x))

    # A second deploy with one model: the other leaves the Space.
    assert deploy_cli.main(["--space", "alice/shapes-demo", "--model", str(bundles[1])]) == 0
    remote = fake_hub.files_at("alice/shapes-demo")
    assert not any(p.startswith("assets/models/shapes-a/") for p in remote)
    assert any(p.startswith("assets/models/shapes-b/") for p in remote)


# Run in the staged folder alone, as the Space runs it: its own app.py, classifier/ and assets/.
SPACE_STARTS = """
import app, classifier
from classifier import app_logic
assert classifier.__file__.startswith(sys.argv[1]), classifier.__file__
app.build_app()  # loads the default model, as the Space does at start-up
print(sorted(app_logic.model_choices()), len(app_logic.example_images()))
"""


def test_the_staged_space_starts_on_its_own_files(bundles, tmp_path):
    staging = tmp_path / "staging"
    space.stage_space(bundles, staging, "alice/shapes-demo")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", "import sys\n" + SPACE_STARTS, str(staging)], cwd=staging,
                          capture_output=True, text=True, timeout=240,
                          env={**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(staging)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == f"['shapes-a', 'shapes-b'] {len(app_logic.example_images())}"


def test_serving_requirements_keep_the_repositorys_pins_of_what_the_app_imports(tmp_path):
    lines = ["torch>=2.14  # a comment", "Pillow==12.3.0", "optuna>=4", "py_yaml>=6", "gradio>=6"]
    others = [name for name in space.SERVING_PACKAGES if name not in ("torch", "pillow")]
    (tmp_path / "requirements.txt").write_text("\n".join(lines + [f"{name}>=1" for name in others]) + "\n")
    kept = space.serving_requirements(tmp_path / "requirements.txt").splitlines()
    assert "torch>=2.14" in kept and "Pillow==12.3.0" in kept  # names compared as pip does
    assert not any(line.startswith(("optuna", "py_yaml", "gradio")) for line in kept)
    (tmp_path / "requirements.txt").write_text("torch>=2.14\n")
    with pytest.raises(UserError, match="does not list .*'pandas'.* which the app needs"):
        space.serving_requirements(tmp_path / "requirements.txt")


def test_without_models_the_shipped_bundles_are_chosen():
    assert sorted(space.chosen_bundles(None)) == sorted(app_logic.find_bundles())


def test_deploy_failures_are_clear_and_never_show_the_token(monkeypatch, bundles, tmp_path, capsys):
    namesake = shutil.copytree(bundles[1], tmp_path / "elsewhere" / "shapes-a" / "bundle")
    with pytest.raises(BundleError, match="would both be assets/models/shapes-a in the Space; rename"):
        space.chosen_bundles([bundles[0], namesake])
    with pytest.raises(BundleError, match="no such bundle folder"):
        space.chosen_bundles([tmp_path / "nothing"])
    (tmp_path / "full" / "mine.txt").parent.mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    with pytest.raises(BundleError, match="the staging folder must be empty"):
        space.stage_space(bundles[:1], tmp_path / "full", "alice/shapes-demo")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["mine.txt"]
    with pytest.raises(SystemExit):
        deploy_cli.main(["--space", "not-a-space-id", "--dry-run"])
    capsys.readouterr()

    point_hub_client_at(monkeypatch, tmp_path / "hf-home", "http://127.0.0.1:9", token=None)
    with pytest.raises(HubError, match="no Hugging Face token"):
        space.deploy_space("alice/shapes-demo", bundles[:1], tmp_path / "staged")
    with FakeHub(TOKEN) as fake:
        point_hub_client_at(monkeypatch, tmp_path / "hf-home", fake.endpoint)
        fake.reject = (403, "token in '{auth}' may not write to alice")  # a server quoting the header back
        assert deploy_cli.main(["--space", "alice/shapes-demo", "--model", str(bundles[0])]) == 2
    err = capsys.readouterr().err
    assert "error: deploy to alice/shapes-demo failed" in err and "403" in err
    assert_token_nowhere(TOKEN, err)


# The staged ONNX Space, run where torch, torchvision and timm cannot be imported (its requirements
# install none of them): the app starts on runtime auto and classifies through its own logic.
ONNX_SPACE_STARTS = WITHOUT_TORCH + """
import app, classifier
from classifier import app_logic
assert classifier.__file__.startswith(sys.argv[1]), classifier.__file__
app.build_app(threads=1)  # loads the default model, as the Space does at start-up
store = app_logic.ModelStore(app_logic.model_choices(), threads=1)
answer = app_logic.classify(store.get("shapes-a"), sys.argv[2]).probabilities
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "torchvision", "timm"))
print(json.dumps({"kind": type(store.get("shapes-a")).__name__, "answer": answer, "loaded": loaded}))
"""


def test_an_onnx_space_installs_no_torch_and_serves_without_it(bundles, tmp_path):
    from classifier.predict import Predictor

    staging = tmp_path / "staging"
    files = dict(space.stage_space(bundles[:1], staging, "alice/shapes-demo", runtime="onnx"))
    model_files = {p.removeprefix("assets/models/shapes-a/") for p in files if p.startswith("assets/models/shapes-a/")}
    assert {"model.onnx", "onnx.json", "config.json"} <= model_files  # exported while staging
    assert "model.safetensors" not in model_files and not (bundles[0] / "model.onnx").exists()
    requirements = (staging / "requirements.txt").read_text()
    names = {re.split(r"[<>=]", line)[0].lower() for line in requirements.splitlines()
             if line and not line.startswith(("#", "-"))}
    assert "onnxruntime" in names and "pandas" in names
    assert not names & {"torch", "torchvision", "timm", "optuna", "matplotlib", "gradio"}
    assert "extra-index-url" not in requirements

    image = app_logic.example_images()[0]  # a photo: the tiny bundle's classes are shapes, but any image serves
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", ONNX_SPACE_STARTS, str(staging), image], cwd=staging,
                          capture_output=True, text=True, timeout=240,
                          env={**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(staging)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["loaded"] == [] and result["kind"] == "BundleOnnxPredictor"
    expected = Predictor(bundles[0]).predict(image)
    assert next(iter(result["answer"])) == next(iter(expected))
    assert max(abs(result["answer"][k] - expected[k]) for k in expected) < 1e-4


def test_a_space_takes_the_lock_only_while_it_matches_the_requirements(tmp_path):
    shutil.copy(ROOT / "requirements.txt", tmp_path / "requirements.txt")
    ranges = space.serving_requirements(tmp_path / "requirements.txt", runtime="onnx")
    text, source = space.space_requirements("onnx", tmp_path)
    assert text == ranges and "no locks/space-onnx.txt" in source
    (tmp_path / "locks").mkdir()
    lock = (f"# Serving the demo app only, every package pinned\n"
            f"# from requirements sha256 {space.requirements_digest(ranges)}\nonnxruntime==1.32.0\n")
    (tmp_path / "locks" / "space-onnx.txt").write_text(lock)
    assert space.space_requirements("onnx", tmp_path) == (lock, "locks/space-onnx.txt")
    with open(tmp_path / "requirements.txt", "a") as f:
        f.write("pandas>=3\n")  # the ranges changed after the lock was made
    text, source = space.space_requirements("onnx", tmp_path)
    assert "pandas>=3" in text and "was made from other requirements; run tools/lock.py" in source
    torch_ranges = space.serving_requirements(tmp_path / "requirements.txt", runtime="torch")
    assert f"--extra-index-url {space.CPU_TORCH_INDEX}" in torch_ranges.splitlines()
    with pytest.raises(UserError, match="a Space serves on one of torch, onnx"):
        space.serving_requirements(tmp_path / "requirements.txt", runtime="jax")


def test_an_export_that_answers_unlike_torch_is_not_deployed(bundles, tmp_path, monkeypatch):
    import classifier.export

    checked = []

    def disagreeing(bundle, path, images):
        checked.append(len(images))
        return {"images": len(images), "runtime_top1_agreement": 0.5, "runtime_max_abs_diff": 0.3}

    monkeypatch.setattr(classifier.export, "verify_onnx", disagreeing)
    thumbnails = bundles[0] / "eval" / "mistakes"  # the test images a bundle's evaluation keeps
    thumbnails.mkdir(parents=True, exist_ok=True)
    for number in range(3):
        Image.new("RGB", (32, 32), (number * 80, 0, 0)).save(thumbnails / f"x{number}.png")
    with pytest.raises(BundleError, match="ONNX export answers unlike torch.*top-1 agreement 50.0%.*not deploying"):
        space.stage_space(bundles[:1], tmp_path / "staging", "alice/shapes-demo", runtime="onnx")
    assert checked and 0 < checked[0] <= space.EXPORT_CHECK_IMAGES  # the bundle's own test thumbnails
