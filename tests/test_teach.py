"""Teaching new classes (classifier.teach_set, classifier.teach, classifier.teacher): the checks on what
comes in, the head and its cross-validation, the bundle it writes, training longer, and the app's
`train` endpoint end to end."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from classifier import teach_set
from classifier.errors import DataError
from classifier.teach_set import Limits
from conftest import draw_shape

SIDE = 120  # photo-like: above the small-image size, so the backbone's own 224 px preprocessing applies


def make_set(root: Path, per_class: int = 8, kinds=("circle", "square"), seed: int = 0) -> dict[str, list[str]]:
    rng = np.random.default_rng(seed)
    images = {}
    for kind in kinds:
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        images[kind] = []
        for i in range(per_class):
            path = folder / f"{i:03d}.jpg"
            draw_shape(kind, SIDE, rng).save(path, quality=92)
            images[kind].append(str(path))
    return images


def zip_folder(root: Path, archive: Path, top: str | None = None, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                name = path.relative_to(root).as_posix()
                zf.write(path, f"{top}/{name}" if top else name)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return archive


# ----------------------------------------------------------------------------------------------
# What comes in


@pytest.mark.parametrize("name, problem", [("", "name the class"), ("a/b", "cannot hold"), ("x" * 41, "at most 40"),
                                           ("..", "cannot hold")])
def test_class_names_that_cannot_name_a_folder_are_refused(name, problem):
    with pytest.raises(DataError, match=problem):
        teach_set.class_name(name)


def test_adding_images_leaves_out_broken_files_with_their_reason_and_keeps_the_rest(tmp_path):
    good = make_set(tmp_path, per_class=3, kinds=("circle",))["circle"]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    added = teach_set.add_images({}, "  Round  things ", [*good, broken, empty])
    assert added.images == {"Round things": good}
    assert len(added.problems) == 2
    assert added.problems[0].startswith("broken.jpg: ") and "not an image" in added.problems[0]
    assert "empty" in added.problems[1]
    # The same class under another case is the same class.
    again = teach_set.add_images(added.images, "round THINGS", good[:1])
    assert list(again.images) == ["Round things"] and len(again.images["Round things"]) == 4


def test_limits_leave_out_what_does_not_fit_and_say_so(tmp_path):
    files = make_set(tmp_path, per_class=4, kinds=("circle",))["circle"]
    limits = Limits(max_images_per_class=3, max_classes=1)
    added = teach_set.add_images({}, "a", files, limits)
    assert len(added.images["a"]) == 3 and "full" in added.problems[0]
    with pytest.raises(DataError, match="at most 1 classes"):
        teach_set.add_images(added.images, "b", files[:1], limits)


def test_readiness_says_what_is_missing():
    assert "at least two classes" in teach_set.readiness({})
    assert "'only'" in teach_set.readiness({"only": ["x.jpg"] * 5})
    assert "at least 2 images" in teach_set.readiness({"a": ["x.jpg"], "b": ["y.jpg", "z.jpg"]})
    assert teach_set.readiness({"a": ["x.jpg"] * 2, "b": ["y.jpg"] * 2}) is None


@pytest.mark.parametrize("top", [None, "my photos"])
def test_a_zip_of_class_folders_with_or_without_a_top_folder(tmp_path, top):
    make_set(tmp_path / "src", per_class=3)
    junk = {"__MACOSX/circle/._000.jpg": b"junk", "circle/notes.txt": b"hello", "circle/bad.jpg": b"broken",
            "../../evil.jpg": b"x", "/abs/evil2.jpg": b"x"}
    if top:
        junk = {f"{top}/{k}" if k[0] not in "./" else k: v for k, v in junk.items()}
    archive = zip_folder(tmp_path / "src", tmp_path / "set.zip", top, junk)
    added = teach_set.read_zip(archive, tmp_path / "unpacked")
    assert {k: len(v) for k, v in added.images.items()} == {"circle": 3, "square": 3}
    for paths in added.images.values():  # every file unpacked under the target, by our own names
        assert all(Path(p).resolve().is_relative_to((tmp_path / "unpacked").resolve()) for p in paths)
    text = "\n".join(added.problems)
    assert "notes.txt: not an image file" in text and "bad.jpg: " in text and "evil2.jpg: not in a class folder" in text
    # Junk of the zip tool (__MACOSX, dot files and folders, ../ included) is left out silently.
    assert "__MACOSX" not in text and "evil.jpg" not in text
    assert not list(tmp_path.rglob("evil*.jpg"))


def test_a_file_that_is_no_zip_or_too_big_is_refused_whole(tmp_path):
    fake = tmp_path / "photos.zip"
    fake.write_bytes(b"PK but not really")
    with pytest.raises(DataError, match="not a readable zip"):
        teach_set.read_zip(fake, tmp_path / "out")
    make_set(tmp_path / "src", per_class=3)
    archive = zip_folder(tmp_path / "src", tmp_path / "set.zip")
    with pytest.raises(DataError, match="holds 6 files; at most 5"):
        teach_set.read_zip(archive, tmp_path / "out", Limits(max_zip_entries=5))
    with pytest.raises(DataError, match="unpacks to"):
        teach_set.read_zip(archive, tmp_path / "out", Limits(max_zip_bytes=1000))


# ----------------------------------------------------------------------------------------------
# The head


def test_the_head_separates_separable_embeddings_and_applies_to_raw_features():
    from classifier.teach import cross_validate, fit_head, stratified_folds

    generator = torch.Generator().manual_seed(0)
    targets = torch.arange(60) % 3
    features = torch.rand(60, 40, generator=generator) * 5 + 20  # far from zero mean: the folding is tested
    features[torch.arange(60), targets] += 8
    weight, bias = fit_head(features, targets, 3)
    assert ((features @ weight.T + bias).argmax(1) == targets).all()
    folds = stratified_folds(targets, 5)
    for c in range(3):  # each class dealt round all the folds
        assert sorted(folds[targets == c].tolist()) == [f for f in range(5) for _ in range(4)]
    oof = cross_validate(features, targets, 3, 5)
    assert oof.shape == (60, 3) and (oof.argmax(1) == targets).float().mean() > 0.9


# ----------------------------------------------------------------------------------------------
# Teaching, end to end (the real pretrained backbone, offline)


@pytest.fixture(scope="module")
def embedder():
    from classifier.teach import Embedder

    return Embedder()


def test_teach_writes_a_bundle_that_predicts_the_new_classes(tmp_path, embedder):
    from classifier.bundle import load_bundle
    from classifier.model_card import render_model_card
    from classifier.predict import Predictor
    from classifier.teach import teach

    images = make_set(tmp_path / "set", per_class=8)
    broken = tmp_path / "set" / "circle" / "zz-broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    images["circle"].append(str(broken))
    steps = []
    taught = teach(images, tmp_path / "bundle", embedder, progress=lambda f, text: steps.append(f))
    assert taught.classes == ["circle", "square"] and taught.method == "head"
    assert len(taught.problems) == 1 and taught.problems[0].startswith("zz-broken.jpg: ")
    m = taught.metrics
    assert m["num_samples"] == 16 and m["cross_validation"] == {"folds": 5, "num_samples": 16}
    assert m["accuracy"] >= 0.85 and m["accuracy_ci95"][0] < m["accuracy"] <= m["accuracy_ci95"][1]
    assert steps == sorted(steps) and steps[-1] < 1
    # An ordinary bundle: the Predictor names new shapes it never saw.
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.label_names == ["circle", "square"] and bundle.architecture == "tf_efficientnet_lite0"
    predictor = Predictor(bundle)
    fresh = make_set(tmp_path / "fresh", per_class=4, seed=1)
    right = sum(next(iter(predictor.predict(p))) == kind for kind, paths in fresh.items() for p in paths)
    assert right >= 7
    metrics = json.loads((tmp_path / "bundle" / "eval" / "metrics.json").read_text())
    assert metrics["accuracy"] == m["accuracy"]
    card = render_model_card(tmp_path / "bundle")
    assert "On the 16 images taught (each predicted by a head fitted without it: 5-fold cross-validation) it" in card
    assert "a new classifier layer on the frozen backbone of" in card
    # Embeddings are cached by content: teaching again embeds nothing.
    again = []
    teach(images, tmp_path / "bundle2", embedder, progress=lambda f, text: again.append(text))
    assert not any("looking at the images" in text for text in again)


def test_a_taught_model_says_none_of_its_classes_with_a_threshold_fitted_out_of_fold(tmp_path, embedder):
    from classifier.evaluate import CALIBRATION_MIN_SAMPLES
    from classifier.model_card import render_model_card
    from classifier.predict import Predictor
    from classifier.teach import OOD_PER_KIND, teach

    taught = teach(make_set(tmp_path / "set", per_class=12), tmp_path / "bundle", embedder)
    record = taught.metrics["ood"]
    assert record["fitted_on"] == "out-of-fold" and record["num_fitted"] == 24
    assert record["in_domain"]["validation"]["n"] == 24
    assert record["out_of_domain"]["pooled"]["n"] == 6 * OOD_PER_KIND
    predictor = Predictor(tmp_path / "bundle")
    assert predictor.ood_threshold == pytest.approx(record["threshold"])  # the app's Predictor uses it
    card = render_model_card(tmp_path / "bundle")
    assert "keeps 95% of the 24 images taught, each scored by a head fitted without it" in card
    assert "**all out-of-domain images** (true positives) | out of domain | 60 |" in card
    # The app names the split a taught model was measured on: no "test" images where there were none.
    from classifier import app_logic as logic

    report = logic.EvalReport.from_bundle(predictor.bundle)
    assert report.split == "validation" and "validation image" in report.summary() and "test" not in report.summary()
    assert "Validation accuracy" in logic.model_summary(predictor.bundle, str(tmp_path / "bundle"))
    # Too few images for a quantile that means anything: no threshold, and nothing is ever flagged.
    small = teach(make_set(tmp_path / "small", per_class=(CALIBRATION_MIN_SAMPLES - 1) // 2), tmp_path / "b2", embedder)
    assert "ood" not in small.metrics and Predictor(tmp_path / "b2").ood_threshold is None


def test_teach_refuses_a_class_with_no_usable_image(tmp_path, embedder):
    from classifier.teach import teach

    images = make_set(tmp_path / "set", per_class=3, kinds=("circle",))
    bad = [tmp_path / f"bad{i}.jpg" for i in range(2)]
    for path in bad:
        path.write_bytes(b"nope")
    images["square"] = [str(p) for p in bad]
    with pytest.raises(DataError, match="no usable images left in 'square'"):
        teach(images, tmp_path / "bundle", embedder)
    with pytest.raises(DataError, match="at least two classes"):
        teach({"circle": images["circle"]}, tmp_path / "bundle", embedder)


def test_train_longer_keeps_the_fine_tuned_model_only_if_it_is_better(tmp_path, embedder, one_torch_thread):
    from classifier.teach import teach, train_longer

    images = make_set(tmp_path / "set", per_class=5)
    taught = teach(images, tmp_path / "head", embedder)
    longer = train_longer(images, tmp_path / "longer", tmp_path / "work", embedder, taught, epochs=1)
    compared = "on the same 2 held-out images"
    assert compared in longer.note
    if longer.method == "fine-tuned":
        assert (tmp_path / "longer" / "config.json").exists() and longer.metrics["num_samples"] == 2
    else:
        assert longer.bundle_dir == taught.bundle_dir and "head-only model is kept" in longer.note
    stopped = train_longer(images, tmp_path / "stopped", tmp_path / "work2", embedder, taught, epochs=3,
                           should_stop=lambda: True)
    # Stop ends it after the epoch that is running; the comparison then decides as before.
    assert stopped.note.startswith("Stopped after epoch 1 of 3. ") and compared in stopped.note


def test_the_teacher_forgets_expired_models(tmp_path, embedder):
    from classifier.teacher import Teacher

    registered = {}
    teacher = Teacher(registered.__setitem__, registered.pop, root=tmp_path / "taught", lifetime_s=60)
    teacher._embedder = embedder
    model = teacher.teach(make_set(tmp_path / "set", per_class=3))
    assert registered == {model.name: str(model.bundle_dir)} and model.name.startswith("taught-circle-square-")
    archive = teacher.archive(model)
    assert f"{model.name}/config.json" in zipfile.ZipFile(archive).namelist()
    assert teacher.forget_expired(now=model.made + 30) == []
    assert teacher.forget_expired(now=model.made + 61) == [model.name]
    assert registered == {} and not model.bundle_dir.exists() and not archive.exists()


# ----------------------------------------------------------------------------------------------
# The app: the `train` endpoint, then /classify with the taught model


@pytest.fixture(scope="module")
def app_client(tiny_bundle, tmp_path_factory):
    import shutil
    import socket

    from gradio_client import Client

    import app as app_module

    models = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_bundle, models / "shapes")
    demo = app_module.build_app(models, teach_root=tmp_path_factory.mktemp("taught"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app_module.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}", verbose=False, download_files=False)
    finally:
        demo.close()


def test_the_train_endpoint_teaches_from_a_zip_and_classify_uses_the_new_model(tmp_path, app_client):
    from gradio_client import handle_file

    make_set(tmp_path / "set", per_class=6)
    archive = zip_folder(tmp_path / "set", tmp_path / "set.zip", extra={"square/broken.png": b"\x89PNG broken"})
    name, figures = app_client.predict(handle_file(str(archive)), api_name="/train")
    assert name.startswith("taught-circle-square-")
    assert figures["classes"] == ["circle", "square"] and figures["num_samples"] == 12
    assert figures["accuracy"] >= 0.75 and len(figures["accuracy_ci95"]) == 2
    assert len(figures["left_out"]) == 1 and figures["left_out"][0].startswith("square/broken.png: ")
    probe = tmp_path / "probe.jpg"
    draw_shape("square", SIDE, np.random.default_rng(7)).save(probe)
    label, headline, _ = app_client.predict(handle_file(str(probe)), name, api_name="/classify")
    assert {c["label"] for c in label["confidences"]} == {"circle", "square"}
    assert label["label"] == "square" and "square" in headline


def test_the_train_endpoint_says_why_a_set_cannot_train(tmp_path, app_client):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    make_set(tmp_path / "set", per_class=4, kinds=("circle",))
    archive = zip_folder(tmp_path / "set", tmp_path / "one.zip")
    with pytest.raises(AppError, match="at least two classes"):
        app_client.predict(handle_file(str(archive)), api_name="/train")
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"hello")
    with pytest.raises(AppError, match="not a readable zip"):
        app_client.predict(handle_file(str(junk)), api_name="/train")
