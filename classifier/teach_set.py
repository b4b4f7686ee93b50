"""The images a person teaches new classes with: named classes, their files, and the limits that keep
a public app up (the app's Train tab and the `train` API endpoint).

A teaching set is a plain dict {class name: [image file, ...]} that the app keeps per browser session.
Everything that enters it is checked here as the Classify tab checks an upload (classifier.images):
a file that is no image is left out with a readable reason and the rest of the set goes on. A zip of
class folders (root/<class>/*, optionally inside one top folder) is unpacked here with the limits
written out, since Python's zipfile trusts the archive's names and sizes.

No training code here: the app imports this module at start-up, the training (classifier.teach)
only when someone trains.
"""

from __future__ import annotations

import re
from collections import Counter
import shutil
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from classifier.errors import DataError, ImageError
from classifier.images import IMAGE_EXTENSIONS, open_image

TeachingSet = dict[str, list[str]]


@dataclass(frozen=True)
class Limits:
    """What one teaching may hold, so that a shared Space stays up whoever uses it."""

    max_classes: int = 10
    max_images_per_class: int = 200
    max_images: int = 1000
    min_images_per_class: int = 2  # cross-validation needs two; ten or more make a useful model
    max_name_length: int = 40
    max_zip_entries: int = 2000
    max_zip_bytes: int = 500 * 2**20  # unpacked; a photo is a few MB, and 1,000 of them fit below this
    max_file_bytes: int = 20 * 2**20  # one image in a zip (the app refuses uploads over its own limit)


LIMITS = Limits()
# macOS zips carry __MACOSX/ and ._name resource forks, Windows Thumbs.db: never images of a class.
_JUNK = re.compile(r"(^|/)(__MACOSX|\.[^/]*|Thumbs\.db|desktop\.ini)(/|$)", re.IGNORECASE)


@dataclass
class Added:
    """What an add did: the set after it, and each file left out with its reason."""

    images: TeachingSet
    problems: list[str] = field(default_factory=list)


def class_name(name: str, limits: Limits = LIMITS) -> str:
    """A class name as typed, trimmed; refused when empty, too long or unusable as a folder name
    (the bundle's class folders and a zip's are named by it)."""
    name = " ".join(str(name or "").split())
    if not name:
        raise DataError("name the class first (for example: cat, my mug, thumbs up)")
    if len(name) > limits.max_name_length:
        raise DataError(f"a class name has at most {limits.max_name_length} characters: {name[:60]!r}")
    if name in (".", "..") or any(c in name for c in "/\\:*?\"<>|") or any(ord(c) < 32 for c in name):
        raise DataError(f"{name!r}: a class name cannot hold / \\ : * ? \" < > | (it names a folder)")
    return name


def _same_class(images: TeachingSet, name: str) -> str:
    # "Cat" and "cat" are one class to a person; keep the spelling it was first given.
    for existing in images:
        if existing.casefold() == name.casefold():
            return existing
    return name


def check_image(path: str | Path) -> None:
    """Raises ImageError (with a `problem` in plain words) for a file that is no usable image."""
    # Decoding at reduced size (Pillow's draft mode, for JPEGs) is enough to know the file is whole
    # and costs a few ms for a 12-megapixel photo instead of hundreds.
    open_image(path, min_side=64)


def describe_problem(name: str, error: ImageError) -> str:
    return f"{name}: {getattr(error, 'problem', None) or error}"


def add_images(images: TeachingSet, name: str, files: list[str | Path], limits: Limits = LIMITS) -> Added:
    """The set with `files` added to class `name` (made if new), checked one by one: unreadable
    files and those beyond the limits are left out and said, the rest are added."""
    name = _same_class(images, class_name(name, limits))
    result = {k: list(v) for k, v in images.items()}
    if name not in result and len(result) >= limits.max_classes:
        raise DataError(f"at most {limits.max_classes} classes can be taught at once; clear one to add {name!r}")
    kept = result.setdefault(name, [])
    problems = []
    for file in files:
        path = Path(file)
        shown = path.name
        if len(kept) >= limits.max_images_per_class:
            problems.append(f"{shown}: class {name!r} is full ({limits.max_images_per_class} images at most)")
            continue
        if sum(map(len, result.values())) >= limits.max_images:
            problems.append(f"{shown}: the set is full ({limits.max_images} images at most)")
            continue
        try:
            check_image(path)
        except ImageError as exc:
            problems.append(describe_problem(shown, exc))
            continue
        kept.append(str(path))
    if not kept:
        del result[name]
    return Added(result, problems)


def clear_class(images: TeachingSet, name: str) -> TeachingSet:
    return {k: list(v) for k, v in images.items() if k != name}


def summary_rows(images: TeachingSet, limits: Limits = LIMITS) -> list[list]:
    """[class, images, what it still needs] per class, for the Train tab's table."""
    rows = []
    for name, files in images.items():
        need = limits.min_images_per_class - len(files)
        note = f"add {need} more" if need > 0 else ("ready, 10+ help" if len(files) < 10 else "ready")
        rows.append([name, len(files), note])
    return rows


def readiness(images: TeachingSet, limits: Limits = LIMITS) -> str | None:
    """Why this set cannot be trained yet (one plain sentence), or None when it can."""
    if len(images) < 2:
        have = f"one class ({next(iter(images))!r})" if images else "no classes"
        return f"add images to at least two classes (there is {have} so far)"
    short = [f"{name!r} ({len(files)})" for name, files in images.items() if len(files) < limits.min_images_per_class]
    if short:
        return (f"each class needs at least {limits.min_images_per_class} images; add more to "
                + ", ".join(short))
    return None


# ----------------------------------------------------------------------------------------------
# Zips of class folders


def _parts(member: str) -> tuple[str, ...]:
    return PurePosixPath(member.replace("\\", "/")).parts


def _layout(members: list[zipfile.ZipInfo]) -> str | None:
    """The one top folder that holds the class folders (a zip of root/<class>/*), or None when the
    class folders are at the top (a zip of <class>/*)."""
    images = [_parts(m.filename) for m in members if Path(m.filename).suffix.lower() in IMAGE_EXTENSIONS]
    deep = Counter(parts[0] for parts in images if len(parts) == 3)
    if deep and not any(len(parts) == 2 for parts in images):
        return deep.most_common(1)[0][0]  # a stray file elsewhere is said, not taken for the layout
    return None


def read_zip(archive: str | Path, into: str | Path, limits: Limits = LIMITS) -> Added:
    """A teaching set from a zip of class folders, its images unpacked under `into` (a new folder
    per call). Files outside class folders, of other kinds, or unreadable are left out and said;
    an archive that is no zip, or over the limits, is refused whole."""
    archive = Path(archive)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{archive.name}: not a readable zip file ({exc}); zip a folder that holds one "
                        f"folder per class") from None
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir() and not _JUNK.search(m.filename)]
        if len(members) > limits.max_zip_entries:
            raise DataError(f"{archive.name} holds {len(members):,} files; at most {limits.max_zip_entries:,}")
        declared = sum(m.file_size for m in members)
        if declared > limits.max_zip_bytes:
            raise DataError(f"{archive.name} unpacks to {declared / 2**20:,.0f} MB; at most "
                            f"{limits.max_zip_bytes / 2**20:,.0f} MB")
        top = _layout(members)
        target = Path(into) / uuid.uuid4().hex[:12]
        images: TeachingSet = {}
        problems: list[str] = []
        for member in members:
            parts = _parts(member.filename)
            if parts[:-2] != ((top,) if top else ()):
                problems.append(f"{member.filename}: not in a class folder (the zip should hold <class>/<image>)")
                continue
            folder, file = parts[-2:]
            if Path(file).suffix.lower() not in IMAGE_EXTENSIONS:
                problems.append(f"{member.filename}: not an image file by its name")
                continue
            if member.file_size > limits.max_file_bytes:
                problems.append(f"{member.filename}: {member.file_size / 2**20:.0f} MB, over "
                                f"{limits.max_file_bytes / 2**20:.0f} MB for one image")
                continue
            try:
                name = class_name(folder, limits)
            except DataError as exc:
                problems.append(f"{member.filename}: {exc}")
                continue
            # Our own file name: the archive's names are never trusted as paths (no ../, no absolute).
            out = target / f"c{len(images)}" / f"{len(problems) + sum(map(len, images.values())):05d}{Path(file).suffix.lower()}"
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(out, "wb") as dst:
                # Read at most the declared size plus one byte: a member that lies about its size is cut
                # off (and then fails the image check) instead of filling the disk.
                shutil.copyfileobj(_Capped(src, member.file_size + 1), dst)
            added = add_images(images, name, [out], limits)
            problems += [problem.replace(out.name, member.filename, 1) for problem in added.problems]
            images = added.images
    return Added(images, problems)


class _Capped:
    """A file object that reads at most `limit` bytes of another."""

    def __init__(self, raw, limit: int):
        self.raw, self.left = raw, limit

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        size = self.left if size is None or size < 0 else min(size, self.left)
        data = self.raw.read(size)
        self.left -= len(data)
        return data
