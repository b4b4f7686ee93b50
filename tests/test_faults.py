"""Fault injection: each fault a user or a machine can cause, and what the project must do about it.

Every test reproduces one fault (a race on the cache, a damaged file, a bad CSV, a changed setting on
--resume, a full disk, a collapsed run, a hostile bundle, ...) and checks the outcome: the run goes
right, or it ends in one `error:` line that names the file or setting and the remedy, and nothing
good is lost. The slow faults (a stopped torchrun rank, a real full disk and a read-only folder
on a small tmpfs, the app's memory under floods of uploads) are in benchmarks/faults.py.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import multiprocessing
import os
import pickle
import re
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from classifier.bundle import CONFIG_FILE, WEIGHTS_FILE, load_bundle, make_config, save_bundle
from classifier.cli import predict as predict_cli
from classifier.cli import train as train_cli
from classifier.config import RunConfig, TrainConfig
from classifier.data import load_data, materialize, materialize_small
from classifier.errors import BundleError, DataError, TrainingDiverged, UserError
from classifier.loop import LAST_CHECKPOINT, fit
from classifier.models import create_model
from classifier.run import run
from tests.conftest import CLASSES, draw_shape, make_image_folder

# The small run most faults need: a 1-epoch fast_cnn of widths [8, 16] on 30 shapes (about a second).
MODEL_ARGS = '{"widths": [8, 16]}'


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--model", "fast_cnn", "--model-args", MODEL_ARGS, "--epochs", "1",
            "--batch-size", "8", "--lr", "0.05", "--workers", "0", "--mistakes", "0", "--out", str(out), *extra]


def one_error_line(capsys, code: int) -> str:
    """The `error:` line a command printed, checked to be the whole of stderr, with exit status 2."""
    err = capsys.readouterr().err
    assert code == 2, err
    progress = re.compile(r"^\s*epoch \d+/\d+: ")  # tqdm's bars, which a terminal overwrites
    lines = [line for line in err.splitlines() if line.strip() and not progress.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("faults") / "shapes", per_class=10)


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory) -> Path:
    """A finished 1-epoch run: OUT with last.pt, config.yaml and bundle/."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert train_cli.main(train_args(shapes, out)) == 0
    return out


# ----------------------------------------------------------------------------------------------
# Caches: the unpacked archive and the decoded images


def _make_archive(tmp_path: Path, per_class: int) -> Path:
    root = make_image_folder(tmp_path / "src", per_class=per_class, size=8, splits=("train", "test"))
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "train", arcname="train")
        tar.add(root / "test", arcname="test")
    return archive


def _count_images(archive: str, cache: str, queue) -> None:
    os.environ["CLASSIFIER_CACHE"] = cache
    try:
        data = load_data(archive, val_fraction=0.1)
        queue.put(len(data.train) + len(data.val) + len(data.test))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
        queue.put(f"{type(exc).__name__}: {exc}")


def test_processes_unpacking_one_archive_at_once_all_get_all_of_it(tmp_path):
    """Fault: runs started together on a fresh cache. Each must see the whole archive, and the
    cache must hold one complete copy and no half-written one."""
    archive = _make_archive(tmp_path, per_class=150)
    cache = tmp_path / "cache"
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_count_images, args=(str(archive), str(cache), queue)) for _ in range(3)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join()
    assert results == [900] * 3
    copies = [p for p in (cache / "archives").iterdir() if p.is_dir()]
    assert len(copies) == 1 and not copies[0].name.endswith(".partial")
    assert len(list(copies[0].rglob("*.png"))) == 900


def test_an_incomplete_unpacked_copy_is_unpacked_again(tmp_path, monkeypatch, caplog):
    """Fault: a cached copy marked complete but missing files (as the race above left it)."""
    monkeypatch.setenv("CLASSIFIER_CACHE", str(tmp_path / "cache"))
    archive = _make_archive(tmp_path, per_class=4)
    assert len(load_data(str(archive)).classes) == 3
    copy = next(p for p in (tmp_path / "cache" / "archives").iterdir() if p.is_dir())
    for path in list((copy / "train" / "circle").iterdir())[:2]:
        path.unlink()
    with caplog.at_level(logging.WARNING):
        data = load_data(str(archive))
    assert len(data.train) + len(data.val) + len(data.test) == 24
    assert "unpacking it again" in caplog.text


def test_a_damaged_decoded_image_cache_is_rebuilt_with_a_line_saying_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CLASSIFIER_CACHE", str(tmp_path / "cache"))
    data = load_data(str(make_image_folder(tmp_path / "d", per_class=5)), val_fraction=0.2, test_fraction=0.2)
    first, _ = materialize(data.train, channels=3)
    (cache,) = (tmp_path / "cache" / "decoded").glob("*.npz")
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])  # a copy cut short (a full disk, a kill)
    with caplog.at_level(logging.WARNING):
        again, _ = materialize(data.train, channels=3)
    assert np.array_equal(again.items, first.items) and np.array_equal(again.targets, first.targets)
    assert "decoding the images again" in caplog.text
    with np.load(cache) as f:  # and the rebuilt cache is whole
        assert f["images"].shape == first.items.shape


# ----------------------------------------------------------------------------------------------
# Image folders: the image size, empty classes


def test_one_tiny_image_first_does_not_shrink_every_photo(tmp_path, caplog):
    """Fault: a 1x1 PNG that sorts first in a folder of photos decided the size of all of them."""
    root = make_image_folder(tmp_path / "photos", per_class=6, size=96)
    Image.new("RGB", (1, 1), (255, 0, 0)).save(root / "circle" / "000-pixel.png")
    with caplog.at_level(logging.WARNING):
        data = load_data(str(root))
        size = data.image_size()
    assert size == (96, 96) and not data.is_small
    assert "000-pixel.png (1x1)" in caplog.text


def test_small_images_are_decoded_at_their_common_size_not_the_first_ones(tmp_path, caplog):
    root = make_image_folder(tmp_path / "small", per_class=6, size=32)
    draw_shape("circle", 48).save(root / "circle" / "000-large.png")
    with caplog.at_level(logging.WARNING):
        data = materialize_small(load_data(str(root), val_fraction=0.2, test_fraction=0.2))
    assert data.train.items.shape[1:] == (32, 32, 3)
    assert "000-large.png (48x48)" in caplog.text


def test_a_class_folder_of_unreadable_files_is_refused(tmp_path):
    """Fault: a folder whose every file is broken became a class with no images, exit 0."""
    root = make_image_folder(tmp_path / "d", per_class=5)
    (root / "ghost").mkdir()
    for i in range(3):
        (root / "ghost" / f"{i}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="class 'ghost' has no readable image"):
        load_data(str(root))


# ----------------------------------------------------------------------------------------------
# CSV of id,label


def _csv_folder(tmp_path: Path, per_class: int = 6) -> tuple[Path, list[tuple[str, str]]]:
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    rng = np.random.default_rng(0)
    for kind in CLASSES:
        for i in range(per_class):
            draw_shape(kind, 16, rng).save(images / f"{kind}{i}.png")
            rows.append((f"{kind}{i}", kind))
    return images, rows


def _write_csv(path: Path, rows, header="id,label", encoding="utf-8") -> Path:
    lines = [header] + [",".join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding=encoding)
    return path


def test_csv_duplicate_ids_are_refused_and_named(tmp_path):
    """Fault: a listed-twice image landed in two splits (train/test leakage), or under two labels."""
    images, rows = _csv_folder(tmp_path)
    csv_path = _write_csv(tmp_path / "labels.csv", rows + [("circle0", "square")])
    with pytest.raises(DataError, match=r"listed more than once.*'circle0' on lines 2 and 20 \(labelled circle and square\)"):
        load_data(str(csv_path), image_dir=str(images))


def test_csv_label_typo_is_refused_unless_the_classes_are_listed(tmp_path):
    """Fault: `shipp` for `ship` became a silent extra class."""
    images, rows = _csv_folder(tmp_path)
    rows[3] = (rows[3][0], "circel")
    csv_path = _write_csv(tmp_path / "labels.csv", rows)
    with pytest.raises(DataError, match=r"'circel' \(1 row: line 5\) looks like a typo of 'circle'"):
        load_data(str(csv_path), image_dir=str(images))
    # Listed as a class of its own, it is one: the user said so.
    data = load_data(str(csv_path), image_dir=str(images), classes=["circle", "circel", "square", "triangle"])
    assert data.classes == ["circle", "circel", "square", "triangle"]


@pytest.mark.parametrize("row, message", [
    (("circle0", ""), r"line 2: empty label"),
    (("circle0",), r"line 2: no label"),
    (("", "circle"), r"line 2: empty id"),
    (("circle0", "circle", "extra"), r"line 2: 3 fields, the header has 2"),
], ids=["empty label", "missing field", "empty id", "extra field"])
def test_csv_rows_without_a_usable_label_are_named(tmp_path, row, message):
    images, rows = _csv_folder(tmp_path)
    csv_path = _write_csv(tmp_path / "labels.csv", [row] + rows[1:])
    with pytest.raises(DataError, match=message):
        load_data(str(csv_path), image_dir=str(images))


def test_csv_saved_with_a_byte_order_mark_is_read(tmp_path):
    """Fault: "CSV UTF-8" as spreadsheets save it (a BOM first) was refused as a bad header."""
    images, rows = _csv_folder(tmp_path)
    csv_path = _write_csv(tmp_path / "labels.csv", rows, encoding="utf-8-sig")
    assert load_data(str(csv_path), image_dir=str(images)).classes == list(CLASSES)


def test_csv_in_latin1_is_refused_naming_the_line(tmp_path):
    images, rows = _csv_folder(tmp_path)
    (images / "café0.png").write_bytes((images / "circle0.png").read_bytes())
    csv_path = _write_csv(tmp_path / "labels.csv", rows + [("café0", "circle")], encoding="latin-1")
    with pytest.raises(DataError, match=r"not UTF-8 text: line 20 .*0xe9.*CSV UTF-8"):
        load_data(str(csv_path), image_dir=str(images))


# ----------------------------------------------------------------------------------------------
# --resume with other settings than the checkpoint's


@pytest.mark.parametrize("change, setting", [
    (["--epochs", "2"], "epochs 1 -> 2"),
    (["--batch-size", "4"], "batch_size 8 -> 4"),
    (["--model-args", '{"widths": [8, 8]}'], "model_args"),
    (["--model", "tutorial_cifar_cnn", "--model-args", "{}"], "model fast_cnn -> tutorial_cifar_cnn"),
    (["--optimizer", "adamw"], "optimizer sgd -> adamw"),
    (["--lr", "1e6"], "lr 0.05 -> 1e+06"),
], ids=["epochs-onecycle", "batch-size", "model-args", "model", "optimizer", "lr"])
def test_resume_with_other_settings_is_refused_naming_them(shapes, trained, tmp_path, capsys, change, setting):
    """Fault: these crashed after more training, or (--lr) silently kept the old rate while the
    bundle recorded the new one. Refused before anything is written, config.yaml untouched."""
    out = tmp_path / "run"
    out.mkdir()
    for name in (LAST_CHECKPOINT, "config.yaml"):
        (out / name).write_bytes((trained / name).read_bytes())
    capsys.readouterr()
    code = train_cli.main(train_args(shapes, out, "--resume") + change)
    line = one_error_line(capsys, code)
    assert setting in line and str(out / LAST_CHECKPOINT) in line
    assert (out / "config.yaml").read_bytes() == (trained / "config.yaml").read_bytes()
    assert not (out / "bundle").exists()


def test_a_larger_epochs_may_extend_a_cosine_run_and_is_recorded(shapes, tmp_path):
    out = tmp_path / "run"
    assert train_cli.main(train_args(shapes, out, "--schedule", "cosine")) == 0
    assert train_cli.main(train_args(shapes, out, "--schedule", "cosine", "--resume", "--epochs", "2")) == 0
    config = json.loads((out / "bundle" / CONFIG_FILE).read_text())
    # The resumed run takes the choices it recorded (classifier.auto), so only what was given changes.
    assert config["classifier"]["resumed"] == [{"at_epoch": 1, "changed": {"epochs": [1, 2]}}]
    assert config["classifier"]["training"]["epochs"] == 2


def _stop_after_checkpoint(monkeypatch, epoch: int):
    """Make fit() die right after the checkpoint of `epoch` is written (as a kill there would)."""
    import classifier.loop as loop

    written = loop._write_metrics

    def crash(out_dir, history):
        written(out_dir, history)
        if len(history) == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_write_metrics", crash)


def test_resume_is_exact_with_worker_processes(tmp_path, monkeypatch):
    """Fault: on the DataLoader path (photo folders) a resumed run's epoch 2 differed from an
    uninterrupted one: worker processes drew their augmentation from seeds of their own."""
    data = make_image_folder(tmp_path / "d", per_class=8, size=24)
    common = dict(data=str(data), model="fast_cnn", model_args={"widths": [8, 16], "drop_rate": 0.1}, epochs=3,
                  batch_size=8, lr=0.05, loader="workers", workers=2, mistakes=0, seed=1)
    whole = run(RunConfig(**common, out=str(tmp_path / "whole")))
    with monkeypatch.context() as patch:
        _stop_after_checkpoint(patch, epoch=1)
        with pytest.raises(KeyboardInterrupt):
            run(RunConfig(**common, out=str(tmp_path / "cut")))
    resumed = run(RunConfig(**common, out=str(tmp_path / "cut"), resume=True))
    assert [r["train_acc"] for r in resumed.history] == [r["train_acc"] for r in whole.history]
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in whole.history]


def test_a_sample_is_augmented_the_same_whatever_ran_before_it(shapes):
    """The root of the exact resume above: (index, epoch) alone decides a sample's augmentation, and
    the caller's random stream is left as it was."""
    from classifier.data import EpochSampler, ImageDataset
    from classifier.transforms import train_transform
    from tests.conftest import preprocessing

    data = load_data(str(shapes), val_fraction=0.2)
    dataset = ImageDataset(data.train, train_transform(preprocessing(32), small=False), seed=3)
    first = dataset[(4, 2)][0]
    torch.manual_seed(123)
    torch.rand(1000)  # another worker's history
    state = torch.get_rng_state()
    assert torch.equal(dataset[(4, 2)][0], first)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(dataset[(4, 3)][0], first)  # another epoch, another augmentation
    sampler = EpochSampler(dataset, num_replicas=1, rank=0, seed=0)
    sampler.set_epoch(5)
    assert {epoch for _, epoch in sampler} == {5} and sorted(i for i, _ in sampler) == list(range(len(dataset)))


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints, numbers gone bad, output folders, a full disk


def test_a_truncated_checkpoint_is_named_with_what_to_do(shapes, trained, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    whole = (trained / LAST_CHECKPOINT).read_bytes()
    (out / LAST_CHECKPOINT).write_bytes(whole[: len(whole) // 2])
    capsys.readouterr()
    line = one_error_line(capsys, train_cli.main(train_args(shapes, out, "--resume")))
    assert str(out / LAST_CHECKPOINT) in line and "damaged" in line and "delete it" in line


def test_a_pickle_as_checkpoint_is_refused_without_suggesting_to_unpickle_it(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": {}, "note": Path("anything")}, out / LAST_CHECKPOINT)  # a Path: not plain data
    capsys.readouterr()
    line = one_error_line(capsys, train_cli.main(train_args(shapes, out, "--resume")))
    assert str(out / LAST_CHECKPOINT) in line and "weights_only" not in line and "delete it" in line


def test_a_batchnorm_statistic_gone_nan_stops_the_run_with_one_line(shapes, tmp_path):
    data = materialize_small(load_data(str(shapes), val_fraction=0.2))
    from tests.test_train import loaders

    torch.manual_seed(0)
    model = create_model("fast_cnn", num_classes=3, widths=(8, 16))
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))

    def overflow(module, args):  # the loss stays finite: training normalises with batch statistics
        norm.running_var.fill_(float("nan"))

    model.register_forward_pre_hook(overflow)
    with pytest.raises(TrainingDiverged, match=r"running_var.*NaN.*--lr"):
        fit(model, *loaders(data, batch_size=8), TrainConfig(epochs=1, lr=0.05), tmp_path / "run")
    assert not (tmp_path / "run" / LAST_CHECKPOINT).exists()


def test_an_out_that_is_a_file_is_refused_before_training(shapes, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    line = one_error_line(capsys, train_cli.main(train_args(shapes, out)))
    assert str(out) in line and "--out" in line
    assert out.read_text() == "mine"


def test_a_read_only_out_is_refused_before_training(shapes, tmp_path, capsys):
    """Fault: a read-only --out failed only after the first epoch. Root writes through permissions,
    so as root the folder is made read-only with a bind mount in a user namespace (unshare), and the
    command runs there."""
    import shutil
    import subprocess
    import sys

    out = tmp_path / "locked"
    out.mkdir()
    if os.geteuid() != 0:
        out.chmod(0o555)
        line = one_error_line(capsys, train_cli.main(train_args(shapes, out / "run")))
    else:
        assert shutil.which("unshare"), "as root, this test needs unshare (util-linux) for a read-only folder"
        command = (f"mount --bind {out} {out} && mount -o remount,ro,bind {out} && exec {sys.executable} -m classifier "
                   f"train " + " ".join(f"'{a}'" for a in train_args(shapes, out / "run")))
        result = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, timeout=300,
                                cwd=Path(__file__).resolve().parents[1],
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 2, result.stderr
        (line,) = [line for line in result.stderr.splitlines() if line.strip()]
        assert "epoch 1/" not in result.stdout + result.stderr  # refused before training
    assert line.startswith("error: ") and str(out / "run") in line and "not writable" in line


def _fill_the_disk(monkeypatch, after_calls: int = 0):
    """torch.save and safetensors' save_file write a little, then fail as they do on a full disk
    (as seen on a 1 MB tmpfs: benchmarks/faults.py does it for real): torch with a RuntimeError whose
    context is the OSError, safetensors with "(os error 28)". The first `after_calls` calls succeed."""
    import safetensors.torch
    from safetensors import SafetensorError

    calls = []

    def wrap(real, fail):
        def writer(obj, target, *args, **kwargs):
            calls.append(target)
            if len(calls) <= after_calls:
                return real(obj, target, *args, **kwargs)
            if hasattr(target, "write"):
                target.write(b"\0" * 100)
            else:
                Path(target).write_bytes(b"\0" * 100)
            fail()
        return writer

    def torch_fails():
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:  # raised here, the OSError is the RuntimeError's __context__, as in torch
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    def safetensors_fails():
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(torch, "save", wrap(torch.save, torch_fails))
    fake = wrap(safetensors.torch.save_file, safetensors_fails)
    monkeypatch.setattr(safetensors.torch, "save_file", fake)
    for module in ("classifier.bundle", "classifier.loop"):  # where main imported it by name
        monkeypatch.setattr(f"{module}.save_file", fake, raising=False)


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_last_good_one(shapes, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _fill_the_disk(monkeypatch, after_calls=2)  # epoch 1's best.safetensors and last.pt are written
    code = train_cli.main(train_args(shapes, out)[:-2] + ["--out", str(out), "--epochs", "2"])
    line = one_error_line(capsys, code)
    assert "no space left" in line and str(out) in line and "--resume" in line
    monkeypatch.undo()
    assert torch.load(out / LAST_CHECKPOINT, weights_only=True)["epoch"] == 0  # epoch 1's, whole
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_while_writing_the_bundle_is_one_line(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = create_model("fast_cnn", num_classes=3, widths=(8, 16))
    config = make_config(model, architecture="fast_cnn", label_names=list(CLASSES), model_args={"widths": [8, 16]},
                         input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear",
                         crop_pct=1.0)
    _fill_the_disk(monkeypatch)
    with pytest.raises(UserError, match=r"no space left on the device.*model.safetensors"):
        save_bundle(tmp_path / "bundle", model, config)
    assert not list((tmp_path / "bundle").iterdir())


# ----------------------------------------------------------------------------------------------
# Collapsed runs


def test_a_collapsed_run_is_warned_about_and_kept_off_a_good_bundle(shapes, tmp_path, caplog):
    """Fault: --lr 30 ended at chance (validation loss ln 3) and wrote its bundle, exit 0."""
    common = dict(data=str(shapes), model="fast_cnn", model_args={"widths": [8, 16]}, epochs=2, batch_size=8,
                  workers=0, mistakes=0, out=str(tmp_path / "run"))
    good = run(RunConfig(**common, lr=0.05))
    weights = (good.bundle_dir / WEIGHTS_FILE).read_bytes()
    with caplog.at_level(logging.WARNING), pytest.raises(UserError, match=r"collapsed.*chance.*was kept"):
        run(RunConfig(**common, lr=30.0))
    assert "collapsed" in caplog.text
    assert (good.bundle_dir / WEIGHTS_FILE).read_bytes() == weights
    # Where no good bundle stands in the way, it is written, marked, with the warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        collapsed = run(RunConfig(**{**common, "out": str(tmp_path / "other")}, lr=30.0))
    assert "collapsed" in caplog.text
    assert json.loads((collapsed.bundle_dir / CONFIG_FILE).read_text())["classifier"]["collapsed"] is True


# ----------------------------------------------------------------------------------------------
# Bundles: damaged weights, hostile configs, permissions


def _bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    copy.mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        (copy / name).write_bytes((tiny_bundle / name).read_bytes())
    return copy


def test_predict_with_a_truncated_weights_file_is_one_line(tiny_bundle, tmp_path, capsys):
    bundle = _bundle_copy(tiny_bundle, tmp_path)
    weights = (bundle / WEIGHTS_FILE).read_bytes()
    (bundle / WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])
    image = tmp_path / "x.png"
    draw_shape("circle").save(image)
    line = one_error_line(capsys, predict_cli.main([str(bundle), str(image)]))
    assert str(bundle / WEIGHTS_FILE) in line and "damaged" in line


def test_a_pickle_renamed_to_safetensors_is_one_line(tiny_bundle, tmp_path, capsys):
    bundle = _bundle_copy(tiny_bundle, tmp_path)
    (bundle / WEIGHTS_FILE).write_bytes(pickle.dumps({"weights": list(range(1000))}))
    image = tmp_path / "x.png"
    draw_shape("circle").save(image)
    line = one_error_line(capsys, predict_cli.main([str(bundle), str(image)]))
    assert str(bundle / WEIGHTS_FILE) in line and "not a safetensors file" in line
    assert "weights_only" not in line


def test_a_bundle_with_nan_weights_is_refused_on_load(tiny_bundle, tmp_path):
    """Fault: NaN weights loaded, and the app answered "dog" with confidence None for every image."""
    from safetensors.torch import load_file, save_file

    bundle = _bundle_copy(tiny_bundle, tmp_path)
    state = load_file(str(bundle / WEIGHTS_FILE))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(bundle / WEIGHTS_FILE))
    with pytest.raises(BundleError, match=f"{name}.*NaN"):
        load_bundle(bundle)


@pytest.mark.parametrize("field, value, message", [
    ("input_size", [3, 100000, 100000], "input size 100000x100000 is beyond"),
    ("input_size", [7, 32, 32], "channels"),
    ("std", [0.5, 0.0, 0.5], "std"),
    ("mean", [0.5, 0.5], "mean"),
])
def test_a_bundle_with_an_insane_preprocessing_is_refused_on_load(tiny_bundle, tmp_path, field, value, message):
    """Fault: input_size 100000 in config.json grew the first prediction to 23.7 GB."""
    bundle = _bundle_copy(tiny_bundle, tmp_path)
    config = json.loads((bundle / CONFIG_FILE).read_text())
    config["pretrained_cfg"][field] = value
    (bundle / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_bundle_files_are_readable_as_other_files_are(tmp_path):
    """Fault: the weights were written 0600, so other users could not read a shared bundle."""
    torch.manual_seed(0)
    model = create_model("fast_cnn", num_classes=3, widths=(8, 16))
    config = make_config(model, architecture="fast_cnn", label_names=list(CLASSES), model_args={"widths": [8, 16]},
                         input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear",
                         crop_pct=1.0)
    previous = os.umask(0o022)
    try:
        path = save_bundle(tmp_path / "bundle", model, config)
    finally:
        os.umask(previous)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        assert stat.S_IMODE((path / name).stat().st_mode) == 0o644, name


def test_run_files_are_readable_as_other_files_are(trained):
    for name in ("best.safetensors", LAST_CHECKPOINT, "bundle/" + WEIGHTS_FILE):
        assert stat.S_IMODE((trained / name).stat().st_mode) == 0o666 & ~_umask(), name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------------
# Distributed runs (a real stopped rank under torchrun: benchmarks/faults.py stalled-rank)


def test_a_rank_whose_heartbeat_stops_is_named_when_the_collective_fails(monkeypatch):
    """Fault: a stopped torchrun rank stalled the job silently for gloo's 30 minutes."""
    from datetime import timedelta

    import torch.distributed as dist

    from classifier import distributed
    from classifier.errors import StalledRank

    heartbeat = distributed.Heartbeat(dist.HashStore(), interval=0.1)
    seen: dict = {}
    beat = {"beat": 7, "progress": "epoch 2, step 3", "host": "node-b", "pid": 4242}
    heartbeat._watch(1, beat, seen, now=100.0)
    heartbeat._watch(1, beat, seen, now=100.2)
    assert not heartbeat.silent  # two beats of quiet: not yet
    heartbeat._watch(1, beat, seen, now=100.4)
    assert heartbeat.silent[1].startswith("rank 1 (node-b, pid 4242) stopped answering 0 s ago, at epoch 2, step 3")
    monkeypatch.setattr(distributed, "_heartbeat", heartbeat)
    monkeypatch.setenv(distributed.COLLECTIVE_TIMEOUT_ENV, "20")
    assert distributed.collective_timeout() == timedelta(seconds=20)
    with pytest.raises(StalledRank, match=r"rank 1 \(node-b.*until the timeout \(20 s, CLASSIFIER_COLLECTIVE_TIMEOUT\)"):
        with distributed.stall_report():
            raise RuntimeError("[gloo] Timed out waiting 20000ms for recv operation to complete")
    heartbeat._watch(1, {**beat, "beat": 8}, seen, now=100.6)  # it answers again
    assert not heartbeat.silent
    with pytest.raises(RuntimeError, match="Timed out"):  # no silent rank: the error as it was
        with distributed.stall_report():
            raise RuntimeError("[gloo] Timed out waiting 20000ms for recv operation to complete")


def test_a_bad_collective_timeout_is_one_line(monkeypatch):
    from classifier import distributed
    from classifier.errors import ConfigError

    monkeypatch.setenv(distributed.COLLECTIVE_TIMEOUT_ENV, "ten minutes")
    with pytest.raises(ConfigError, match="CLASSIFIER_COLLECTIVE_TIMEOUT='ten minutes'"):
        distributed.collective_timeout()
