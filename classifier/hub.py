"""The Hugging Face Hub: push a bundle with its model card, pull one back.

    python -m classifier.hub push runs/x/bundle owner/name [--private] [--revision BRANCH] [--message MSG]
    python -m classifier.hub pull owner/name [--revision R]

Only the bundle's own files go up (BUNDLE_PATTERNS): the weights as safetensors, config.json,
README.md and eval/. Checkpoints such as last.pt are pickles, which run code when loaded, and never
leave the machine, even when someone drops one into the bundle folder.

The token is found by huggingface_hub itself (HF_TOKEN, or the login stored by `hf auth login`).
This module reads it only to strike it out of error messages: a token never appears in anything
printed, logged, written or raised here. Hub errors are re-raised as HubError without chaining,
because huggingface_hub's HTTP errors keep the request, and with it the Authorization header.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

BUNDLE_PATTERNS = ["config.json", "model.safetensors", "README.md", "eval/*", "eval/**"]
# Never uploaded, even inside eval/: pickled checkpoints and half-written files.
NEVER_UPLOAD = ["*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.bin", "*.tmp", "*.partial"]
# Remote files a push replaces wholesale, so that a re-push leaves no stale mistakes/NNNN.png behind.
REPLACED_ON_PUSH = ["eval/*"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# What Hugging Face user tokens look like, struck out even where the current token is not known.
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{10,}")


class HubError(RuntimeError):
    """A Hub operation that failed, worded for the user; never contains a token."""


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit_url: str
    files: list[str]

    @property
    def url(self) -> str:
        from huggingface_hub import constants

        tree = "" if self.revision == "main" else f"/tree/{self.revision}"
        return f"{constants.ENDPOINT}/{self.repo_id}{tree}"


def validate_repo_id(repo_id: str) -> str:
    """'owner/name' (an 'hf-hub:' prefix is dropped); a clear HubError for anything else."""
    bare = str(repo_id).removeprefix("hf-hub:")
    if not _REPO_ID.match(bare) or ".." in bare or bare.endswith((".git", "-", ".")):
        raise HubError(f"'{repo_id}' is not a Hub model id: expected OWNER/NAME, e.g. alice/cifar10-fast-cnn "
                       "(letters, digits, '-', '_' and '.')")
    return bare


def files_to_upload(bundle_dir: str | os.PathLike) -> list[str]:
    """The bundle's files, relative and sorted, exactly as push_bundle would upload them."""
    from huggingface_hub.utils import filter_repo_objects

    root = Path(bundle_dir)
    relative = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return list(filter_repo_objects(relative, allow_patterns=BUNDLE_PATTERNS, ignore_patterns=_ignore_patterns()))


def push_bundle(bundle_dir: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None) -> PushResult:
    """Upload a saved bundle (validated first) to the model repository `repo_id`, creating it if needed.

    `revision` names a branch, created from main if it does not exist. The model card is
    regenerated for `repo_id` unless it was edited by hand. Raises HubError (the local bundle is
    never touched beyond its README.md) or BundleError for a bundle that is not complete.
    """
    from classifier.bundle import BundleError, load_bundle
    from classifier.model_card import CARD_FILE, is_generated, write_model_card

    repo_id = validate_repo_id(repo_id)
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():  # checked first: load_bundle would take "runs/x" for a Hub id
        raise BundleError(f"{bundle_dir}: no such bundle folder")
    bundle = load_bundle(bundle_dir)  # never publish a bundle that does not load
    if is_generated(bundle_dir / CARD_FILE):
        write_model_card(bundle_dir, repo_id)
    files = files_to_upload(bundle_dir)
    branch = revision or "main"
    retry = _retry_command(bundle_dir, repo_id, private, revision)
    problem = push_blocker()
    if problem:
        raise HubError(_intact(f"cannot push {bundle_dir} to {repo_id}: {problem}", bundle_dir, retry))

    from huggingface_hub import HfApi

    api = HfApi()
    failure: BaseException | None = None
    try:
        api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=bundle_dir, revision=branch,
                                 commit_message=commit_message or default_commit_message(bundle),
                                 allow_patterns=list(BUNDLE_PATTERNS), ignore_patterns=_ignore_patterns(),
                                 delete_patterns=list(REPLACED_ON_PUSH))
    except Exception as exc:  # noqa: BLE001  (any failure here must end as the same clear message)
        failure = exc
    if failure is not None:
        # Raised outside the handler, so the Hub's exception (which holds the request and its
        # Authorization header) is neither the cause nor the context of ours.
        raise HubError(_intact(f"push of {bundle_dir} to {repo_id} failed: {describe_failure(failure)}",
                               bundle_dir, retry))
    return PushResult(repo_id, branch, getattr(info, "commit_url", str(info)), files)


def push_blocker() -> str | None:
    """Why a push cannot even start (offline mode, no token), or None; needs no network."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set, so nothing can be uploaded (unset it to push)"
    if _current_token() is None:
        return ("no Hugging Face token: set HF_TOKEN to a token with write access, or log in once "
                "with `hf auth login`")
    return None


def accuracy_note(bundle) -> str:
    """ "test accuracy 0.9278" from the bundle's measured metrics, or "" when it has none."""
    metrics = bundle.project.get("metrics") or {}
    return f"test accuracy {metrics['accuracy']:.4f}" if "accuracy" in metrics else ""


def default_commit_message(bundle) -> str:
    """The commit message of a push of `bundle` (a classifier.bundle.Bundle)."""
    score = accuracy_note(bundle)
    return (f"Upload {bundle.architecture} trained on {bundle.project.get('dataset', 'custom data')}"
            + (f": {score}" if score else ""))


def describe_failure(exc: BaseException) -> str:
    """One readable line for a failed Hub call, with any token struck out."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    if isinstance(exc, OfflineModeIsEnabled):
        text = "HF_HUB_OFFLINE is set, so the Hub cannot be reached"
    elif isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        detail = f" ({exc.server_message.strip()[:300]})" if exc.server_message else ""
        if status == 401:
            text = f"the Hub rejected the token (401){detail}; log in again or set HF_TOKEN"
        elif status == 403:
            text = f"the token may not write to this repository (403){detail}; it needs write access"
        elif isinstance(exc, RepositoryNotFoundError):
            text = f"repository not found ({status}){detail}"
        else:
            text = f"the Hub answered {status}{detail}"
        request_id = getattr(exc, "request_id", None)
        if request_id:
            text += f" [request id {request_id}]"
    elif _is_connection_error(exc):
        from huggingface_hub import constants

        text = f"cannot reach {constants.ENDPOINT} ({type(exc).__name__}); check the network"
    else:
        text = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
    return redact(text)


def redact(text: str) -> str:
    """`text` with the current token, and anything shaped like a token, struck out."""
    token = _current_token()
    if token:
        text = text.replace(token, "***")
    return _TOKEN_LIKE.sub("hf_***", text)


def download_bundle(repo_id: str, revision: str | None = None) -> Path:
    """Download (or find in the local cache, which is all HF_HUB_OFFLINE=1 allows) the bundle
    files of `repo_id` at `revision`; returns the folder."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id = validate_repo_id(repo_id)
    at = f" at revision {revision}" if revision else ""
    failure: BaseException | None = None
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=BUNDLE_PATTERNS))
    except Exception as exc:  # noqa: BLE001  (mapped to one message below, raised outside the handler)
        failure = exc
    if isinstance(failure, LocalEntryNotFoundError):
        how = ("HF_HUB_OFFLINE is set and it is not in the local cache" if constants.is_offline_mode()
               else "the Hub cannot be reached and it is not in the local cache")
        raise HubError(f"cannot download {repo_id}{at}: {how} ({constants.HF_HUB_CACHE})")
    if isinstance(failure, RevisionNotFoundError):
        raise HubError(f"{repo_id} has no revision '{revision}' on the Hub")
    if isinstance(failure, RepositoryNotFoundError):
        raise HubError(f"{repo_id}: no such model repository on the Hub (or it is private and the token "
                       "cannot read it)")
    raise HubError(f"cannot download {repo_id}{at}: {describe_failure(failure)}")


# ----------------------------------------------------------------------------------------------


def _ignore_patterns() -> list[str]:
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS

    return [*NEVER_UPLOAD, *DEFAULT_IGNORE_PATTERNS]


def _current_token() -> str | None:
    from huggingface_hub import get_token

    try:
        return get_token()
    except Exception:  # noqa: BLE001  (an unreadable token store means: no token)
        return None


def _is_connection_error(exc: BaseException) -> bool:
    # huggingface_hub's HTTP client (httpx/httpx2/requests by version) has its own connection
    # errors; their names say what they are without importing any of them.
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"ConnectError", "ConnectTimeout", "TimeoutException", "NetworkError", "TransportError",
                         "ConnectionError"})


def _retry_command(bundle_dir: Path, repo_id: str, private: bool, revision: str | None) -> str:
    extra = (" --private" if private else "") + (f" --revision {revision}" if revision else "")
    return f"python -m classifier.hub push {bundle_dir} {repo_id}{extra}"


def _intact(message: str, bundle_dir: Path, retry: str) -> str:
    return f"{message}. The local bundle at {bundle_dir} is intact; push it again with: {retry}"


# ----------------------------------------------------------------------------------------------
# Command line (python -m classifier.hub): the one place in this module that prints.


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m classifier.hub", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    push = commands.add_parser("push", help="upload a saved bundle folder to a Hub model repository")
    push.add_argument("bundle", help="the bundle folder, e.g. runs/x/bundle")
    push.add_argument("repo_id", metavar="OWNER/NAME")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", default=None, help="branch to push to (created from main if missing)")
    push.add_argument("--message", default=None, help="commit message (default: architecture, data, accuracy)")
    pull = commands.add_parser("pull", help="download a bundle into the Hub cache, validate it, print its path")
    pull.add_argument("repo_id", metavar="OWNER/NAME")
    pull.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    args = parser.parse_args(argv)

    from classifier.bundle import BundleError, load_bundle

    try:
        if args.command == "push":
            result = push_bundle(args.bundle, args.repo_id, private=args.private, revision=args.revision,
                                 commit_message=args.message)
            print(f"pushed {len(result.files)} files to {result.url}")
            print(f"commit: {result.commit_url}")
        else:
            bundle = load_bundle(f"hf-hub:{validate_repo_id(args.repo_id)}", revision=args.revision)
            score = accuracy_note(bundle)
            print(f"{bundle.architecture}: {len(bundle.label_names)} classes" + (f", {score}" if score else ""))
            print(bundle.path)
    except (HubError, BundleError) as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
