"""Writing files so that nothing is lost: whole or not at all, readable as other files are, and a
full disk or a read-only folder said in one line with the path and what to do.

Every file that a later run, the app or another user reads (checkpoints, weights, config.json, the
decoded-image cache) is written by `atomic_write`: into a private temporary file beside it, then
moved over the old one in one rename, so a crash, a kill or a full disk leaves the previous file
whole. The temporary file is created with the mode any new file gets (0666 less the umask) and the
file keeps it: safetensors writes 0600 whatever the umask, which made shared bundles unreadable.

Libraries report a full disk in their own ways: torch.save raises a RuntimeError whose context is
the OSError, safetensors a SafetensorError that ends in "(os error 28)". `storage_error` finds the
operating system's error in either and words it for the user.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from classifier.errors import StorageError

_OS_ERROR_IN_MESSAGE = re.compile(r"os error (\d+)")  # how Rust (safetensors) reports an OSError
FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def os_error_of(exc: BaseException) -> OSError | None:
    """The operating system's error behind `exc`: itself, one it was raised from or during, or
    one its message names (safetensors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        match = _OS_ERROR_IN_MESSAGE.search(str(exc))
        if match:
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
        exc = exc.__cause__ or exc.__context__
    return None


def storage_error(exc: BaseException, path: str | os.PathLike, what: str, remedy: str = "") -> StorageError | None:
    """`exc` as a StorageError naming `path` (`what` it is) and the remedy; None when no operating
    system error lies behind it (a bug, whose traceback is worth seeing)."""
    error = os_error_of(exc)
    if error is None:
        return None
    remedy = f"; {remedy}" if remedy else ""
    if error.errno in FULL:
        return StorageError(f"no space left on the device to write {path} ({what}): free some space{remedy}")
    if error.errno in NOT_WRITABLE:
        return StorageError(f"cannot write {path} ({what}): {error.strerror}; check the folder's permissions, "
                            f"or write somewhere else{remedy}")
    return StorageError(f"could not write {path} ({what}): {error.strerror}{remedy}")


@contextlib.contextmanager
def mapped_errors(path: str | os.PathLike, what: str, remedy: str = "") -> Iterator[None]:
    """Operating-system errors inside (a full disk, a read-only folder) as StorageErrors naming `path`."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        error = storage_error(exc, path, what, remedy)
        if error is None:
            raise
        raise error from exc


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], what: str, remedy: str = "") -> Path:
    """`write(tmp)` writes the file at a temporary path beside `path`, which then replaces `path` whole.

    On any failure the temporary file is removed and `path` is left as it was; a full disk or a
    read-only folder becomes a StorageError saying `what` the file is and the `remedy`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        # O_EXCL: a fresh file of our own; 0o666 less the umask: the mode open() gives any new file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        error = storage_error(exc, path, what, remedy) if isinstance(exc, Exception) else None
        if error is None:
            raise
        raise error from exc
    return path


def save_torch(obj, path: str | os.PathLike, what: str, remedy: str = "") -> Path:
    """torch.save, atomically. Through a Python file, whose OSError torch keeps as the context of its own."""
    import torch  # here, not at the top: bundle.py reads configs through this module where torch is absent

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    return atomic_write(path, write, what, remedy)


def save_safetensors(tensors: dict, path: str | os.PathLike, what: str, remedy: str = "",
                     metadata: dict | None = None) -> Path:
    """safetensors' save_file, atomically, with the mode other files get."""
    import safetensors.torch  # as in save_torch: writing weights is the only use of torch here

    return atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=metadata),
                        what, remedy)


def write_text(path: str | os.PathLike, text: str, what: str, remedy: str = "") -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), what, remedy)


def check_output_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """Make the folder `path` (given as `option`) or find it, and make sure files can be written in it:
    before hours of training, not after the first epoch."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise StorageError(f"{option} {path} is a file, not a folder; choose another {option}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except FileExistsError as exc:  # a file where one of its parent folders should be
        raise StorageError(f"{option} {path}: {exc.filename} is a file, not a folder; choose another {option}") from None
    except OSError as exc:
        where = exc.filename or path
        raise StorageError(f"{option} {path} is not writable ({exc.strerror}: {where}); choose another {option}, "
                           f"or fix the folder's permissions") from None
    return path
