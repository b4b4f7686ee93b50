"""Hugging Face `datasets` as a source: `--data hf:OWNER/NAME`, or a dataset saved on disk.

    --data hf:beans                        load_dataset("beans") (the Hub, or its local cache)
    --data hf:owner/name/config            a named configuration of it
    --data path/to/saved  (or hf:path)     load_from_disk: what DatasetDict.save_to_disk wrote

The image column is the one `Image()` feature and the label column the one `ClassLabel` (else a
column called label/labels/...); `--image-column` and `--label-column` name them where that is not
enough. The dataset's own splits are kept (train; validation, valid, val or dev; test); what is
missing is carved out of train by classifier.data, as for a folder. Rows labelled -1 (the unlabelled
test splits of contests) are left out.

The images are written once into the cache as the files they were stored as (the encoded bytes the
dataset holds, not decoded pixels), so the rest of the project -- the decode cache, the loaders, the
mistakes gallery -- treats them as a folder of files. This module returns plain lists and arrays;
classifier.data turns them into Splits (it imports this module, so this one cannot import it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from classifier.errors import DataError

log = logging.getLogger(__name__)

PREFIX = "hf:"
SPLIT_NAMES = {"train": ("train",), "val": ("validation", "valid", "val", "dev"), "test": ("test",)}
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "class", "category", "target")
IMAGE_COLUMN_NAMES = ("image", "img", "picture", "photo")
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes (a DatasetDict, a Dataset)
_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
          (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder that DatasetDict/Dataset.save_to_disk wrote."""
    folder = Path(path).expanduser()
    return folder.is_dir() and any((folder / marker).is_file() for marker in SAVED_MARKERS)


def is_hf_source(source: str) -> bool:
    return source.startswith(PREFIX) or is_saved_dataset(source)


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("a Hugging Face dataset needs the `datasets` library: pip install datasets") from None
    return datasets


def open_dataset(source: str):
    """(the DatasetDict or Dataset `source` names, the name the data goes by, where it is: a folder's
    absolute path or the Hub id, whatever way `source` spelt it)."""
    datasets = _import_datasets()
    target = source[len(PREFIX):] if source.startswith(PREFIX) else source
    if is_saved_dataset(target):
        try:
            folder = Path(target).expanduser().resolve()
            return datasets.load_from_disk(str(folder)), folder.name, str(folder)
        except Exception as exc:  # a damaged or foreign folder
            raise DataError(f"{target}: could not load the saved dataset ({exc})") from None
    parts = target.strip("/").split("/")
    if not target or len(parts) > 3 or Path(target).expanduser().exists():
        raise DataError(f"{source}: neither a dataset saved with save_to_disk nor a Hub id (hf:OWNER/NAME)")
    repo, config = "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None)
    try:
        return datasets.load_dataset(repo, config), parts[1] if len(parts) > 1 else parts[0], "/".join(parts)
    except Exception as exc:  # offline, unknown, private, or a loading script
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"could not load {PREFIX}{target} from the Hugging Face Hub or its cache: {first}. "
                        f"A dataset saved with save_to_disk loads offline: --data PATH") from None


def _splits_of(dataset) -> dict:
    """{"train"/"val"/"test": Dataset} from a DatasetDict (or a lone Dataset: all of it is train)."""
    if not hasattr(dataset, "keys"):
        return {"train": dataset}
    found = {}
    for ours, names in SPLIT_NAMES.items():
        for name in names:
            if name in dataset:
                found[ours] = dataset[name]
                break
    ignored = sorted(set(dataset) - {n for names in SPLIT_NAMES.values() for n in names})
    if "train" not in found:
        raise DataError(f"the dataset has no train split (it has {', '.join(dataset)}); "
                        f"a split named train is what the model learns from")
    if ignored:
        log.warning("ignoring the dataset's split(s) %s (known: train, validation, test)", ", ".join(ignored))
    return found


def find_columns(features, image_column: str | None = None, label_column: str | None = None) -> tuple[str, str]:
    """(image column, label column) of a dataset's `features`: as named, else found by type, else by name."""
    datasets = _import_datasets()
    columns = list(features)
    for given, what in ((image_column, "--image-column"), (label_column, "--label-column")):
        if given is not None and given not in features:
            raise DataError(f"{what} {given}: the dataset's columns are {', '.join(columns)}")

    def pick(kind, names, what):
        typed = [c for c, f in features.items() if isinstance(f, kind)]
        if len(typed) == 1:
            return typed[0]
        if len(typed) > 1:
            raise DataError(f"the dataset has several {kind.__name__} columns ({', '.join(typed)}): "
                            f"name one with {what}")
        named = [c for c in columns if c.lower() in names]
        if named:
            return named[0]
        raise DataError(f"no {'image' if what == '--image-column' else 'label'} column found among "
                        f"{', '.join(columns)}: name it with {what}")

    image = image_column or pick(datasets.Image, IMAGE_COLUMN_NAMES, "--image-column")
    label = label_column or pick(datasets.ClassLabel, LABEL_COLUMN_NAMES, "--label-column")
    if not isinstance(features[image], datasets.Image):
        raise DataError(f"column {image} holds {type(features[image]).__name__} values, not images")
    return image, label


def class_names(splits: dict, label: str) -> list[str]:
    """The ClassLabel's names, else the sorted distinct values of the label column (numbers by value)."""
    datasets = _import_datasets()
    feature = splits["train"].features[label]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values = {v for split in splits.values() for v in split[label] if v is not None and v != -1}
    if all(isinstance(v, (int, np.integer)) for v in values):
        return [str(v) for v in sorted(values)]
    return sorted(str(v) for v in values)


def _suffix(data: bytes) -> str:
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return suffix
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return ".img"  # Pillow reads by content, not by name


def _fingerprint(source: str, split, image: str, label: str) -> str:
    # datasets' own fingerprint identifies the rows and their processing; the columns chosen too.
    key = f"{source}\0{getattr(split, '_fingerprint', '')}\0{len(split)}\0{image}\0{label}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def export_split(split, image: str, label: str, classes: list[str], folder: Path) -> tuple[list[str], np.ndarray]:
    """The images of `split` as files in `folder` (written once: a finished folder is reused) and
    their class indices; rows without a label (-1 or None) are left out."""
    datasets = _import_datasets()
    is_class_label = isinstance(split.features[label], datasets.ClassLabel)
    index = {name: i for i, name in enumerate(classes)}
    rows = split.cast_column(image, datasets.Image(decode=False)).select_columns([image, label])
    done = folder / ".complete"
    partial = folder.with_name(folder.name + ".partial")
    if not done.exists():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    paths, targets = [], []
    number = 0
    for batch in rows.iter(batch_size=500):
        for value, target in zip(batch[image], batch[label]):
            number += 1
            if target is None or target == -1:
                continue
            data, source_path = (value or {}).get("bytes"), (value or {}).get("path")
            if data is None and not (source_path and Path(source_path).is_file()):
                raise DataError(f"row {number - 1} of the dataset has no image (neither bytes nor a file)")
            suffix = _suffix(data) if data is not None else Path(source_path).suffix
            name = f"{number - 1:07d}{suffix}"
            if not done.exists():
                if data is not None:
                    (partial / name).write_bytes(data)
                else:
                    shutil.copyfile(source_path, partial / name)
            paths.append(str(folder / name))
            targets.append(int(target) if is_class_label else index[str(target)])
    if not done.exists():
        (partial / ".complete").touch()
        shutil.rmtree(folder, ignore_errors=True)  # a half-written copy of an interrupted run
        partial.replace(folder)
    return paths, np.asarray(targets, dtype=np.int64)


def load_hf(source: str, cache: Path, image_column: str | None = None, label_column: str | None = None
            ) -> tuple[str, list[str], dict[str, tuple[list[str], np.ndarray]]]:
    """(name, classes, {split: (image paths, targets)}) of a Hugging Face dataset (see the module
    docstring); the images are exported into `cache` once."""
    dataset, name, where = open_dataset(source)
    splits = _splits_of(dataset)
    image, label = find_columns(splits["train"].features, image_column, label_column)
    classes = class_names(splits, label)
    if len(classes) < 2:
        raise DataError(f"{source}: the label column {label} needs at least two classes, found {classes}")
    out = {}
    for ours, split in splits.items():
        folder = cache / "hf" / f"{name}-{ours}-{_fingerprint(where, split, image, label)}"
        paths, targets = export_split(split, image, label, classes, folder)
        if len(paths) == 0 and ours != "train":
            log.warning("the dataset's %s split has no labelled rows: left out", ours)
            continue
        out[ours] = (paths, targets)
    log.info("Hugging Face dataset %s: image column %s, label column %s, splits %s", name, image, label,
             ", ".join(f"{k} {len(v[0])}" for k, v in out.items()))
    return name, classes, out
