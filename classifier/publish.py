"""Publishing: push a bundle with its model card to a Hub model repository.

Only the bundle's own files go up (bundle.BUNDLE_PATTERNS): the weights as safetensors,
config.json, README.md and eval/. Checkpoints such as last.pt are pickles, which run code when
loaded, and never leave the machine, even when someone drops one into the bundle folder. Every
failure is a HubError that says the local bundle is intact and gives the command to retry; no
message ever holds the token (classifier.hub).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from classifier.bundle import BUNDLE_PATTERNS, CARD_FILE, EVAL_DIR, Bundle, load_bundle
from classifier.errors import BundleError, HubError
from classifier.hub import describe_failure, repo_url, upload_blocker, validate_repo_id
from classifier.model_card import is_generated, write_model_card

# Never uploaded, even inside eval/: pickled checkpoints and half-written files.
NEVER_UPLOAD = ["*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.bin", "*.tmp", "*.partial"]
# Remote files a push replaces wholesale, so that a re-push leaves no stale mistakes/NNNN.png behind.
REPLACED_ON_PUSH = [f"{EVAL_DIR}/*"]


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit_url: str
    files: list[str]

    @property
    def url(self) -> str:
        return repo_url(self.repo_id, self.revision)


def ignore_patterns() -> list[str]:
    return [*NEVER_UPLOAD, *DEFAULT_IGNORE_PATTERNS]


def files_to_upload(bundle_dir: str | os.PathLike) -> list[str]:
    """The bundle's files, relative and sorted, exactly as push_bundle would upload them."""
    root = Path(bundle_dir)
    relative = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return list(filter_repo_objects(relative, allow_patterns=BUNDLE_PATTERNS, ignore_patterns=ignore_patterns()))


def push_bundle(bundle_dir: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, token: str | None = None) -> PushResult:
    """Upload a saved bundle (validated first) to the model repository `repo_id`, creating it if needed.

    `revision` names a branch, created from main if it does not exist. The model card is
    regenerated for `repo_id` unless it was edited by hand. Raises HubError (the local bundle is
    never touched beyond its README.md) or BundleError for a bundle that is not complete.
    `token`: a token given for this push (the app's password field); by default huggingface_hub's
    own (HF_TOKEN or the stored login). It is never part of a message.
    """
    repo_id = validate_repo_id(repo_id)
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():  # checked first: load_bundle would take "runs/x" for a Hub id
        raise BundleError(f"{bundle_dir}: no such bundle folder")
    bundle = load_bundle(bundle_dir)  # never publish a bundle that does not load
    if is_generated(bundle_dir / CARD_FILE):
        write_model_card(bundle_dir, repo_id)
    files = files_to_upload(bundle_dir)
    branch = revision or "main"
    retry = retry_command(bundle_dir, repo_id, private, revision)
    problem = upload_blocker(token)
    if problem:
        raise HubError(_intact(f"cannot push {bundle_dir} to {repo_id}: {problem}", bundle_dir, retry))

    api = HfApi(token=token or None)
    failure: BaseException | None = None
    try:
        api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=bundle_dir, revision=branch,
                                 commit_message=commit_message or default_commit_message(bundle),
                                 allow_patterns=list(BUNDLE_PATTERNS), ignore_patterns=ignore_patterns(),
                                 delete_patterns=list(REPLACED_ON_PUSH))
    except Exception as exc:  # noqa: BLE001  (any failure here must end as the same clear message)
        failure = exc
    if failure is not None:
        # Raised outside the handler, so the Hub's exception (which holds the request and its
        # Authorization header) is neither the cause nor the context of ours.
        raise HubError(_intact(f"push of {bundle_dir} to {repo_id} failed: {describe_failure(failure, token)}",
                               bundle_dir, retry))
    return PushResult(repo_id, branch, getattr(info, "commit_url", str(info)), files)


def accuracy_note(bundle: Bundle) -> str:
    """ "test accuracy 0.9278" from the bundle's measured metrics, or "" when it has none."""
    metrics = bundle.project.get("metrics") or {}
    return f"test accuracy {metrics['accuracy']:.4f}" if "accuracy" in metrics else ""


def default_commit_message(bundle: Bundle) -> str:
    """The commit message of a push of `bundle`."""
    score = accuracy_note(bundle)
    return (f"Upload {bundle.architecture} trained on {bundle.project.get('dataset', 'custom data')}"
            + (f": {score}" if score else ""))


def retry_command(bundle_dir: Path, repo_id: str, private: bool, revision: str | None) -> str:
    extra = (" --private" if private else "") + (f" --revision {revision}" if revision else "")
    return f"python -m classifier push {bundle_dir} {repo_id}{extra}"


def _intact(message: str, bundle_dir: Path, retry: str) -> str:
    return f"{message}. The local bundle at {bundle_dir} is intact; push it again with: {retry}"
