"""The Hugging Face Hub: pull a bundle (and, see push_bundle, push one with its model card)."""

from __future__ import annotations

from pathlib import Path

BUNDLE_PATTERNS = ["config.json", "model.safetensors", "README.md", "eval/*", "eval/**"]


class HubError(RuntimeError):
    """A Hub operation that failed, worded for the user; never contains a token."""


def download_bundle(repo_id: str, revision: str | None = None) -> Path:
    """Download (or find in the local cache) the bundle files of `repo_id`; returns the folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=BUNDLE_PATTERNS))
    except LocalEntryNotFoundError as exc:
        raise HubError(f"cannot download {repo_id} from the Hugging Face Hub: no connection and "
                       f"not in the local cache (HF_HUB_OFFLINE={_offline_flag()})") from exc
    except RepositoryNotFoundError as exc:
        raise HubError(f"{repo_id}: no such model repository on the Hub (or it is private)") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise HubError(f"cannot download {repo_id} from the Hub: {type(exc).__name__}") from exc


def _offline_flag() -> str:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "0")
