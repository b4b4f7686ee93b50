"""Where images come from: CIFAR-10, Fashion-MNIST, a folder of images, a CSV of ids and labels,
a Hugging Face dataset (classifier.hf_data).

`load_data` turns a user's `--data` argument into `DataSplits`: class names plus train, validation
and test `Split`s. A Split is a list of file paths, or an in-memory uint8 array for the small
datasets, with integer targets. Nothing here is specific to a model: channel statistics and the
torch Dataset wrapper take the splits and a transform (classifier.transforms) as arguments.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import shutil
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from tqdm.auto import tqdm

from classifier import hf_data
from classifier.errors import DataError, ImageError
from classifier.images import open_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_DIR_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
SMALL_IMAGE_MAX_SIDE = 64  # at or below this, images are decoded once into memory and padded-cropped
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

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def image_size(self) -> tuple[int, int]:
        """(height, width) of the first training image: tells small-image data from photos."""
        if self.train.in_memory:
            return tuple(self.train.items.shape[1:3])
        for path in self.train.items[:20]:
            try:
                with Image.open(path) as image:
                    return image.height, image.width
            except Exception:
                continue
        raise DataError("none of the first training images could be opened")

    @property
    def is_small(self) -> bool:
        return max(self.image_size()) <= SMALL_IMAGE_MAX_SIDE


# ----------------------------------------------------------------------------------------------
# Sources


def cache_dir() -> Path:
    return Path(os.environ.get("CLASSIFIER_CACHE", Path.home() / ".cache" / "classifier"))


def _unpack_archive(archive: Path) -> Path:
    """Unpack a .tar/.tar.gz once into the cache, keyed by the archive's content hash."""
    digest = hashlib.sha256()
    with open(archive, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    target = cache_dir() / "archives" / f"{archive.name.split('.')[0]}-{digest.hexdigest()[:16]}"
    if (target / ".complete").exists():
        return target
    partial = target.with_name(target.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    log.info("unpacking %s into %s", archive, target)
    with tarfile.open(archive) as tar:
        tar.extractall(partial, filter="data")  # "data" refuses absolute paths, links out, devices
    (partial / ".complete").touch()
    if target.exists():  # a half-written copy from an interrupted run
        shutil.rmtree(target)
    partial.replace(target)
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


def list_images(folder: Path) -> list[str]:
    """Every image file under `folder` (any depth, IMAGE_EXTENSIONS), as sorted path strings."""
    return sorted(
        str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


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


def _load_csv(csv_path: Path, image_dir: Path | None) -> tuple[list[str], dict[str, Split], list[str]]:
    image_dir = image_dir or csv_path.parent
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder for {csv_path.name} does not exist")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        header = {h.strip().lower(): h for h in (reader.fieldnames or [])}
        if "id" not in header or "label" not in header:
            raise DataError(f"{csv_path}: needs 'id' and 'label' columns, found {reader.fieldnames}")
        rows = [(row[header["id"]].strip(), row[header["label"]].strip()) for row in reader]
    if not rows:
        raise DataError(f"{csv_path}: no rows")
    by_stem: dict[str, str] = {}
    for path in list_images(image_dir):
        by_stem.setdefault(Path(path).stem, path)
        by_stem.setdefault(Path(path).name, path)
    missing = [i for i, _ in rows if i not in by_stem]
    if missing:
        raise DataError(
            f"{csv_path}: {len(missing)} id(s) have no image in {image_dir}, "
            f"e.g. {', '.join(missing[:5])}"
        )
    labels = {label for _, label in rows}
    numeric = all(label.lstrip("-").isdigit() for label in labels)
    classes = sorted(labels, key=int) if numeric else sorted(labels)
    if len(classes) < 2:
        raise DataError(f"{csv_path}: needs at least two distinct labels, found {classes}")
    index = {c: i for i, c in enumerate(classes)}
    split = Split([by_stem[i] for i, _ in rows], np.asarray([index[l] for _, l in rows], np.int64))
    skipped: list[str] = []
    return classes, {"train": _drop_unreadable(split, skipped)}, skipped


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
        all_classes, splits, skipped = _load_csv(path, Path(image_dir) if image_dir else None)
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
    for split in ("train", "val", "test"):
        if len(getattr(data, split)) == 0 and not (split == "val" and val_fraction == 0):
            raise DataError(f"the {split} split is empty; check the data or the split fractions")
    return data


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


def materialize(split: Split, channels: int, size: int | None = None) -> tuple[Split, list[str]]:
    """Decode a split of small image files once into a uint8 array (N,H,W[,C]), cached on disk.

    The cache key is the list of paths with their sizes and modification times, so editing, adding
    or removing any file gives a new cache entry. Unreadable files are dropped and returned.
    """
    if split.in_memory or len(split) == 0:  # nothing to decode (an empty split: no val with --val-fraction 0)
        return split, []
    key = hashlib.sha256(f"{channels}:{size}".encode())
    for path in split.items:
        st = os.stat(path)
        key.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    key.update(split.targets.tobytes())
    cache = cache_dir() / "decoded" / f"{key.hexdigest()[:24]}.npz"
    if cache.exists():
        with np.load(cache) as f:
            return Split(f["images"], f["targets"]), [str(s) for s in f["skipped"]]
    images, keep, skipped = [], [], []
    for i, path in enumerate(split.items):
        try:
            image = open_image(path, channels)
        except ImageError as exc:
            skipped.append(str(exc))
            continue
        if size and image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        elif images and image.size != (images[0].shape[1], images[0].shape[0]):
            image = image.resize((images[0].shape[1], images[0].shape[0]), Image.BICUBIC)
        images.append(np.asarray(image, dtype=np.uint8))
        keep.append(i)
    if not images:  # every file broke after load_data's scan
        raise DataError(f"none of the {len(split)} image(s) of a split could be read:\n  " + "\n  ".join(skipped[:5]))
    array = np.stack(images)
    targets = split.targets[np.asarray(keep, dtype=np.int64)]
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, images=array, targets=targets, skipped=np.asarray(skipped, dtype=str))
    os.replace(tmp, cache)
    return Split(array, targets), skipped


def materialize_small(data: DataSplits) -> DataSplits:
    """All splits of a small-image dataset decoded into memory (see `materialize`)."""
    if data.train.in_memory or not data.is_small:
        return data
    out, skipped = {}, list(data.skipped)
    for name in ("train", "val", "test"):
        out[name], bad = materialize(getattr(data, name), data.channels)
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


class ImageDataset(Dataset):
    """A Split as a torch Dataset of (tensor, target, index); an unreadable image yields None."""

    def __init__(self, split: Split, transform, channels: int = 3):
        self.split, self.transform, self.channels = split, transform, channels

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        try:
            image = load_pil(self.split.items[index], self.channels)
        except ImageError as exc:
            log.warning("skipping unreadable image: %s", exc)
            return None
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
    """

    def __init__(self, split: Split, transform, channels: int = 3, shorter_side: int | None = None,
                 threads: int = 2, what: str = "images"):
        self.split, self.transform, self.channels, self.shorter_side = split, transform, channels, shorter_side

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

    def __getitem__(self, index: int):
        item = self.items[index]
        if item is None:
            return None
        return (self.transform(item) if self.shorter_side else item), int(self.split.targets[index]), index
