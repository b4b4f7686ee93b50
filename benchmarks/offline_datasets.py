#!/usr/bin/env python
"""Image datasets built without a network, from files that registry packages ship.

    python benchmarks/offline_datasets.py OUT                      # everything below, into OUT/
    python benchmarks/offline_datasets.py OUT --only photos,hf     # some of it

What goes into OUT (docs/offline_data.md says where each source comes from, its licence and size):
- cifar-<a>-<b>-32px/{train,val}/<class>/*.jpg: a CIFAR-10 class subset at its native 32 px (train
  from CIFAR's train split, val from its test split), copied from the JPEG copy in shared/data;
- cifar-<a>-<b>-photos/{train,val}/<class>/*.jpg: the same images upscaled to mixed "photo" sizes
  (each side 200..640 px, aspect 0.6..1.6, JPEG quality 85..95): the shape of a user's own folder;
- fashion-mnist-csv/{train.csv,train/<id>.png,classes.txt}: grey 28x28 PNGs with an id,label CSV (the
  "apparel" tutorial layout), from Fashion-MNIST (Debian's dataset-fashion-mnist package); without it,
  cifar10-grey28-csv/ in the same layout, CIFAR-10 turned grey and shrunk to 28 px, as a substitute;
- FashionMNIST/raw/: the four idx files uncompressed, checked against their published MD5 sums, so
  `torchvision.datasets.FashionMNIST(OUT, download=False)` and `--data fashion-mnist --data-dir OUT`
  load offline;
- hf-cifar-<a>-<b>-photos/: a Hugging Face DatasetDict (train, validation; Image + ClassLabel)
  written with save_to_disk, then read back in a child process with HF_DATASETS_OFFLINE=1 and
  HF_HUB_OFFLINE=1 (needs `pip install datasets`);
- offline-photos/{manifest.csv,<group>/*.png}: every real photograph found in installed packages
  (gradio, matplotlib, scikit-image, scikit-learn) or in downloaded wheels and Debian packages
  (--wheels, --debs), each with its source, licence and its relation to the CIFAR-10 classes.

Everything is seeded (--seed): the same inputs give the same files.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import importlib.metadata
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DEFAULT_CIFAR = ROOT.parent.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"  # /work/wt/<tree> -> /work/shared
if not DEFAULT_CIFAR.exists():
    DEFAULT_CIFAR = Path("/work/shared/data/cifar10-jpeg.tar.gz")

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
# MD5 of the *uncompressed* idx files: the same bytes as the original release. Debian re-gzips them,
# so the .gz sums that torchvision lists (8d4fb7e6..., ...) do not match Debian's .gz files.
FASHION_RAW_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
GCOMPRIS_DEBIAN_DIR = Path("/usr/share/gcompris-qt/rcc")  # gcompris-qt-data (pulls in Qt if installed)
DEFAULT_DEBS = Path(os.environ.get("OFFLINE_DEBS", "/tmp/offline-debs"))  # `apt-get download NAME` lands here
DEFAULT_WHEELS = Path(os.environ.get("OFFLINE_WHEELS", "/tmp/offline-wheels"))  # `pip download --no-deps`


# --------------------------------------------------------------------------------------- CIFAR-10

def cifar_files(archive: str | os.PathLike = DEFAULT_CIFAR) -> dict[str, list[tuple[str, str]]]:
    """{"train": [(path, class), ...], "test": [...]} of the CIFAR-10 JPEG copy, unpacked (once) into
    $CLASSIFIER_CACHE by classifier.data.load_data. The train list is CIFAR's whole train split (the
    validation images that load_data carves out of it are put back), sorted by path."""
    from classifier.data import load_data

    data = load_data("cifar10", data_dir=archive, download=False)
    out = {}
    for name, splits in (("train", (data.train, data.val)), ("test", (data.test,))):
        pairs = [(str(p), data.classes[int(t)]) for split in splits for p, t in zip(split.items, split.targets)]
        out[name] = sorted(pairs)
    return out


def pick_per_class(pairs: list[tuple[str, str]], classes: list[str], n: int, rng: np.random.Generator
                   ) -> list[tuple[str, str]]:
    """`n` (path, class) pairs of each class, drawn without replacement, in a seeded order."""
    chosen = []
    for cls in classes:
        members = [p for p in pairs if p[1] == cls]
        if len(members) < n:
            raise ValueError(f"class {cls!r} has {len(members)} images, fewer than {n}")
        idx = rng.choice(len(members), size=n, replace=False)
        chosen += [members[i] for i in sorted(idx)]
    return chosen


def build_cifar_subset(out: Path, classes: list[str], n_train: int, n_val: int, seed: int = 0,
                       archive: str | os.PathLike = DEFAULT_CIFAR) -> Path:
    """out/cifar-<classes>-32px/{train,val}/<class>/<stem>.jpg: the native 32 px JPEG files, copied
    byte for byte; train from CIFAR's train split, val from its test split."""
    unknown = [c for c in classes if c not in CIFAR_CLASSES]
    if unknown:
        raise ValueError(f"not CIFAR-10 classes: {unknown}")
    files = cifar_files(archive)
    rng = np.random.default_rng(seed)
    root = out / f"cifar-{'-'.join(classes)}-32px"
    shutil.rmtree(root, ignore_errors=True)
    for split, source, n in (("train", "train", n_train), ("val", "test", n_val)):
        for path, cls in pick_per_class(files[source], classes, n, rng):
            target = root / split / cls / f"{source}-{Path(path).stem}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return root


def upscale_to_photo(image: Image.Image, rng: np.random.Generator, min_side: int = 200, max_side: int = 640,
                     aspect: tuple[float, float] = (0.6, 1.6)) -> Image.Image:
    """A small image stretched to a random photo-like size: the longer side in [min_side, max_side],
    width/height a log-uniform draw from `aspect`, bicubic."""
    ratio = float(np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1]))))
    longer = int(rng.integers(min_side, max_side + 1))
    if ratio >= 1:
        size = (longer, max(min_side // 2, int(round(longer / ratio))))
    else:
        size = (max(min_side // 2, int(round(longer * ratio))), longer)
    return image.convert("RGB").resize(size, Image.BICUBIC)


def build_mixed_photos(source: Path, out: Path, seed: int = 0, min_side: int = 200, max_side: int = 640,
                       quality: tuple[int, int] = (85, 95)) -> Path:
    """The folder `source` (split/class/*.jpg) again, each image upscaled (upscale_to_photo) and saved
    as JPEG at a random quality in `quality`, into out/<source name with -32px → -photos>."""
    root = out / source.name.replace("-32px", "-photos")
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed + 1)
    for path in sorted(source.rglob("*.jpg")):
        rel = path.relative_to(source)
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            photo = upscale_to_photo(image, rng, min_side, max_side)
        photo.save(target, "JPEG", quality=int(rng.integers(quality[0], quality[1] + 1)))
    return root


# ---------------------------------------------------------------------------- Debian packages

def deb_members(deb: Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each file in a .deb's data.tar.* (ar archive; no dpkg needed)."""
    raw = deb.read_bytes()
    if raw[:8] != b"!<arch>\n":
        raise ValueError(f"{deb}: not a Debian package")
    pos = 8
    while pos < len(raw):
        header = raw[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = raw[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            if name.endswith(".xz"):
                body = lzma.decompress(body)
            elif name.endswith(".gz"):
                body = gzip.decompress(body)
            elif name.endswith(".zst"):
                import zstandard  # only for packages built with zstd (Ubuntu); Debian 12 uses xz

                body = zstandard.ZstdDecompressor().decompress(body, max_output_size=1 << 32)
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                for member in tar:
                    if member.isfile():
                        yield member.name.lstrip("./"), tar.extractfile(member).read()
            return
    raise ValueError(f"{deb}: no data.tar member")


def find_deb(name: str, debs: Path = DEFAULT_DEBS) -> Path | None:
    found = sorted(Path(debs).glob(f"{name}_*.deb")) if Path(debs).is_dir() else []
    return found[-1] if found else None


# ------------------------------------------------------------------------------ Fashion-MNIST

def read_idx(data: bytes) -> np.ndarray:
    """An idx file (MNIST's format), gzipped or not, as a uint8 array."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    if magic >> 8 != 0x08:
        raise ValueError(f"idx type {magic >> 8:#x}: only unsigned bytes are handled")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_raw(source: str | os.PathLike | None = None, debs: Path = DEFAULT_DEBS) -> dict[str, bytes] | None:
    """The four Fashion-MNIST idx files, uncompressed and checked, from `source` (a folder with the
    .gz or raw files, or a dataset-fashion-mnist .deb), else Debian's installed folder, else a .deb in
    `debs`; None where none is found. Raises if a file is there but its MD5 is wrong."""
    candidates: list[Path] = [Path(source)] if source else []
    candidates += [FASHION_DEBIAN_DIR]
    deb = find_deb("dataset-fashion-mnist", debs)
    if deb:
        candidates.append(deb)
    for place in candidates:
        files: dict[str, bytes] = {}
        if place.is_dir():
            for name in FASHION_RAW_MD5:
                for path in (place / name, place / f"{name}.gz", place / "FashionMNIST" / "raw" / name):
                    if path.is_file():
                        files[name] = path.read_bytes()
                        break
        elif place.suffix == ".deb" and place.is_file():
            for member, data in deb_members(place):
                base = Path(member).name
                if base.removesuffix(".gz") in FASHION_RAW_MD5 and "fashion-mnist" in member:
                    files[base.removesuffix(".gz")] = data
        if len(files) == len(FASHION_RAW_MD5):
            for name, data in files.items():
                raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
                if hashlib.md5(raw).hexdigest() != FASHION_RAW_MD5[name]:
                    raise ValueError(f"{place}: {name} has MD5 {hashlib.md5(raw).hexdigest()}, "
                                     f"expected {FASHION_RAW_MD5[name]}")
                files[name] = raw
            return files
    return None


def build_fashion_torchvision(out: Path, raw: dict[str, bytes]) -> Path:
    """out/FashionMNIST/raw/<4 idx files>: what torchvision.datasets.FashionMNIST(out, download=False)
    and classifier.data.load_data("fashion-mnist", data_dir=out, download=False) read."""
    folder = out / "FashionMNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in raw.items():
        (folder / name).write_bytes(data)
    return out


def grey28_from_cifar(files: list[tuple[str, str]]) -> np.ndarray:
    """The substitute for Fashion-MNIST: CIFAR images in grey (ITU-R 601-2 luma), shrunk to 28 px."""
    return np.stack([np.asarray(ImageOps.grayscale(Image.open(p).convert("RGB")).resize((28, 28), Image.BICUBIC))
                     for p, _ in files])


def build_grey_csv(out: Path, n_per_class: int = 100, seed: int = 0, raw: dict[str, bytes] | None = None,
                   archive: str | os.PathLike = DEFAULT_CIFAR) -> Path:
    """The apparel-tutorial layout: <name>/train.csv (id,label; label = class index), <name>/train/<id>.png
    (28x28 grey), <name>/classes.txt (index<TAB>name). From Fashion-MNIST's test split where `raw` is
    given, else from CIFAR-10's test split (grey, 28 px) as a substitute."""
    rng = np.random.default_rng(seed + 2)
    if raw is not None:
        name, classes = "fashion-mnist-csv", FASHION_CLASSES
        images = read_idx(raw["t10k-images-idx3-ubyte"])
        labels = read_idx(raw["t10k-labels-idx1-ubyte"]).astype(int)
        idx = np.concatenate([np.sort(rng.choice(np.flatnonzero(labels == k), n_per_class, replace=False))
                              for k in range(10)])
        images, labels = images[idx], labels[idx]
    else:
        name, classes = "cifar10-grey28-csv", CIFAR_CLASSES
        chosen = pick_per_class(cifar_files(archive)["test"], CIFAR_CLASSES, n_per_class, rng)
        images = grey28_from_cifar(chosen)
        labels = np.asarray([CIFAR_CLASSES.index(c) for _, c in chosen])
    root = out / name
    shutil.rmtree(root, ignore_errors=True)
    (root / "train").mkdir(parents=True)
    order = rng.permutation(len(labels))  # ids in shuffled order, as the tutorial's CSV has them
    with open(root / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "label"])
        for number, i in enumerate(order, start=1):
            Image.fromarray(images[i], "L").save(root / "train" / f"{number}.png")
            writer.writerow([number, int(labels[i])])
    (root / "classes.txt").write_text("".join(f"{k}\t{c}\n" for k, c in enumerate(classes)))
    return root


# ------------------------------------------------------------------------------ Hugging Face

HF_CHECK = r"""
import json, sys
import datasets
from datasets import ClassLabel, Image, load_dataset, load_from_disk
assert datasets.config.HF_DATASETS_OFFLINE and datasets.config.HF_HUB_OFFLINE
saved, folder = sys.argv[1], sys.argv[2]
report = {"datasets": datasets.__version__}
for how, dd in (("load_from_disk", load_from_disk(saved)), ("imagefolder", load_dataset("imagefolder", data_dir=folder))):
    split = next(iter(dd.values()))
    image_col = [k for k, v in split.features.items() if isinstance(v, Image)]
    label_col = [k for k, v in split.features.items() if isinstance(v, ClassLabel)]
    report[how] = {"splits": {k: len(v) for k, v in dd.items()}, "image_column": image_col, "label_column": label_col,
                   "names": split.features[label_col[0]].names, "first": list(split[0]["image"].size)}
print(json.dumps(report))
"""


def build_hf_dataset(folder: Path, out: Path) -> tuple[Path, dict]:
    """out/hf-<folder name>: a DatasetDict (train, validation) of `folder` (split/class/images) with
    an Image() column holding the JPEG bytes and a ClassLabel; then load it back, and `folder` through
    load_dataset("imagefolder"), in a child process that is offline (HF_*_OFFLINE=1)."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as HFImage

    classes = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
    features = Features({"image": HFImage(), "label": ClassLabel(names=classes)})
    splits = {}
    for split, hf_name in (("train", "train"), ("val", "validation")):
        paths = sorted((folder / split).rglob("*.jpg"))
        splits[hf_name] = Dataset.from_dict(
            {"image": [str(p) for p in paths], "label": [classes.index(p.parent.name) for p in paths]},
            features=features)
    target = out / f"hf-{folder.name}"
    shutil.rmtree(target, ignore_errors=True)
    DatasetDict(splits).save_to_disk(str(target))  # embeds the image bytes: target works without folder
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    env.setdefault("HF_HOME", str(out / ".hf-home"))
    done = subprocess.run([sys.executable, "-c", HF_CHECK, str(target), str(folder)], env=env, check=True,
                          capture_output=True, text=True)
    return target, json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- real photographs

@dataclass
class Photo:
    """One photograph found offline. relation: "cifar" (shows one of the ten classes: see `label`),
    "near" (an animal or vehicle that is none of them), "far" (anything else)."""

    name: str
    package: str
    path: str
    relation: str
    label: str = ""
    what: str = ""
    licence: str = ""
    load: Callable[[], bytes] = field(default=None, repr=False)


def package_file(dist: str, relpath: str, wheels: Path = DEFAULT_WHEELS) -> Callable[[], bytes] | None:
    """A reader for `relpath` inside the installed distribution `dist`, else inside its wheel in
    `wheels` (`pip download --no-deps -d WHEELS dist`); None where neither has it."""
    try:
        for f in importlib.metadata.files(dist) or []:
            if str(f) == relpath and Path(f.locate()).is_file():
                return lambda f=f: Path(f.locate()).read_bytes()
    except importlib.metadata.PackageNotFoundError:
        pass
    stem = dist.replace("-", "_").lower()
    for whl in sorted(Path(wheels).glob("*.whl")) if Path(wheels).is_dir() else []:
        if whl.name.lower().startswith(stem + "-"):
            with zipfile.ZipFile(whl) as z:
                if relpath in z.namelist():
                    return lambda whl=whl: zipfile.ZipFile(whl).read(relpath)
    return None


def dist_version(dist: str, wheels: Path = DEFAULT_WHEELS) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        stem = dist.replace("-", "_").lower()
        for whl in sorted(Path(wheels).glob("*.whl")) if Path(wheels).is_dir() else []:
            if whl.name.lower().startswith(stem + "-"):
                return whl.name.split("-")[1] + " (wheel)"
    return ""


# (package, path in it, relation, CIFAR label, what it shows, licence as the package states it)
PACKAGE_PHOTOS = [
    ("scikit-image", "skimage/data/chelsea.png", "cifar", "cat", "Chelsea, a tabby cat (= assets/examples/cat.jpg)", "CC0"),
    ("scikit-image", "skimage/data/astronaut.png", "far", "", "astronaut Eileen Collins, portrait", "public domain (NASA)"),
    ("scikit-image", "skimage/data/coffee.png", "far", "", "a cup of coffee on a saucer", "CC0"),
    ("scikit-image", "skimage/data/rocket.jpg", "far", "", "Falcon 9 on the launch pad at night", "public domain (SpaceX)"),
    ("scikit-image", "skimage/data/motorcycle_left.png", "near", "", "a motorcycle in a garage (vehicle, not car)", "Middlebury stereo 2014 (no licence stated)"),
    ("scikit-image", "skimage/data/horse.png", "near", "horse", "black horse silhouette on white (not a photo)", "CC0"),
    ("scikit-image", "skimage/data/camera.png", "far", "", "man with a camera on a tripod (grey)", "CC0"),
    ("scikit-image", "skimage/data/coins.png", "far", "", "Greek coins (grey)", "no known restrictions"),
    ("scikit-image", "skimage/data/moon.png", "far", "", "surface of the moon (grey)", "no licence stated"),
    ("scikit-image", "skimage/data/hubble_deep_field.jpg", "far", "", "Hubble deep field", "public domain (NASA)"),
    ("scikit-image", "skimage/data/ihc.png", "far", "", "immunohistochemistry micrograph", "no known restrictions"),
    ("scikit-image", "skimage/data/retina.jpg", "far", "", "retina fundus photograph", "CC0"),
    ("scikit-image", "skimage/data/brick.png", "far", "", "brick wall texture (grey)", "CC0"),
    ("scikit-image", "skimage/data/grass.png", "far", "", "grass texture (grey)", "CC0"),
    ("scikit-image", "skimage/data/gravel.png", "far", "", "gravel texture (grey)", "CC0"),
    ("scikit-image", "skimage/data/clock_motion.png", "far", "", "wall clock, motion blurred (grey)", "public domain"),
    ("scikit-image", "skimage/data/page.png", "far", "", "scanned printed page (grey)", "no licence stated"),
    ("scikit-image", "skimage/data/text.png", "far", "", "photographed text (grey)", "public domain"),
    ("scikit-image", "skimage/data/cell.png", "far", "", "cell micrograph (grey)", "CC0"),
    ("scikit-learn", "sklearn/datasets/images/china.jpg", "far", "", "a Chinese temple building", "CC BY 2.0 (danielbuechele)"),
    ("scikit-learn", "sklearn/datasets/images/flower.jpg", "far", "", "a flower close-up", "CC BY 2.0 (vultilion)"),
    ("matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg", "far", "", "Grace Hopper, portrait", "public domain (US Navy)"),
    ("gradio", "gradio/media_assets/images/cheetah.jpg", "near", "", "a running cheetah", "Apache-2.0 package; photo uncredited"),
    ("gradio", "gradio/media_assets/images/cheetah1.jpg", "near", "", "a cheetah's face", "Apache-2.0 package; photo uncredited"),
    ("gradio", "gradio/test_data/cheetah2.jpg", "near", "", "a cheetah cub on a fake-transparent checkerboard", "Apache-2.0 package; photo uncredited"),
    ("gradio", "gradio/media_assets/images/lion.jpg", "near", "", "a lion lying on a rock", "Apache-2.0 package; photo uncredited"),
    ("gradio", "gradio/media_assets/images/tower.jpg", "far", "", "the Eiffel tower at night", "Apache-2.0 package; photo uncredited"),
    ("gradio", "gradio/media_assets/images/groot.jpeg", "far", "", "a CGI film character (Groot)", "Apache-2.0 package; film still, uncredited"),
]

# GCompris (Debian gcompris-qt-data 3.1-2): activity folder -> {file stem: CIFAR label}; every other
# photo there is "near" (animals) or "far" (monuments, tools, energy, objects). The credits are in the
# README beside each photo inside the same .rcc file.
GCOMPRIS_CIFAR = {
    "bird": ["kingfisher", "heron", "toucan", "spoonbills", "swans", "northern_harrier", "gosling", "penguin",
             "chicken", "duck", "owl", "scarlet_macaw"],
    "cat": ["kitten", "cat"], "dog": ["dog"], "horse": ["horse"], "deer": ["moose"],
}
GCOMPRIS_FOLDERS = {  # folder inside the .rcc -> relation of the photos in it that are no CIFAR class
    "erase/resource": "near", "explore_farm_animals/resource/animals": "near",
    "explore_world_animals/resource/animals": "near", "categorization/resource/images/fishes": "near",
    "categorization/resource/images/monuments": "far", "categorization/resource/images/tools": "far",
    "categorization/resource/images/renewable": "far", "categorization/resource/images/others": "far",
    "explore_monuments/resource": "far",
}
# already in assets/examples (the same photograph, resized): kept, but marked
IN_EXAMPLES = {("explore_farm_animals", "dog"), ("erase", "horse"), ("erase", "kingfisher")}


def read_rcc(data: bytes) -> dict[str, bytes]:
    """{path: bytes} of a Qt binary resource file (.rcc, format versions 1-3; zlib-compressed entries)."""
    if data[:4] != b"qres":
        raise ValueError("not a Qt resource file")
    version, tree, payload, names = struct.unpack(">4I", data[4:20])
    entry = 14 if version == 1 else 22
    out: dict[str, bytes] = {}

    def name(offset: int) -> str:
        length, = struct.unpack(">H", data[names + offset:names + offset + 2])
        return data[names + offset + 6:names + offset + 6 + 2 * length].decode("utf-16-be")

    def walk(index: int, prefix: str) -> None:
        pos = tree + index * entry
        name_offset, flags = struct.unpack(">IH", data[pos:pos + 6])
        label = name(name_offset) if index else ""
        if flags & 2:  # directory
            count, first = struct.unpack(">II", data[pos + 6:pos + 14])
            for child in range(first, first + count):
                walk(child, f"{prefix}{label}/")
            return
        offset, = struct.unpack(">I", data[pos + 10:pos + 14])
        start = payload + offset
        size, = struct.unpack(">I", data[start:start + 4])
        blob = data[start + 4:start + 4 + size]
        if flags & 1:
            blob = zlib.decompress(blob[4:])
        elif flags & 4:
            return  # zstd: not used by Debian 12's GCompris
        out[prefix + label] = blob

    walk(0, "")
    return out


def parse_credits(text: str) -> dict[str, str]:
    """{file name: "author; licence"} from a GCompris resource README (Copyright/License/Files blocks)."""
    credits: dict[str, str] = {}
    for block in re.split(r"\n\s*\n", text):
        author = re.search(r"^Copyright:\s*(.+)$", block, re.M)
        licence = re.search(r"^License:\s*(.+)$", block, re.M)
        files = re.search(r"^Files:\s*(.*(?:\n(?!\w+:).*)*)", block, re.M)
        if licence and files:
            for f in files.group(1).split():
                credits[f.strip()] = f"{licence.group(1).strip()}; {author.group(1).strip() if author else '?'}"
    return credits


def gcompris_rcc_files(gcompris: str | os.PathLike | None = None, debs: Path = DEFAULT_DEBS
                       ) -> tuple[dict[str, bytes], str]:
    """({rcc file name: bytes}, where from) from a folder of .rcc files, a gcompris-qt-data .deb,
    Debian's installed folder, or a .deb in `debs`; ({}, "") where none is found."""
    wanted = {f"{folder.split('/')[0]}.rcc" for folder in GCOMPRIS_FOLDERS}
    places = [Path(gcompris)] if gcompris else []
    places += [GCOMPRIS_DEBIAN_DIR]
    deb = find_deb("gcompris-qt-data", debs)
    if deb:
        places.append(deb)
    for place in places:
        if place.is_dir() and all((place / w).is_file() for w in wanted):
            return {w: (place / w).read_bytes() for w in wanted}, f"gcompris-qt-data ({place})"
        if place.suffix == ".deb" and place.is_file():
            found = {Path(m).name: d for m, d in deb_members(place) if Path(m).name in wanted}
            if len(found) == len(wanted):
                return found, f"gcompris-qt-data {place.name.split('_')[1]}"
    return {}, ""


def gcompris_photos(gcompris=None, debs: Path = DEFAULT_DEBS) -> list[Photo]:
    photos, seen = [], set()
    rcc_files, package = gcompris_rcc_files(gcompris, debs)
    for rcc_name, data in sorted(rcc_files.items()):
        files = read_rcc(data)
        credits: dict[str, str] = {}
        for path, blob in files.items():
            if path.endswith("/README"):
                credits.update(parse_credits(blob.decode("utf-8", "replace")))
        for path, blob in sorted(files.items()):
            folder = path.removeprefix("/gcompris/src/activities/").rsplit("/", 1)[0]
            relation = next((r for f, r in GCOMPRIS_FOLDERS.items() if folder == f or folder.startswith(f + "/")), None)
            if relation is None or not path.endswith((".webp", ".jpg", ".jpeg")):
                continue
            digest = hashlib.sha1(blob).hexdigest()
            if digest in seen:  # the same monument in two activities
                continue
            seen.add(digest)
            stem, activity = Path(path).stem, folder.split("/")[0]
            animals = relation == "near" and "fishes" not in folder
            label = next((c for c, stems in GCOMPRIS_CIFAR.items() if animals and stem in stems), "")
            below_resource = path.split("/resource/", 1)[-1]  # "wonders/petra.webp" in explore_monuments
            credit = credits.get(Path(path).name) or credits.get(below_resource, "")
            what = stem.replace("_", " ") + (" (= assets/examples)" if (activity, stem) in IN_EXAMPLES else "")
            photos.append(Photo(f"gcompris-{activity}-{stem}", package, path,
                                "cifar" if label else relation, label, what, credit, lambda b=blob: b))
    return photos


def offline_photos(wheels: Path = DEFAULT_WHEELS, debs: Path = DEFAULT_DEBS, gcompris=None) -> list[Photo]:
    """Every photograph this machine can offer offline (see PACKAGE_PHOTOS, gcompris_photos)."""
    photos = []
    for package, path, relation, label, what, licence in PACKAGE_PHOTOS:
        loader = package_file(package, path, wheels)
        if loader is not None:
            version = dist_version(package, wheels)
            photos.append(Photo(f"{package}-{Path(path).stem}", f"{package} {version}", path, relation, label,
                                what, licence, loader))
    return photos + gcompris_photos(gcompris, debs)


def build_photo_catalogue(out: Path, photos: list[Photo]) -> Path:
    """out/offline-photos/<relation>/<name>.png (as decoded, RGB or L) and manifest.csv."""
    from classifier.images import open_image

    root = out / "offline-photos"
    shutil.rmtree(root, ignore_errors=True)
    rows = []
    for photo in photos:
        image = open_image(photo.load(), channels=3)
        target = root / photo.relation / f"{photo.name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target)
        rows.append([photo.name, photo.relation, photo.label, photo.what, f"{image.width}x{image.height}",
                     photo.package, photo.path, photo.licence])
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "relation", "cifar_label", "what", "size", "package", "path", "licence"])
        writer.writerows(rows)
    return root


# ----------------------------------------------------------------------------------------- CLI

STEPS = ("cifar32", "photos", "grey", "fashion-raw", "hf", "catalogue")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--classes", nargs="+", default=["cat", "dog"])
    parser.add_argument("--train-per-class", type=int, default=150)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--grey-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cifar", default=str(DEFAULT_CIFAR), help="the CIFAR-10 JPEG copy (.tar.gz or folder)")
    parser.add_argument("--fashion", default=None, help="folder or .deb with the Fashion-MNIST idx files")
    parser.add_argument("--gcompris", default=None, help="folder of .rcc files or gcompris-qt-data .deb")
    parser.add_argument("--wheels", type=Path, default=DEFAULT_WHEELS)
    parser.add_argument("--debs", type=Path, default=DEFAULT_DEBS)
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in steps if s not in STEPS]
    if bad:
        parser.error(f"unknown step(s) {bad}; choose from {STEPS}")
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    native = args.out / f"cifar-{'-'.join(args.classes)}-32px"
    if "cifar32" in steps or ("photos" in steps and not native.is_dir()):
        native = build_cifar_subset(args.out, args.classes, args.train_per_class, args.val_per_class, args.seed,
                                    args.cifar)
        summary["cifar32"] = {"path": str(native), "files": len(list(native.rglob("*.jpg")))}
    photos_dir = args.out / native.name.replace("-32px", "-photos")
    if "photos" in steps or ("hf" in steps and not photos_dir.is_dir()):
        photos_dir = build_mixed_photos(native, args.out, args.seed)
        sizes = [Image.open(p).size for p in sorted(photos_dir.rglob("*.jpg"))]
        summary["photos"] = {"path": str(photos_dir), "files": len(sizes),
                             "width": [min(s[0] for s in sizes), max(s[0] for s in sizes)],
                             "height": [min(s[1] for s in sizes), max(s[1] for s in sizes)]}
    raw = fashion_mnist_raw(args.fashion, args.debs) if {"grey", "fashion-raw"} & set(steps) else None
    if "grey" in steps:
        root = build_grey_csv(args.out, args.grey_per_class, args.seed, raw, args.cifar)
        summary["grey"] = {"path": str(root), "source": "Fashion-MNIST test split" if raw else
                           "substitute: CIFAR-10 test split, grey, 28 px", "files": len(list(root.glob("train/*.png")))}
    if "fashion-raw" in steps:
        if raw is None:
            summary["fashion-raw"] = "Fashion-MNIST not found (apt-get install dataset-fashion-mnist, or --fashion)"
        else:
            build_fashion_torchvision(args.out, raw)
            from torchvision.datasets import FashionMNIST

            test = FashionMNIST(str(args.out), train=False, download=False)
            summary["fashion-raw"] = {"path": str(args.out / "FashionMNIST" / "raw"), "train": 60000,
                                      "test": len(test), "md5": "checked"}
    if "hf" in steps:
        target, report = build_hf_dataset(photos_dir, args.out)
        summary["hf"] = {"path": str(target), **report}
    if "catalogue" in steps:
        photos = offline_photos(args.wheels, args.debs, args.gcompris)
        root = build_photo_catalogue(args.out, photos)
        counts: dict[str, int] = {}
        for p in photos:
            key = f"{p.relation}:{p.label}" if p.label else p.relation
            counts[key] = counts.get(key, 0) + 1
        summary["catalogue"] = {"path": str(root), "photos": len(photos), "by_relation": counts,
                                "packages": sorted({p.package for p in photos})}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
