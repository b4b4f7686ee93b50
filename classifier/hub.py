"""The Hugging Face Hub, at its lowest: repository ids, downloads, and errors that never hold a token.

What to download or upload is the caller's business (classifier.bundle says what a bundle is,
classifier.publish pushes one); this module only talks to the Hub.

The token is found by huggingface_hub itself (HF_TOKEN, or the login stored by `hf auth login`).
This module reads it only to strike it out of error messages: a token never appears in anything
printed, logged, written or raised here. Hub errors are re-raised as HubError without chaining,
because huggingface_hub's HTTP errors keep the request, and with it the Authorization header.
"""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import constants, get_token, snapshot_download
from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                    RepositoryNotFoundError, RevisionNotFoundError)

from classifier.errors import HubError

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# What Hugging Face user tokens look like, struck out even where the current token is not known.
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{10,}")


def validate_repo_id(repo_id: str) -> str:
    """'owner/name' (an 'hf-hub:' prefix is dropped); a clear HubError for anything else."""
    bare = str(repo_id).removeprefix("hf-hub:")
    if not _REPO_ID.match(bare) or ".." in bare or bare.endswith((".git", "-", ".")):
        raise HubError(f"'{repo_id}' is not a Hub id: expected OWNER/NAME, e.g. alice/cifar10-fast-cnn "
                       "(letters, digits, '-', '_' and '.')")
    return bare


def repo_url(repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
    prefix = "" if repo_type == "model" else f"{repo_type}s/"
    tree = "" if revision == "main" else f"/tree/{revision}"
    return f"{constants.ENDPOINT}/{prefix}{repo_id}{tree}"


def upload_blocker(token: str | None = None) -> str | None:
    """Why an upload cannot even start (offline mode, no token), or None; needs no network.
    `token`: one given for this upload (the app's token field) rather than the machine's login."""
    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set, so nothing can be uploaded (unset it to push)"
    if not token and current_token() is None:
        return ("no Hugging Face token: set HF_TOKEN to a token with write access, or log in once "
                "with `hf auth login`")
    return None


def describe_failure(exc: BaseException, token: str | None = None) -> str:
    """One readable line for a failed Hub call, with any token (and `token`) struck out."""
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
        text = f"cannot reach {constants.ENDPOINT} ({type(exc).__name__}); check the network"
    else:
        text = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
    return redact(text, token)


def redact(text: str, token: str | None = None) -> str:
    """`text` with the current token, `token`, and anything shaped like a token, struck out."""
    for secret in (current_token(), token):
        if secret:
            text = text.replace(secret, "***")
    return _TOKEN_LIKE.sub("hf_***", text)


def download(repo_id: str, revision: str | None = None, allow_patterns: list[str] | None = None) -> Path:
    """Download (or find in the local cache, which is all HF_HUB_OFFLINE=1 allows) the files of
    the model repository `repo_id` at `revision` that match `allow_patterns`; returns the folder,
    named after the commit it holds."""
    repo_id = validate_repo_id(repo_id)
    at = f" at revision {revision}" if revision else ""
    failure: BaseException | None = None
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns))
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


def current_token() -> str | None:
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


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub answers at all (within `timeout` seconds), asked once: so that a download
    that cannot happen is refused at once rather than after a minute of retries."""
    if constants.is_offline_mode():
        return False
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # no route, no name resolution, a proxy refusing: all "not reachable"
        return False
    return True


def cached_file(repo_id: str, filenames: tuple[str, ...]) -> bool:
    """Whether one of `filenames` of the Hub repository `repo_id` is in the local cache already."""
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in filenames)
