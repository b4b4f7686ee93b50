"""classifier.data: every source, the splits, statistics, transforms and user-facing errors."""

import logging
import shutil
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from classifier.data import (ImageDataset, Split, channel_stats, collate_skipping_broken, load_data, materialize,
                             materialize_small, stratified_split)
from classifier.errors import DataError
from classifier.transforms import eval_transform, train_transform
from tests.conftest import CLASSES, make_image_folder, preprocessing


def test_flat_folder_is_split_stratified_and_reproducible(image_folder):
    data = load_data(str(image_folder), val_fraction=0.2, test_fraction=0.25, seed=3)
    assert data.classes == list(CLASSES)
    assert (len(data.train), len(data.val), len(data.test)) == (36, 9, 15)
    for split in (data.train, data.val, data.test):  # every class in every split, in proportion
        assert np.bincount(split.targets).tolist() == [len(split) // 3] * 3
    again = load_data(str(image_folder), val_fraction=0.2, test_fraction=0.25, seed=3)
    assert again.val.items == data.val.items and again.test.items == data.test.items
    other = load_data(str(image_folder), val_fraction=0.2, test_fraction=0.25, seed=4)
    assert other.val.items != data.val.items
    assert not set(data.train.items) & set(data.val.items) | set(data.test.items) & set(data.train.items)


def test_stratified_split_keeps_every_class_in_both_parts():
    targets = np.array([0] * 50 + [1] * 5)
    kept, held = stratified_split(targets, 0.2, seed=0)
    assert np.bincount(targets[held]).tolist() == [10, 1]
    assert len(kept) + len(held) == 55 and not set(kept) & set(held)


def test_split_folders_are_used_as_given(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=10, splits=("train", "test"))
    data = load_data(str(root), val_fraction=0.2)
    assert len(data.test) == 30 and all("/test/" in p for p in data.test.items)
    assert len(data.train) + len(data.val) == 30 and all("/train/" in p for p in data.val.items)


def test_class_subset_is_relabelled_in_the_given_order(image_folder):
    data = load_data(str(image_folder), classes=["triangle", "circle"])
    assert data.classes == ["triangle", "circle"]
    assert set(np.unique(data.train.targets)) == {0, 1}
    label_of = {p: t for p, t in zip(data.train.items, data.train.targets)}
    assert all(("triangle" in p) == (t == 0) for p, t in label_of.items())


def test_archive_is_unpacked_once(tmp_path):
    root = make_image_folder(tmp_path / "src", per_class=6, splits=("train", "test"))
    archive = tmp_path / "cifar-like.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "train", arcname="train")
        tar.add(root / "test", arcname="test")
    data = load_data("cifar10", data_dir=str(archive))  # the built-in name with an ImageFolder copy
    assert data.name == "cifar10" and data.classes == list(CLASSES) and len(data.test) == 18
    assert load_data(str(archive)).classes == list(CLASSES)  # the archive as --data works too


def test_all_common_formats_sizes_and_modes(tmp_path):
    root = tmp_path / "mixed"
    rng = np.random.default_rng(0)
    makers = {
        "a.jpg": lambda: Image.new("RGB", (50, 30), (200, 0, 0)),
        "b.png": lambda: Image.new("RGBA", (20, 20), (0, 200, 0, 128)),
        "c.bmp": lambda: Image.new("L", (64, 64), 90),
        "d.gif": lambda: Image.new("P", (16, 24), 3),
        "e.webp": lambda: Image.new("RGB", (33, 17), (5, 5, 5)),
        "f.png": lambda: Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)),
        "g.jpeg": lambda: Image.new("CMYK", (30, 30), (10, 20, 30, 0)),
    }
    for cls in ("one", "two"):
        (root / cls).mkdir(parents=True)
        for name, make in makers.items():
            make().save(root / cls / name)
    data = load_data(str(root), val_fraction=0.0, test_fraction=0.3)
    assert len(data.train) + len(data.test) == 14 and not data.skipped
    transform = train_transform(preprocessing(32), small=True)
    dataset = ImageDataset(data.train, transform)
    for i in range(len(dataset)):
        x, y, index = dataset[i]
        assert x.shape == (3, 32, 32) and index == i


def test_broken_files_are_skipped_and_named(tmp_path, caplog):
    root = make_image_folder(tmp_path / "d", per_class=8)
    (root / "circle" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "square" / "empty.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        data = load_data(str(root))
    assert len(data.skipped) == 2
    assert any("broken.png" in s for s in data.skipped) and any("empty.jpg" in s for s in data.skipped)
    assert "broken.png" in caplog.text and "empty.jpg" in caplog.text
    every = list(data.train.items) + list(data.val.items) + list(data.test.items)
    assert len(every) == 24 and not {"broken.png", "empty.jpg"} & {p.rsplit("/", 1)[1] for p in every}


def test_image_truncated_after_scan_is_skipped_in_the_batch(tmp_path, caplog):
    root = make_image_folder(tmp_path / "d", per_class=4)
    data = load_data(str(root), val_fraction=0.0, test_fraction=0.25)
    victim = data.train.items[0]
    content = open(victim, "rb").read()
    open(victim, "wb").write(content[: len(content) // 3])  # header still parses, pixels do not
    dataset = ImageDataset(data.train, eval_transform(preprocessing(32)))
    with caplog.at_level(logging.WARNING):
        batch = collate_skipping_broken([dataset[i] for i in range(len(dataset))])
    assert batch[0].shape[0] == len(dataset) - 1 and 0 not in batch[2].tolist()
    assert victim in caplog.text


def _one_class(root):
    make_image_folder(root, per_class=3)
    shutil.rmtree(root / "square")
    shutil.rmtree(root / "triangle")


def _empty_class(root):
    make_image_folder(root, per_class=3)
    (root / "empty_class").mkdir()


@pytest.mark.parametrize("setup, message", [
    (_one_class, "at least two classes"),
    (_empty_class, "'empty_class' holds no images"),
    (lambda root: None, "no such file or directory"),
])
def test_clear_errors_for_bad_folders(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=message):
        load_data(str(root))


def test_unknown_class_in_subset(image_folder):
    with pytest.raises(DataError, match="unknown class"):
        load_data(str(image_folder), classes=["circle", "hexagon"])


def _write_csv_dataset(root, rows):
    make_image_folder(root / "src", per_class=6)
    (root / "images").mkdir(parents=True)
    lines = ["id,label"]
    for n, (kind, label) in enumerate(rows):
        src = sorted((root / "src" / kind).iterdir())[n % 6]
        (root / "images" / f"{n}.png").write_bytes(src.read_bytes())
        lines.append(f"{n},{label}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root / "train.csv"


def test_csv_of_ids_and_labels(tmp_path):
    rows = [("circle", 0), ("square", 1), ("triangle", 2)] * 6
    csv_path = _write_csv_dataset(tmp_path, rows)
    data = load_data(str(csv_path), image_dir=str(tmp_path / "images"), val_fraction=0.2, test_fraction=0.2)
    assert data.classes == ["0", "1", "2"]
    assert len(data.train) + len(data.val) + len(data.test) == 18
    for path, target in zip(data.train.items, data.train.targets):
        assert rows[int(path.rsplit("/", 1)[1].split(".")[0])][1] == target


def test_csv_with_unknown_ids_names_them(tmp_path):
    csv_path = _write_csv_dataset(tmp_path, [("circle", "a"), ("square", "b")] * 3)
    with open(csv_path, "a") as f:
        f.write("999,a\n1000,b\n")
    with pytest.raises(DataError, match=r"2 id\(s\) have no image.*999, 1000"):
        load_data(str(csv_path), image_dir=str(tmp_path / "images"))


def _write_idx(path, array: np.ndarray):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_idx_files(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    data = load_data("fashion-mnist", data_dir=str(tmp_path), val_fraction=0.25)
    assert data.channels == 1 and data.num_classes == 10 and data.classes[0] == "T-shirt/top"
    assert data.train.items.shape[1:] == (28, 28) and len(data.test) == 20 and len(data.val) == 10
    assert data.is_small


def test_channel_stats_match_numpy():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)

    mean, std = channel_stats(Split(images, np.zeros(30, np.int64)), 3)
    expected = images.reshape(-1, 3) / 255.0
    assert np.allclose(mean, expected.mean(0), atol=1e-6) and np.allclose(std, expected.std(0), atol=1e-6)


def test_materialize_decodes_once_and_caches(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "d", per_class=5)
    data = load_data(str(root), val_fraction=0.2, test_fraction=0.2)
    first, skipped = materialize(data.train, channels=3)
    assert first.items.shape == (len(data.train), 32, 32, 3) and skipped == []
    assert np.array_equal(np.asarray(Image.open(data.train.items[0]).convert("RGB")), first.items[0])
    assert materialize_small(data).test.in_memory
    import classifier.data as data_module

    monkeypatch.setattr(data_module, "open_image", lambda *a, **k: pytest.fail("cache was not used"))
    cached, _ = materialize(data.train, channels=3)
    assert np.array_equal(cached.items, first.items) and np.array_equal(cached.targets, first.targets)
    assert materialize_small(data).val.in_memory  # every split now comes from the cache


def test_materialize_passes_an_empty_split_and_names_a_split_it_cannot_read(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=5)
    data = materialize_small(load_data(str(root), val_fraction=0.0, test_fraction=0.2))
    assert len(data.val) == 0 and data.train.in_memory and data.test.in_memory
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="none of the 1 image"):
        materialize(Split([str(broken)], np.zeros(1, np.int64)), channels=3)


def test_transforms_augment_only_for_training():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    train = train_transform(preprocessing(32), small=True)
    evaluation = eval_transform(preprocessing(32))
    assert torch.equal(evaluation(image), evaluation(image))
    torch.manual_seed(0)
    assert any(not torch.equal(train(image), evaluation(image)) for _ in range(5))
    photo = eval_transform(preprocessing(64, crop_pct=0.875))
    assert photo(image.resize((200, 120))).shape == (3, 64, 64)
