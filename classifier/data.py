"""Where images come from: CIFAR-10, Fashion-MNIST, a folder of images, a CSV of ids and labels,
a Hugging Face dataset (classifier.hf_data).

`load_data` turns a user's `--data` argument into `DataSplits`: class names plus train, validation
and test `Split`s. A Split is a list of file paths, or an in-memory uint8 array for the small
datasets, with integer targets. Nothing here is specific to a model: channel statistics and the
torch Dataset wrapper take the splits and a transform (classifier.transforms) as arguments.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import hashlib
import io
import json
import logging
import os
import random
import shutil
import tarfile
import tempfile
import zlib
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from filelock import FileLock
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, default_collate
from tqdm.auto import tqdm

from classifier import hf_data
from classifier.errors import DataError, ImageError, StorageError
from classifier.files import atomic_write, storage_error
from classifier.images import list_images, open_image

log = logging.getLogger(__name__)

SPLIT_DIR_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
SMALL_IMAGE_MAX_SIDE = 64  # at or below this, images are decoded once into memory and padded-cropped
# The typical image size is read from the headers of this many training images (all of them when
# there are fewer): enough to see through a few odd files, quick on 50,000.
SIZE_SAMPLE = 500
# Photos this many times larger or smaller (longer side) than the typical one are reported as outliers.
SIZE_OUTLIER_FACTOR = 4
ARCHIVE_MANIFEST = ".complete"  # in an unpacked archive: its file count and bytes, written last
# A CSV label with at most 1/TYPO_RATIO the rows of a label it nearly spells is taken for a typo.
TYPO_RATIO = 5
TYPO_SIMILARITY = 0.8  # difflib's ratio between the two spellings, case ignored
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}  # Pillow modes without colour
GREY_SAMPLE = 400  # how many files (spread over the training split) decide that a source is grey


@dataclass
class Split:
    """One split: `items` are file paths or a uint8 array (N,H,W) / (N,H,W,C); `targets` are ints."""

    items: list[str] | np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def in_memory(self) -> bool:
        return isinstance(self.items, np.ndarray)

    def subset(self, indices: np.ndarray) -> "Split":
        items = self.items[indices] if self.in_memory else [self.items[i] for i in indices]
        return Split(items, self.targets[indices])


@dataclass
class DataSplits:
    name: str  # what the data is called in a model card: "cifar10", "fashion-mnist", a folder name
    classes: list[str]
    train: Split
    val: Split
    test: Split
    channels: int = 3
    skipped: list[str] = field(default_factory=list)  # unreadable files left out, with reasons
    carved: tuple[str, ...] = ()  # the splits ("val", "test") carved out of train rather than given by the source
    _image_size: tuple[int, int] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def image_size(self) -> tuple[int, int]:
        """(height, width) typical of the training images: tells small-image data from photos, and
        is the size small images are decoded at. Images far from it are reported (typical_image_size)."""
        if self.train.in_memory:
            return tuple(self.train.items.shape[1:3])
        if self._image_size is None:
            self._image_size = typical_image_size(self.train.items)
        return self._image_size

    @property
    def is_small(self) -> bool:
        return max(self.image_size()) <= SMALL_IMAGE_MAX_SIDE


def typical_image_size(paths: Sequence[str], sample: int = SIZE_SAMPLE) -> tuple[int, int]:
    """The median (height, width) of the headers of `sample` of `paths` (all when fewer), and a
    warning naming the images far from it: no single file (a 1x1 icon sorting first) decides."""
    chosen = list(paths)
    if len(chosen) > sample:
        picked = np.random.default_rng(0).choice(len(chosen), sample, replace=False)
        chosen = [chosen[i] for i in sorted(picked)]
    sizes = {}
    for path in chosen:
        try:
            with Image.open(path) as image:
                sizes[path] = (image.height, image.width)
        except Exception:  # noqa: BLE001 - unreadable files are load_data's to report, not this guess's
            continue
    if not sizes:
        raise DataError(f"none of the {len(chosen)} image(s) sampled to find the typical size could be opened")
    heights, widths = sorted(h for h, _ in sizes.values()), sorted(w for _, w in sizes.values())
    typical = (heights[(len(heights) - 1) // 2], widths[(len(widths) - 1) // 2])
    small = max(typical) <= SMALL_IMAGE_MAX_SIDE
    # Small images are all decoded at the typical size, so any other size is resized; photos vary
    # by nature, and only those far off (an icon, a thumbnail, a scan) are worth a look.
    outliers = [(path, size) for path, size in sizes.items()
                if (size != typical if small else
                    not max(typical) / SIZE_OUTLIER_FACTOR <= max(size) <= max(typical) * SIZE_OUTLIER_FACTOR)]
    if outliers:
        shown = ", ".join(f"{path} ({h}x{w})" for path, (h, w) in outliers[:5])
        more = f" and {len(outliers) - 5} more" if len(outliers) > 5 else ""
        log.warning("%d of %d training images%s are far from the typical size %dx%d (height x width), and "
                    "are resized to it like the others; check that they belong: %s%s", len(outliers), len(sizes),
                    " sampled" if len(sizes) < len(paths) else "", *typical, shown, more)
    return typical


# ----------------------------------------------------------------------------------------------
# Sources


def cache_dir() -> Path:
    return Path(os.environ.get("CLASSIFIER_CACHE", Path.home() / ".cache" / "classifier"))


def _tree_size(root: Path) -> dict:
    """{"files": count, "bytes": total} of the regular files under root, the manifest left out."""
    files = total = 0
    for folder, _, names in os.walk(root):
        for name in names:
            if folder == str(root) and name == ARCHIVE_MANIFEST:
                continue
            files += 1
            total += os.lstat(os.path.join(folder, name)).st_size
    return {"files": files, "bytes": total}


def _unpacked_copy_is_whole(target: Path) -> bool:
    """Whether the unpacked copy holds every file its manifest counted; an incomplete one is said."""
    if not target.exists():
        return False
    try:
        manifest = json.loads((target / ARCHIVE_MANIFEST).read_text())
        found = _tree_size(target)
    except (OSError, ValueError):
        found, manifest = None, "no manifest to check it against: cut short, or unpacked by an older version"
    if found is not None and found == manifest:
        return True
    if found is not None:
        manifest = (f"{found['files']:,} files of {found['bytes']:,} bytes, where {manifest['files']:,} of "
                    f"{manifest['bytes']:,} were unpacked")
    log.warning("%s: the unpacked copy of the archive is incomplete (%s); unpacking it again", target, manifest)
    return False


def _unpack_archive(archive: Path) -> Path:
    """Unpack a .tar/.tar.gz once into the cache, keyed by the archive's content hash.

    Runs started together on a fresh cache must neither read nor remove each other's half-written
    copy: under a lock, one process unpacks into a private folder of its own and moves it into place
    in one rename; the others wait, then find it whole. Each read checks the copy against the
    manifest written last, and unpacks again (saying so) what a kill or a full disk left incomplete.
    """
    digest = hashlib.sha256()
    with open(archive, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    target = cache_dir() / "archives" / f"{archive.name.split('.')[0]}-{digest.hexdigest()[:16]}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _unpacked_copy_is_whole(target):
            return target
        # Whatever is left is from processes that died while unpacking (the lock is ours).
        for leftover in [target, *target.parent.glob(f".{target.name}.*.partial"),
                         target.with_name(target.name + ".partial")]:
            shutil.rmtree(leftover, ignore_errors=True)
        private = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
        log.info("unpacking %s into %s", archive, target)
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(private, filter="data")  # "data" refuses absolute paths, links out, devices
            (private / ARCHIVE_MANIFEST).write_text(json.dumps(_tree_size(private)))
            private.rename(target)
        except BaseException as exc:
            shutil.rmtree(private, ignore_errors=True)
            if isinstance(exc, (tarfile.TarError, EOFError, zlib.error)):
                raise DataError(f"{archive}: not a whole .tar or .tar.gz archive ({exc}); copy or download it "
                                f"again") from None
            error = storage_error(exc, target, "the unpacked archive", "or point CLASSIFIER_CACHE at a disk "
                                  "with room") if isinstance(exc, Exception) else None
            if error is None:
                raise
            raise error from exc
    return target


def _resolve_dir(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_file() and path.name.endswith((".tar", ".tar.gz", ".tgz")):
        path = _unpack_archive(path)
        # An archive with one top-level folder holding the data: step into it.
        children = [c for c in path.iterdir() if not c.name.startswith(".")]
        if len(children) == 1 and children[0].is_dir() and not _find_split_dirs(path):
            path = children[0]
    return path


def _find_split_dirs(root: Path) -> dict[str, Path]:
    found = {}
    for split, names in SPLIT_DIR_NAMES.items():
        for name in names:
            if (root / name).is_dir():
                found[split] = root / name
                break
    return found if "train" in found else {}


def _scan_class_folders(root: Path, classes: list[str] | None = None) -> tuple[list[str], Split]:
    """root/<class>/* as a Split. `classes` fixes the label order (for val/test folders)."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = [p.name for p in class_dirs]
        if len(classes) < 2:
            found = f"only '{classes[0]}'" if classes else "no class folders"
            raise DataError(
                f"{root}: an image folder needs one sub-folder per class and at least two classes; "
                f"found {found}"
            )
    else:
        unknown = sorted({p.name for p in class_dirs} - set(classes))
        if unknown:
            raise DataError(f"{root}: class folders {unknown} do not exist in the training split")
    items, targets = [], []
    for label, name in enumerate(classes):
        folder = root / name
        files = list_images(folder) if folder.is_dir() else []
        if not files and folder.is_dir():
            raise DataError(f"{folder}: the class folder '{name}' holds no images")
        items += files
        targets += [label] * len(files)
    return classes, Split(items, np.asarray(targets, dtype=np.int64))


def _drop_unreadable(split: Split, skipped: list[str]) -> Split:
    """Leave out files whose header Pillow cannot read, and note each with its reason."""
    keep = []
    for i, path in enumerate(split.items):
        try:
            if os.path.getsize(path) == 0:
                raise ImageError("the file is empty (0 bytes)")
            with Image.open(path) as image:
                image.size  # noqa: B018 - parsing the header is the check
            keep.append(i)
        except Exception as exc:
            skipped.append(f"{path}: {exc}")
    return split if len(keep) == len(split) else split.subset(np.asarray(keep, dtype=np.int64))


def _load_folder(root: Path) -> tuple[list[str], dict[str, Split], list[str]]:
    skipped: list[str] = []
    split_dirs = _find_split_dirs(root)
    if split_dirs:
        classes, train = _scan_class_folders(split_dirs["train"])
        splits = {"train": train}
        for split in ("val", "test"):
            if split in split_dirs:
                splits[split] = _scan_class_folders(split_dirs[split], classes)[1]
    else:
        classes, train = _scan_class_folders(root)
        splits = {"train": train}
    splits = {k: _drop_unreadable(v, skipped) for k, v in splits.items()}
    return classes, splits, skipped


def _and(items: Sequence) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _lines(numbers: Sequence[int], shown: int = 5) -> str:
    more = f" and {len(numbers) - shown} more" if len(numbers) > shown else ""
    return f"line{'s' if len(numbers) > 1 else ''} {_and(numbers[:shown])}{more}"


def _read_csv_rows(csv_path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, fields)]) of a CSV in UTF-8, with or without the byte order mark that
    spreadsheets write ("CSV UTF-8"); blank lines are left out."""
    raw = csv_path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # Not guessed at: read as Latin-1, a UTF-8 file would turn its accents into other labels.
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{csv_path}: not UTF-8 text: line {line} holds the byte 0x{raw[exc.start]:02x}, which "
                        f"UTF-8 cannot decode (saved as Latin-1 or Windows-1252?); save it as 'CSV UTF-8' and try "
                        f"again") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header, rows = None, []
    try:
        for fields in reader:
            if header is None:
                header = fields
            elif any(f.strip() for f in fields):
                rows.append((reader.line_num, fields))
    except csv.Error as exc:
        raise DataError(f"{csv_path}: line {reader.line_num} is not valid CSV ({exc})") from None
    return header or [], rows


def _csv_entries(csv_path: Path, header: list[str], rows) -> list[tuple[int, str, str]]:
    """[(line, id, label)] of the rows; rows with a missing, empty or extra field are refused, named."""
    names = [h.strip().lower() for h in header]
    if "id" not in names or "label" not in names:
        raise DataError(f"{csv_path}: needs 'id' and 'label' columns, found {header}")
    id_col, label_col = names.index("id"), names.index("label")
    entries, problems = [], []
    for line, fields in rows:
        if len(fields) > len(header):  # an unquoted comma in a label, or a shifted row
            problems.append(f"line {line}: {len(fields)} fields, the header has {len(header)}")
        elif max(id_col, label_col) >= len(fields):
            problems.append(f"line {line}: no {'label' if label_col >= len(fields) else 'id'}")
        elif not fields[id_col].strip():
            problems.append(f"line {line}: empty id")
        elif not fields[label_col].strip():
            problems.append(f"line {line}: empty label")
        else:
            entries.append((line, fields[id_col].strip(), fields[label_col].strip()))
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise DataError(f"{csv_path}: {len(problems)} row(s) without a usable id and label: "
                        f"{'; '.join(problems[:5])}{more}; fix or delete them")
    if not entries:
        raise DataError(f"{csv_path}: no rows")
    return entries


def _refuse_duplicates(csv_path: Path, entries, files: list[str]) -> None:
    """An image listed twice could land in both the training and the test split, or hold two labels."""
    rows_of = defaultdict(list)
    for (line, image_id, label), path in zip(entries, files):
        rows_of[path].append((line, image_id, label))
    repeated = [rows for rows in rows_of.values() if len(rows) > 1]
    if repeated:
        rows = repeated[0]
        labels = list(dict.fromkeys(label for _, _, label in rows))
        labelled = f"labelled {labels[0]} each time" if len(labels) == 1 else f"labelled {_and(labels)}"
        raise DataError(f"{csv_path}: {len(repeated)} image(s) are listed more than once, e.g. '{rows[0][1]}' on "
                        f"{_lines([line for line, _, _ in rows])} ({labelled}); list each image once (a repeat can "
                        f"land in both the training and the test split)")


def _similar(a: str, b: str) -> bool:
    a, b = a.casefold(), b.casefold()
    if a == b:
        return True
    if a.isdigit() or b.isdigit():  # 1 and 7 are different classes, not typos of each other
        return False
    return difflib.SequenceMatcher(None, a, b).ratio() >= TYPO_SIMILARITY


def _refuse_typos(csv_path: Path, entries, classes: Sequence[str] | None) -> None:
    """A label with few rows that nearly spells a frequent one (`shipp` beside `ship`) is a typo, not
    a class, unless --classes names both."""
    counts = Counter(label for _, _, label in entries)
    listed = set(classes or ())
    for rare, n in sorted(counts.items(), key=lambda item: item[1]):
        for common, m in counts.most_common():
            if common != rare and m >= TYPO_RATIO * n and not {rare, common} <= listed and _similar(rare, common):
                lines = [line for line, _, label in entries if label == rare]
                raise DataError(f"{csv_path}: label '{rare}' ({n} row{'s' if n > 1 else ''}: {_lines(lines)}) looks "
                                f"like a typo of '{common}' ({m} rows); correct it, or name every class with "
                                f"--classes to keep both")


def _load_csv(csv_path: Path, image_dir: Path | None, classes: Sequence[str] | None = None
              ) -> tuple[list[str], dict[str, Split], list[str]]:
    image_dir = image_dir or csv_path.parent
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder for {csv_path.name} does not exist")
    entries = _csv_entries(csv_path, *_read_csv_rows(csv_path))
    by_stem: dict[str, str] = {}
    for path in list_images(image_dir):
        by_stem.setdefault(Path(path).stem, path)
        by_stem.setdefault(Path(path).name, path)
    missing = [i for _, i, _ in entries if i not in by_stem]
    if missing:
        raise DataError(
            f"{csv_path}: {len(missing)} id(s) have no image in {image_dir}, "
            f"e.g. {', '.join(missing[:5])}"
        )
    files = [by_stem[i] for _, i, _ in entries]
    _refuse_duplicates(csv_path, entries, files)
    _refuse_typos(csv_path, entries, classes)
    labels = {label for _, _, label in entries}
    numeric = all(label.lstrip("-").isdigit() for label in labels)
    found = sorted(labels, key=int) if numeric else sorted(labels)
    if len(found) < 2:
        raise DataError(f"{csv_path}: needs at least two distinct labels, found {found}")
    index = {c: i for i, c in enumerate(found)}
    split = Split(files, np.asarray([index[label] for _, _, label in entries], np.int64))
    skipped: list[str] = []
    return found, {"train": _drop_unreadable(split, skipped)}, skipped


def _load_torchvision(kind: str, root: Path, download: bool):
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "fashion-mnist": datasets.FashionMNIST}[kind]
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except Exception as exc:  # offline, or the files are missing and download=False
        hint = ""
        if kind == "cifar10":
            hint = " (or point --data-dir at an ImageFolder copy, e.g. cifar10-jpeg.tar.gz)"
        raise DataError(f"could not load {kind} from {root}: {exc}{hint}") from exc

    def as_split(ds) -> Split:
        data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
        return Split(np.ascontiguousarray(data, dtype=np.uint8), np.asarray(ds.targets, np.int64))

    return list(train.classes), {"train": as_split(train), "test": as_split(test)}


def is_grey(split: Split, sample: int = GREY_SAMPLE) -> bool:
    """Whether the images of a split of files have no colour (Pillow's grey modes), judged on up to
    `sample` files spread evenly over it (their headers only): grey sources train one-channel models."""
    if split.in_memory or len(split) == 0:
        return False
    for i in np.linspace(0, len(split) - 1, min(sample, len(split))).astype(int):
        try:
            with Image.open(split.items[i]) as image:
                if image.mode not in GREY_MODES:
                    return False
        except Exception:
            continue  # unreadable: left out later, and says nothing about colour
    return True


def _load_hf(source: str, image_column: str | None, label_column: str | None
             ) -> tuple[str, list[str], dict[str, Split]]:
    name, classes, found = hf_data.load_hf(source, cache_dir(), image_column, label_column)
    return name, classes, {split: Split(paths, targets) for split, (paths, targets) in found.items()}


BUILTIN = {"cifar10": "cifar10", "cifar-10": "cifar10", "fashion-mnist": "fashion-mnist",
           "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist"}


def stratified_split(targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held_out): `fraction` of each class held out; the same seed, the same split."""
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for label in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == label))
        n = int(round(len(idx) * fraction))
        n = min(max(n, 1 if fraction > 0 and len(idx) > 1 else 0), len(idx) - 1)
        held.append(idx[:n])
        kept.append(idx[n:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def load_data(
    source: str,
    *,
    data_dir: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    download: bool = True,
    image_column: str | None = None,
    label_column: str | None = None,
) -> DataSplits:
    """Resolve `source` (a built-in name, a folder, an archive, a CSV, or a Hugging Face dataset:
    hf:OWNER/NAME or a folder written by save_to_disk) into train/val/test splits.

    Splits the source already has are kept; a missing validation split is carved from train, and a
    missing test split too, stratified by class with `seed` (DataSplits.carved names them). A source
    of files whose images are all grey is read with one channel.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1:
        raise DataError("--val-fraction and --test-fraction must be in [0, 1)")
    kind = BUILTIN.get(source.lower())
    skipped: list[str] = []
    channels = 3
    if kind:
        name = kind
        root = _resolve_dir(data_dir) if data_dir else Path("data")
        if data_dir and _find_split_dirs(root):
            all_classes, splits, skipped = _load_folder(root)
        else:
            all_classes, splits = _load_torchvision(kind, root, download)
        channels = 1 if kind == "fashion-mnist" else 3
    elif hf_data.is_hf_source(source):
        name, all_classes, splits = _load_hf(source, image_column, label_column)
    elif source.lower().endswith(".csv"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"{path}: no such CSV file")
        name = path.stem
        all_classes, splits, skipped = _load_csv(path, Path(image_dir) if image_dir else None, classes)
    else:
        root = _resolve_dir(source)
        if not root.is_dir():
            raise DataError(f"{root}: not a folder, archive, CSV or known dataset ({', '.join(BUILTIN)})")
        name = Path(source).name.split(".")[0]
        all_classes, splits, skipped = _load_folder(root)
    if skipped:
        log.warning("skipped %d unreadable file(s):\n  %s", len(skipped), "\n  ".join(skipped))

    if not kind and is_grey(splits["train"]):
        channels = 1
    train = splits["train"]
    carved = tuple(split for split in ("val", "test") if split not in splits)
    if "test" not in splits:
        keep, held = stratified_split(train.targets, test_fraction, seed)
        train, splits["test"] = train.subset(keep), train.subset(held)
    if "val" not in splits:
        keep, held = stratified_split(train.targets, val_fraction, seed + 1)
        train, splits["val"] = train.subset(keep), train.subset(held)
    data = DataSplits(name, list(all_classes), train, splits["val"], splits["test"], channels, skipped, carved)
    if classes:
        data = select_classes(data, classes)
    _refuse_empty_classes(data)
    for split in ("train", "val", "test"):
        if len(getattr(data, split)) == 0 and not (split == "val" and val_fraction == 0):
            raise DataError(f"the {split} split is empty; check the data or the split fractions")
    return data


def _refuse_empty_classes(data: DataSplits) -> None:
    """A class whose every file was unreadable would be a class the model can never learn."""
    counts = np.bincount(data.train.targets, minlength=data.num_classes)
    empty = [name for name, count in zip(data.classes, counts) if count == 0]
    if empty:
        why = (f" ({len(data.skipped)} unreadable file(s) were left out, e.g. {data.skipped[0]})"
               if data.skipped else "")
        raise DataError(f"class '{empty[0]}' has no readable image in the training split{why}; add images to it, "
                        f"fix or remove its files, or leave the class out with --classes")


def select_classes(data: DataSplits, classes: Sequence[str]) -> DataSplits:
    """Keep only `classes` (in that order, relabelled 0..k-1): CIFAR-3 from CIFAR-10, say."""
    classes = [c.strip() for c in classes if c.strip()]
    unknown = [c for c in classes if c not in data.classes]
    if unknown:
        raise DataError(f"unknown class(es) {unknown}; this data has {data.classes}")
    if len(set(classes)) < 2:
        raise DataError("choose at least two different classes")
    old_to_new = np.full(len(data.classes), -1, dtype=np.int64)
    for new, c in enumerate(classes):
        old_to_new[data.classes.index(c)] = new

    def pick(split: Split) -> Split:
        idx = np.flatnonzero(old_to_new[split.targets] >= 0)
        sub = split.subset(idx)
        return Split(sub.items, old_to_new[sub.targets])

    return replace(data, classes=list(classes), train=pick(data.train), val=pick(data.val), test=pick(data.test))


# ----------------------------------------------------------------------------------------------
# Decoding small images once, statistics, and the torch Dataset


def load_pil(item, channels: int) -> Image.Image:
    """One item of a Split (an array row or a path) as a PIL image with `channels` channels."""
    if isinstance(item, np.ndarray):
        image = Image.fromarray(item)
        return image if image.mode == ("RGB" if channels == 3 else "L") else image.convert(
            "RGB" if channels == 3 else "L")
    return open_image(item, channels)


def materialize(split: Split, channels: int, size: int | tuple[int, int] | None = None) -> tuple[Split, list[str]]:
    """Decode a split of small image files once into a uint8 array (N,H,W[,C]), cached on disk.

    Every image is decoded at `size` (height, width), or an int for a square; None: the split's
    typical size (typical_image_size), never the first file's. The cache key is the list of paths
    with their sizes and modification times, so editing, adding or removing any file gives a new
    cache entry; a cache that cannot be read back is decoded again. Unreadable files are dropped
    and returned.
    """
    if split.in_memory or len(split) == 0:  # nothing to decode (an empty split: no val with --val-fraction 0)
        return split, []
    if size is None:
        size = typical_image_size(split.items)
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    key = hashlib.sha256(f"{channels}:{height}x{width}".encode())
    for path in split.items:
        st = os.stat(path)
        key.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    key.update(split.targets.tobytes())
    cache = cache_dir() / "decoded" / f"{key.hexdigest()[:24]}.npz"
    cached = _read_decoded(cache, len(split)) if cache.exists() else None
    if cached is not None:
        return cached
    images, keep, skipped = [], [], []
    for i, path in enumerate(split.items):
        try:
            image = open_image(path, channels)
        except ImageError as exc:
            skipped.append(str(exc))
            continue
        if image.size != (width, height):
            image = image.resize((width, height), Image.BICUBIC)
        images.append(np.asarray(image, dtype=np.uint8))
        keep.append(i)
    if not images:  # every file broke after load_data's scan
        raise DataError(f"none of the {len(split)} image(s) of a split could be read:\n  " + "\n  ".join(skipped[:5]))
    array = np.stack(images)
    targets = split.targets[np.asarray(keep, dtype=np.int64)]
    _write_decoded(cache, array, targets, skipped)
    return Split(array, targets), skipped


def _read_decoded(cache: Path, count: int) -> tuple[Split, list[str]] | None:
    """The decoded split in `cache`, or None (said in a warning) when it cannot be read back whole."""
    try:
        with np.load(cache) as f:  # reading each array checks its CRC: a damaged byte fails here
            images, targets, skipped = f["images"], f["targets"], [str(s) for s in f["skipped"]]
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with a cache, the remedy is to rebuild it
        log.warning("%s: the decoded-image cache is damaged (%s: %s); decoding the images again", cache,
                    type(exc).__name__, exc)
        return None
    if len(images) != len(targets) or len(targets) + len(skipped) != count:
        log.warning("%s: the decoded-image cache holds %d images for %d files; decoding the images again", cache,
                    len(images), count)
        return None
    return Split(images, targets), skipped


def _write_decoded(cache: Path, images: np.ndarray, targets: np.ndarray, skipped: list[str]) -> None:
    """Save the decoded split whole or not at all; a cache that cannot be written only costs time."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a path
            np.savez(f, images=images, targets=targets, skipped=np.asarray(skipped, dtype=str))
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, write, "the decoded-image cache", "or point CLASSIFIER_CACHE at a disk with room")
    except (StorageError, OSError) as exc:
        log.warning("could not cache the decoded images, going on without: %s", exc)


def materialize_small(data: DataSplits) -> DataSplits:
    """All splits of a small-image dataset decoded into memory (see `materialize`)."""
    if data.train.in_memory or not data.is_small:
        return data
    out, skipped = {}, list(data.skipped)
    size = data.image_size()  # the training images' typical size: every split is decoded at it
    for name in ("train", "val", "test"):
        out[name], bad = materialize(getattr(data, name), data.channels, size)
        skipped += bad
    if len(skipped) > len(data.skipped):
        log.warning("skipped %d unreadable file(s):\n  %s", len(skipped) - len(data.skipped),
                    "\n  ".join(skipped[len(data.skipped):]))
    return replace(data, train=out["train"], val=out["val"], test=out["test"], skipped=skipped)


def channel_stats(split: Split, channels: int, max_images: int = 5000, seed: int = 0
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] of (a sample of) the training images."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(split))[:max_images]
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    count = 0
    for i in idx:
        try:
            image = load_pil(split.items[i], channels)
        except ImageError:
            continue
        if max(image.size) > 128:  # statistics do not need full resolution
            image = image.resize((128, 128), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.float64).reshape(-1, channels) / 255.0
        total += pixels.sum(0)
        total_sq += (pixels**2).sum(0)
        count += len(pixels)
    if count == 0:
        raise DataError("no readable training images to compute channel statistics from")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


class EpochSampler(DistributedSampler):
    """PyTorch's DistributedSampler, whose indices come with their epoch: (index, epoch).

    ImageDataset then draws each sample's augmentation from (seed, epoch, index) alone, so what a
    sample looks like does not depend on which worker process loads it or on what that worker loaded
    before: a resumed run (fit calls set_epoch) sees exactly what an uninterrupted one saw, with any
    number of workers. Without it, each persistent worker's random stream runs on from the epochs
    before, which a resumed run's fresh workers have not seen.
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((index, epoch) for index in super().__iter__())


@contextlib.contextmanager
def sample_random_state(seed: int, epoch: int, index: int) -> Iterator[None]:
    """torch's and Python's global random streams seeded from (seed, epoch, index) inside, restored
    after: in a worker process it makes no difference; in the main one (no workers) training's own
    stream (dropout, mixing) goes on untouched."""
    value = int(np.random.SeedSequence([seed % 2**32, epoch, index]).generate_state(1)[0])
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(value)
        random.seed(value)
        try:
            yield
        finally:
            random.setstate(python_state)


class ImageDataset(Dataset):
    """A Split as a torch Dataset of (tensor, target, index); an unreadable image yields None.

    With a `seed`, a key (index, epoch) from EpochSampler transforms the image under
    sample_random_state(seed, epoch, index): the same augmentation in any process, every time.
    """

    def __init__(self, split: Split, transform, channels: int = 3, seed: int | None = None):
        self.split, self.transform, self.channels, self.seed = split, transform, channels, seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, None)
        try:
            image = load_pil(self.split.items[index], self.channels)
        except ImageError as exc:
            log.warning("skipping unreadable image: %s", exc)
            return None
        if epoch is None or self.seed is None:
            return self.transform(image), int(self.split.targets[index]), index
        with sample_random_state(self.seed, epoch, index):
            return self.transform(image), int(self.split.targets[index]), index


def collate_skipping_broken(batch):
    """default_collate over the readable samples of a batch; None when none of them is."""
    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None


# ----------------------------------------------------------------------------------------------
# Photos decoded once


PRELOAD_MEMORY = 1.5 * 2**30  # bytes: a run decodes its photos once, up front, only when they fit in this


def preload_bytes(split: Split, channels: int, size: int, shorter_side: int | None) -> int:
    """About what PreloadedImages would hold for `split`: shrunk images (3:2 at most) or eval tensors."""
    per_image = int(shorter_side * shorter_side * 1.5 * channels) if shorter_side else size * size * channels * 4
    return len(split) * per_image


def preload_side(size: int) -> int:
    """The shorter side training photos are kept at when preloaded: twice the input, so that a
    random crop of a quarter of the image is still sharp at the input size."""
    return 2 * size


def will_preload(data: DataSplits, in_chans: int, size: int) -> bool:
    """Whether a run decodes its photos once, up front (data.PreloadedImages): files, not small
    images (those are decoded into memory already), and all of them within PRELOAD_MEMORY."""
    if data.train.in_memory or data.is_small:
        return False
    needed = (preload_bytes(data.train, in_chans, size, preload_side(size))
              + preload_bytes(data.val, in_chans, size, None) + preload_bytes(data.test, in_chans, size, None))
    return needed <= PRELOAD_MEMORY


def shrink(image: Image.Image, shorter_side: int) -> Image.Image:
    """`image` made smaller, if it is, so that its shorter side is `shorter_side` (bicubic)."""
    scale = shorter_side / min(image.size)
    if scale >= 1:
        return image
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC,
                        reducing_gap=3.0)


class PreloadedImages(Dataset):
    """ImageDataset for a split of photo files, decoded once, up front, rather than in every epoch.

    A phone's photo takes 100 ms or more to decode, and a run reads each one every epoch. With
    `shorter_side` (training) each image is kept shrunk to it, and the augmentation, which crops and
    resizes anyway, works on the small copy. Without (evaluation) each is kept as the output of
    `transform`, the eval transform: exactly what decoding it every time would give. Decoding runs
    in `threads` threads (Pillow releases the GIL), with a progress bar. Unreadable files yield None.
    With a `seed`, keys (index, epoch) from EpochSampler augment as ImageDataset does: exactly again.
    """

    def __init__(self, split: Split, transform, channels: int = 3, shorter_side: int | None = None,
                 threads: int = 2, what: str = "images", seed: int | None = None):
        self.split, self.transform, self.channels, self.shorter_side = split, transform, channels, shorter_side
        self.seed = seed

        def decode(index: int):
            try:
                image = load_pil(split.items[index], channels)
            except ImageError as exc:
                log.warning("skipping unreadable image: %s", exc)
                return None
            return shrink(image, shorter_side) if shorter_side else transform(image)

        with ThreadPoolExecutor(max(1, threads)) as pool:
            self.items = list(tqdm(pool.map(decode, range(len(split))), total=len(split), leave=False,
                                   desc=f"decoding {what}", unit="image"))

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, None)
        item = self.items[index]
        if item is None:
            return None
        if not self.shorter_side:
            return item, int(self.split.targets[index]), index
        if epoch is None or self.seed is None:
            return self.transform(item), int(self.split.targets[index]), index
        with sample_random_state(self.seed, epoch, index):
            return self.transform(item), int(self.split.targets[index]), index
