"""Deploying the demo app to a Hugging Face Space: its files staged in a folder, then uploaded.

    files = stage_space(["runs/x/bundle"], "staging/", "alice/cifar10-demo")
    deploy_space("alice/cifar10-demo", ["runs/x/bundle"])   # create_repo(space) + upload_folder

A Space runs app.py from its repository root, so the staging folder is this repository's serving
part laid out as the app expects it (classifier.app_logic's MODELS_DIR and EXAMPLES_DIR):

    README.md           the Space's card: front matter (sdk gradio at this gradio's version, ...)
    .gitattributes      weights, ONNX models and images travel by LFS
    requirements.txt    what serving needs: locks/space-RUNTIME.txt (tools/lock.py) where it was made
                        from the current requirements, else the ranges of this repository's requirements.txt
    app.py, classifier/ the app and the library (no __pycache__)
    assets/models/NAME  each chosen bundle's own files (bundle.BUNDLE_PATTERNS, never a pickle); with
                        runtime "onnx" its model.onnx (exported here if it has none) instead of the weights
    assets/examples/    the example photos the app offers

Runtime "torch" installs torch's CPU build (the Space has no GPU); runtime "onnx" installs onnxruntime
and no torch at all, and the app, on runtime auto, serves each bundle's model.onnx (classifier.serving).

The token comes from huggingface_hub's usual sources and never appears in a message (classifier.hub).
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml
from huggingface_hub import HfApi

from classifier import app_logic
from classifier.bundle import CARD_FILE, WEIGHTS_FILE, Bundle, load_bundle
from classifier.errors import BundleError, HubError, UserError
from classifier.hub import describe_failure, repo_url, upload_blocker, validate_repo_id
from classifier.model_card import base_model_id
from classifier.onnx_runtime import INFO_FILE, ONNX_FILE
from classifier.publish import accuracy_note, files_to_upload
from classifier.run import RUN_BUNDLE_DIR

REPO_ROOT = app_logic.REPO_ROOT
APP_FILE = "app.py"
PACKAGE = "classifier"
MODELS_DIR = app_logic.MODELS_DIR.relative_to(REPO_ROOT).as_posix()  # where the app looks for bundles
EXAMPLES_DIR = app_logic.EXAMPLES_DIR.relative_to(REPO_ROOT).as_posix()
REQUIREMENTS_FILE = "requirements.txt"
ATTRIBUTES_FILE = ".gitattributes"
# Binary files go by LFS: the Hub refuses large files in plain git, and diffs of them mean nothing.
LFS_PATTERNS = ("*.safetensors", "*.onnx", "*.png", "*.jpg")
# What `app.py` imports (tests/test_house.py keeps matplotlib and optuna out of serving). Not gradio:
# a Space installs the gradio of its sdk_version itself, and a second pin could only disagree with it.
SERVING_PACKAGES = ("torch", "torchvision", "timm", "safetensors", "huggingface_hub", "filelock", "pillow",
                    "numpy", "tqdm", "pyyaml", "pandas")
# Serving model.onnx files: what app.py, classifier.app_logic and classifier.onnx_runtime import
# when torch is absent (tests/test_serving.py runs them so), and no torch, torchvision or timm.
ONNX_SERVING_PACKAGES = ("onnxruntime", "numpy", "pillow", "huggingface_hub", "pandas")
RUNTIMES = ("torch", "onnx")
# torch's CPU-only wheels: a Space has no GPU, and PyPI's default torch pulls about 3 GB of CUDA
# libraries (15 nvidia-* wheels and triton). pip takes the highest version over both indexes, and
# "2.14.1+cpu" sorts above PyPI's "2.14.1", so the CPU build wins wherever the index answers.
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# A model.onnx exported while staging is checked against torch on this many of the bundle's test
# thumbnails (eval/mistakes/; a few seconds), and refused beyond this probability difference or on any
# other top class: exports differ from torch by about 3e-6 (tests/test_export.py allows 1e-4).
EXPORT_CHECK_IMAGES = 32
EXPORT_TOLERANCE = 1e-4
LOCK_DIR = "locks"  # tools/lock.py writes locks/space-RUNTIME.txt there
LOCK_DIGEST = re.compile(r"^# from requirements sha256 ([0-9a-f]{64})$", re.MULTILINE)
# Remote folders a deploy replaces wholesale, so a model dropped from the list leaves the Space.
REPLACED_ON_DEPLOY = [f"{MODELS_DIR}/**", f"{EXAMPLES_DIR}/**", f"{PACKAGE}/**"]
_JUNK = shutil.ignore_patterns("__pycache__", "*.pyc", "*.tmp")


def cpu_index_answers(timeout: float = 10) -> bool:
    """Whether PyTorch's CPU index can be reached from here (tools/lock.py and
    benchmarks/space_install.py fall back to PyPI, and say so, where it cannot)."""
    try:
        with urllib.request.urlopen(f"{CPU_TORCH_INDEX}/torch/", timeout=timeout) as reply:
            return reply.status == 200
    except OSError:
        return False


@dataclass
class DeployResult:
    space_id: str
    files: list[tuple[str, int]]  # (path in the Space, size in bytes), sorted
    commit_url: str | None  # None for a dry run
    requirements: str = ""  # where the Space's requirements.txt came from (a lock, or the ranges)

    @property
    def url(self) -> str:
        return repo_url(self.space_id, repo_type="space")


def model_name(bundle_dir: Path) -> str:
    """The bundle's folder name in the Space: its own, or its run's for a run's `bundle/` folder
    (runs/cifar-lite0/bundle -> cifar-lite0), since train writes every bundle as OUT/bundle."""
    path = bundle_dir.resolve()
    return path.parent.name if path.name == RUN_BUNDLE_DIR else path.name


def chosen_bundles(bundles: Sequence[str | os.PathLike] | None) -> dict[str, Bundle]:
    """{name in the Space: bundle}, each loaded (so it loads); the shipped bundles when none are given."""
    paths = [Path(b) for b in bundles] if bundles else [Path(p) for p in app_logic.find_bundles().values()]
    if not paths:
        raise BundleError(f"no bundles to deploy: pass --model BUNDLE (none in {app_logic.MODELS_DIR})")
    chosen: dict[str, Bundle] = {}
    for path in paths:
        if not path.is_dir():  # checked first: load_bundle would take "runs/x" for a Hub id
            raise BundleError(f"{path}: no such bundle folder")
        name = model_name(path)
        if name in chosen:
            raise BundleError(f"{chosen[name].path} and {path} would both be {MODELS_DIR}/{name} in the Space; "
                              "rename one of the folders")
        chosen[name] = load_bundle(path)  # never deploy a bundle that does not load
    return chosen


def serving_requirements(requirements: Path = REPO_ROOT / REQUIREMENTS_FILE, runtime: str = "torch") -> str:
    """requirements.txt of the Space, as ranges: this repository's lines for the packages serving on
    `runtime` imports (SERVING_PACKAGES or ONNX_SERVING_PACKAGES), pins and all."""
    if runtime not in RUNTIMES:
        raise UserError(f"runtime {runtime!r}: a Space serves on one of {', '.join(RUNTIMES)}")
    wanted = {_canonical(name) for name in (SERVING_PACKAGES if runtime == "torch" else ONNX_SERVING_PACKAGES)}
    lines = [line.split("#")[0].strip() for line in requirements.read_text().splitlines()]
    kept = [line for line in lines if line and _canonical(line) in wanted]
    missing = wanted - {_canonical(line) for line in kept}
    if missing:  # a package the app imports must be pinned where the project pins everything
        raise UserError(f"{requirements} does not list {sorted(missing)}, which the app needs")
    header = ["# Serving the demo app only (no training, search or plotting packages).",
              "# gradio is not here: the Space installs the sdk_version of README.md."]
    if runtime == "torch":
        header += ["# torch's CPU build, not PyPI's CUDA one: a Space has no GPU.", f"--extra-index-url {CPU_TORCH_INDEX}"]
    else:
        header += ["# The bundles' model.onnx on onnxruntime: no torch."]
    return "\n".join(header + kept) + "\n"


def requirements_digest(text: str) -> str:
    """What a lock records of the requirements it was made from, so that deploy can tell a stale one."""
    return hashlib.sha256(text.encode()).hexdigest()


def lock_file(runtime: str, repo_root: Path = REPO_ROOT) -> Path:
    return repo_root / LOCK_DIR / f"space-{runtime}.txt"


def space_requirements(runtime: str, repo_root: Path = REPO_ROOT) -> tuple[str, str]:
    """(requirements.txt of the Space, where it came from): the lock tools/lock.py made for `runtime`
    when it was made from the current requirements (every package pinned, so the Space builds the
    same way twice), else the ranges of serving_requirements."""
    ranges = serving_requirements(repo_root / REQUIREMENTS_FILE, runtime)
    lock = lock_file(runtime, repo_root)
    if not lock.is_file():
        return ranges, f"ranges of {REQUIREMENTS_FILE} (no {LOCK_DIR}/{lock.name}: run tools/lock.py)"
    text = lock.read_text()
    recorded = LOCK_DIGEST.search(text)
    if not recorded or recorded.group(1) != requirements_digest(ranges):
        return ranges, (f"ranges of {REQUIREMENTS_FILE}: {LOCK_DIR}/{lock.name} was made from other requirements; "
                        f"run tools/lock.py to renew it")
    return text, f"{LOCK_DIR}/{lock.name}"


def _canonical(requirement: str) -> str:
    """The package a requirement line names, normalised as pip compares names (PEP 503)."""
    name = re.split(r"[<>=!~\[;@ ]", requirement, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def space_card(space_id: str, loaded: dict[str, Bundle]) -> str:
    """README.md of the Space: the configuration the Hub reads from its front matter, and a line per model."""
    try:
        import gradio  # the app's own: the Space runs the gradio it was tested with
    except ImportError:
        raise UserError("deploying needs gradio installed here (its version becomes the Space's "
                        "sdk_version): pip install -r requirements.txt") from None

    bases = sorted({base for b in loaded.values() if (base := base_model_id(b.config))})
    meta = {"title": space_id.split("/")[1], "sdk": "gradio", "sdk_version": gradio.__version__,
            "python_version": ".".join(platform.python_version_tuple()[:2]), "app_file": APP_FILE,
            "pinned": False}
    if bases:  # Hub ids only: the Space page links them (the bundles themselves live in the Space)
        meta["models"] = bases
    lines = [f"# {meta['title']}", "", "Image classification demo. Models:", ""]
    for name, bundle in loaded.items():
        note = accuracy_note(bundle)
        lines.append(f"- `{name}`: {bundle.architecture}, {len(bundle.label_names)} classes"
                     + (f", {note}" if note else ""))
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + "\n".join(lines) + "\n"


def stage_space(bundles: Sequence[str | os.PathLike] | None, staging: str | os.PathLike, space_id: str,
                repo_root: Path = REPO_ROOT, runtime: str = "torch") -> list[tuple[str, int]]:
    """Write the Space's files into `staging` (absent or empty); returns (path, size) for each, sorted."""
    requirements, _ = space_requirements(runtime, repo_root)  # first: an unknown runtime stages nothing
    space_id = validate_repo_id(space_id)
    chosen = chosen_bundles(bundles)
    staging = Path(staging)
    if staging.exists() and any(staging.iterdir()):
        raise BundleError(f"{staging}: the staging folder must be empty")
    staging.mkdir(parents=True, exist_ok=True)
    shutil.copy2(repo_root / APP_FILE, staging / APP_FILE)
    shutil.copytree(repo_root / PACKAGE, staging / PACKAGE, ignore=_JUNK)
    if (repo_root / EXAMPLES_DIR).is_dir():
        shutil.copytree(repo_root / EXAMPLES_DIR, staging / EXAMPLES_DIR, ignore=_JUNK)
    for name, bundle in chosen.items():
        stage_bundle(bundle, staging / MODELS_DIR / name, runtime)
    (staging / CARD_FILE).write_text(space_card(space_id, chosen), encoding="utf-8")
    (staging / ATTRIBUTES_FILE).write_text("".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n"
                                                   for p in LFS_PATTERNS))
    (staging / REQUIREMENTS_FILE).write_text(requirements)
    return staged_files(staging)


def stage_bundle(bundle: Bundle, target: Path, runtime: str) -> None:
    """The bundle's files the Space serves from (files_to_upload), less what its runtime never reads:
    on "torch" the ONNX files, on "onnx" the weights, with model.onnx exported into `target` where
    the bundle has none."""
    unused = {WEIGHTS_FILE} if runtime == "onnx" else {ONNX_FILE, INFO_FILE}  # what the other runtime reads
    files = [f for f in files_to_upload(bundle.path) if f not in unused]
    for file in files:
        (target / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(bundle.path / file, target / file)
    if runtime == "onnx" and not (bundle.path / ONNX_FILE).is_file():
        # torch's exporter, imported only when a bundle needs it
        from classifier.export import bundle_sample_images, export_onnx, verify_onnx

        path = export_onnx(bundle, target / ONNX_FILE)
        images = bundle_sample_images(bundle, EXPORT_CHECK_IMAGES)
        check = verify_onnx(bundle, path, images) if images else None
        if check and (check["runtime_top1_agreement"] < 1.0 or check["runtime_max_abs_diff"] > EXPORT_TOLERANCE):
            raise BundleError(f"{bundle.path}: its ONNX export answers unlike torch on {check['images']} of its test "
                              f"images (top-1 agreement {check['runtime_top1_agreement']:.1%}, largest probability "
                              f"difference {check['runtime_max_abs_diff']:.1e}); not deploying it")


def staged_files(staging: Path) -> list[tuple[str, int]]:
    return sorted((p.relative_to(staging).as_posix(), p.stat().st_size) for p in staging.rglob("*") if p.is_file())


def upload_space(space_id: str, staging: Path, *, private: bool = False, commit_message: str | None = None) -> str:
    """Create the Space if needed and upload `staging` to it; returns the commit's URL."""
    problem = upload_blocker()
    if problem:
        raise HubError(f"cannot deploy to {space_id}: {problem}")
    failure: BaseException | None = None
    try:
        api = HfApi()
        api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=True if private else None,
                        exist_ok=True)
        info = api.upload_folder(repo_id=space_id, repo_type="space", folder_path=staging,
                                 commit_message=commit_message or "Deploy the classifier demo",
                                 delete_patterns=list(REPLACED_ON_DEPLOY))
    except Exception as exc:  # noqa: BLE001  (any failure here must end as the same clear message)
        failure = exc
    if failure is not None:
        # Raised outside the handler: the Hub's exception holds the request, Authorization header included.
        raise HubError(f"deploy to {space_id} failed: {describe_failure(failure)}")
    return getattr(info, "commit_url", str(info))


def deploy_space(space_id: str, bundles: Sequence[str | os.PathLike] | None, staging: str | os.PathLike, *,
                 dry_run: bool = False, private: bool = False, commit_message: str | None = None,
                 runtime: str = "torch") -> DeployResult:
    """Stage the Space in `staging` and, unless `dry_run`, upload it."""
    space_id = validate_repo_id(space_id)
    files = stage_space(bundles, staging, space_id, runtime=runtime)
    commit_url = None if dry_run else upload_space(space_id, Path(staging), private=private,
                                                   commit_message=commit_message)
    return DeployResult(space_id, files, commit_url, space_requirements(runtime)[1])
