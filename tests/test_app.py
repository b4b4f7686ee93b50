"""The Gradio app, driven the way a user or an API client drives it: through a running server.

One server (two bundles: the tiny shapes model, and a copy of it with renamed classes and a known
set of mistakes) is started for the module; every odd or hostile input is generated here.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from classifier import app_logic as logic
from classifier.predict import Predictor
from conftest import draw_shape

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

import app as app_module  # noqa: E402

RENAMED = ["disc", "box", "wedge"]  # the shapes model's circle, square, triangle under new names
# (true, predicted, p_predicted) of the renamed bundle's saved mistakes, worst first
KNOWN_MISTAKES = [("disc", "box", 0.91), ("wedge", "disc", 0.84), ("disc", "wedge", 0.66), ("wedge", "disc", 0.52)]
CONFUSION = [[8, 1, 1], [0, 10, 0], [2, 0, 8]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def renamed_bundle(source: Path, dest: Path) -> Path:
    """The same weights under other class names, with an eval/ whose mistakes the tests know."""
    shutil.copytree(source, dest)
    config = json.loads((dest / "config.json").read_text())
    config["label_names"] = RENAMED
    (dest / "config.json").write_text(json.dumps(config))
    eval_dir = dest / "eval"
    shutil.rmtree(eval_dir / "mistakes", ignore_errors=True)
    (eval_dir / "mistakes").mkdir(parents=True)
    mistakes = []
    for n, (true, predicted, p) in enumerate(KNOWN_MISTAKES):
        draw_shape("circle").save(eval_dir / "mistakes" / f"{n:04d}.png")
        mistakes.append({"index": n, "true": true, "predicted": predicted, "p_predicted": p, "p_true": 0.05,
                         "loss": 3.0, "top": {predicted: p}, "file": f"mistakes/{n:04d}.png"})
    (eval_dir / "mistakes.json").write_text(json.dumps(mistakes))
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    metrics["confusion_matrix"] = CONFUSION
    metrics["per_class"] = [{"class": name, "precision": 0.8, "recall": 0.8, "f1": 0.8, "support": 10,
                             "accuracy": 0.8} for name in RENAMED]
    (eval_dir / "metrics.json").write_text(json.dumps(metrics))
    return dest


@pytest.fixture(scope="module")
def models_dir(tiny_bundle, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_bundle, root / "a-shapes")
    renamed_bundle(tiny_bundle, root / "b-renamed")
    return root


@pytest.fixture(scope="module")
def client(models_dir):
    demo = app_module.build_app(models_dir)
    port = free_port()
    app_module.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}", verbose=False, download_files=False)
    finally:
        demo.close()


@pytest.fixture(scope="module")
def predictor(models_dir) -> Predictor:
    return Predictor(models_dir / "a-shapes")


def classify_all(client, path, model="a-shapes") -> tuple[dict[str, float], str, str]:
    """(probabilities, headline, timing) as the page shows them."""
    label, headline, timing = client.predict(handle_file(str(path)), model, api_name="/classify")
    return {c["label"]: c["confidence"] for c in label["confidences"]}, headline, timing


def classify(client, path, model="a-shapes") -> tuple[dict[str, float], str]:
    probs, _, timing = classify_all(client, path, model)
    return probs, timing


def assert_still_serving(client, predictor, tmp_path) -> None:
    good = tmp_path / "good.png"
    draw_shape("square", 48).save(good)
    assert_same(classify(client, good)[0], predictor.predict(good))


def assert_same(got: dict[str, float], expected: dict[str, float], tol: float = 1e-5) -> None:
    assert set(got) == set(expected)
    assert all(abs(got[k] - expected[k]) < tol for k in expected), (got, expected)


# ----------------------------------------------------------------------------------------------
# Classify


def test_classifies_an_upload_exactly_as_the_predictor_does(client, predictor, tmp_path):
    path = tmp_path / "circle.png"
    draw_shape("circle", 64, np.random.default_rng(3)).save(path)
    probs, timing = classify(client, path)
    assert_same(probs, predictor.predict(path))  # calibrated, same preprocessing, nothing lost in transit
    assert abs(sum(probs.values()) - 1) < 1e-4
    assert re.search(r"\*\*\d+\.\d ms\*\*", timing)


def test_headline_states_the_top_class_with_an_honest_number(client, predictor, tmp_path):
    path = tmp_path / "square.png"
    draw_shape("square", 64).save(path)
    probs, headline, _ = classify_all(client, path)
    assert headline == f"### {logic.headline(probs)}"
    top = max(probs, key=probs.get)
    assert top in headline and "100%" not in headline and not headline.endswith(" 0%")


@pytest.mark.parametrize("p, text", [
    (0.41, "41%"), (0.5, "50%"), (0.994, "99%"), (0.996, "99.6%"), (0.9996, ">99.9%"), (1.0, ">99.9%"),
    (0.004, "0.4%"), (0.0004, "<0.1%"), (0.0, "<0.1%"), (0.0051, "1%")])
def test_probabilities_never_claim_certainty(p, text):
    assert logic.format_probability(p) == text


def test_the_bars_write_probabilities_honestly_and_escape_class_names():
    bars = logic.probability_bars({"cat": 0.0004, "<b>dog</b>": 0.9995, "bird": 0.0001}, top_k=2)
    assert bars.index("&lt;b&gt;dog&lt;/b&gt;") < bars.index(">cat<")  # most likely first, names escaped
    assert "<b>" not in bars and "bird" not in bars  # top_k of them
    assert ">&gt;99.9%<" in bars and ">&lt;0.1%<" in bars and "100%" not in bars
    assert 'style="width: 0.0%"' in bars  # a bar as long as its probability
    assert logic.probability_bars({}) == ""


def test_headline_says_when_the_model_is_not_sure():
    unsure = {"airplane": 0.24, "bird": 0.41, "cat": 0.2, "dog": 0.15}
    assert logic.headline(unsure) == "Not sure: bird 41% or airplane 24%"
    assert logic.headline({"bird": 0.9996, "cat": 0.0004}) == "bird >99.9%"
    assert logic.headline({"bird": logic.UNSURE_BELOW, "cat": 0.1}) == "bird 74%"  # at the threshold: sure
    assert logic.headline({"bird": 0.7, "cat": 0.2}).startswith("Not sure: bird 70%")  # a 70% guess is not sure
    assert logic.headline({"bird": 0.3}) == "bird 30%"  # one class: no runner-up to name
    assert logic.headline({}) == ""
    assert logic.headline(unsure, unsure_below=0.4) == "bird 41%"


def test_mistake_captions_give_both_probabilities_and_never_say_100_percent():
    mistake = {"true": "cat", "predicted": "dog", "p_predicted": 0.9997, "p_true": 0.0002}
    assert logic.caption(mistake) == "cat (true, <0.1%) → dog >99.9%"
    assert logic.caption({"true": "cat", "predicted": "dog", "p_true": 0.12, "p_predicted": 0.81}) == (
        "cat (true, 12%) → dog 81%")


def test_mistake_captions_without_a_probability_fall_back_gracefully():
    # No p_true (an older mistakes.json): the top-k dict has it when the true class was runner-up.
    assert logic.caption({"true": "cat", "predicted": "dog", "p_predicted": 0.6,
                          "top": {"dog": 0.6, "cat": 0.3}}) == "cat (true, 30%) → dog 60%"
    # Nowhere to be found: the caption says which is which, without a made-up number.
    assert logic.caption({"true": "cat", "predicted": "dog", "p_predicted": 0.6}) == "cat (true) → dog 60%"
    assert logic.caption({"true": "cat", "predicted": "dog"}) == "cat (true) → dog"


def test_classifies_a_shipped_example(client, predictor):
    example = logic.example_images()[0]
    probs, _ = classify(client, example)
    assert_same(probs, predictor.predict(example))


def test_examples_are_captioned_with_the_class_they_show(models_dir):
    """Each example photo is shown with its class (the file's stem) as its caption, so a person sees
    the photo and knows the true class before clicking."""
    import gradio as gr

    demo = app_module.build_app(models_dir)
    photos = logic.example_images()
    assert photos, "no example photos shipped"
    galleries = [block for block in demo.blocks.values()
                 if isinstance(block, gr.Gallery) and block.elem_id == "examples"]
    assert len(galleries) == 1
    assert not any(isinstance(block, gr.Dataset) for block in demo.blocks.values())  # no label-only Examples
    shown = galleries[0].value
    assert [Path(item["image"]["path"]) for item in shown] == [Path(photo) for photo in photos]
    assert [item["caption"] for item in shown] == [Path(photo).stem for photo in photos]
    assert "deer" in [item["caption"] for item in shown]


def _bomb_png() -> bytes:
    """A valid PNG header claiming 20000 x 20000 pixels (400 MP), with almost no data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
            + chunk(b"IEND", b""))


def _truncated(fmt: str) -> bytes:
    buffer = io.BytesIO()
    draw_shape("square", 96).save(buffer, fmt)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


BAD_INPUTS = {
    "fake.png": (lambda: b"this is a text file with an image's name\n", "not an image file"),
    "notes.txt": (lambda: b"plain text", "not an image file"),
    "empty.png": (lambda: b"", "empty"),
    "truncated.png": (lambda: _truncated("PNG"), "damaged or truncated"),
    "truncated.jpg": (lambda: _truncated("JPEG"), "damaged or truncated"),
    "bomb.png": (_bomb_png, "too large to decode safely"),
    "random.jpg": (lambda: np.random.default_rng(7).bytes(4096), "not an image file"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_gets_a_readable_error_and_the_app_keeps_serving(client, predictor, tmp_path, name):
    make, message = BAD_INPUTS[name]
    path = tmp_path / name
    path.write_bytes(make())
    with pytest.raises(AppError) as error:
        classify(client, path)
    text = str(error.value)
    assert message in text and name in text
    assert f"Upload a {logic.READABLE_FORMATS} image" in text and "JPEG" in text
    assert "Pillow" not in text and "PIL" not in text  # plain words, not the decoder's
    assert str(tmp_path) not in text and "/gradio" not in text  # the user's file name, not server paths
    assert_still_serving(client, predictor, tmp_path)


def test_upload_error_is_one_plain_sentence_with_the_formats_that_work():
    error = logic.ImageError("/tmp/gradio/abc/photo.heic is damaged or truncated (broken data stream)")
    error.problem = "is damaged or truncated"
    assert logic.upload_error("photo.heic", error) == (
        "photo.heic is damaged or truncated. Upload a BMP, GIF, JPEG, PNG, TIFF or WebP image instead.")
    # An ImageError without a plain problem still names the file, never the raw message.
    assert logic.upload_error("x.jpg", logic.ImageError("PIL says no")).startswith("x.jpg cannot be read")


def test_oversized_upload_is_refused(client, predictor, tmp_path):
    """Over the 10 MB limit: gradio_client refuses to send it, and the server refuses it unread."""
    import httpx

    path = tmp_path / "huge.png"
    path.write_bytes(b"\0" * (11 * 1024 * 1024))
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        classify(client, path)
    response = httpx.post(f"{client.src.rstrip('/')}/gradio_api/upload",
                          files={"files": ("huge.png", path.read_bytes(), "image/png")})
    assert response.status_code == 413
    assert_still_serving(client, predictor, tmp_path)


def _rgb(kind: str, size=(64, 64), seed=1) -> Image.Image:
    return draw_shape(kind, max(size), np.random.default_rng(seed)).resize(size)


def _sixteen_bit(tmp: Path):
    grey = np.asarray(_rgb("triangle").convert("L"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp / "deep.png")  # 16-bit: 0..65535
    assert Image.open(tmp / "deep.png").mode.startswith("I")
    return tmp / "deep.png", Image.fromarray(grey).convert("RGB")  # what it must look like: same greys


def _rgba(tmp: Path):
    rgb = np.asarray(_rgb("square")).copy()
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, :24] = 0  # a transparent left part, hiding black pixels
    rgb[:, :24] = 0
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp / "alpha.png")
    flattened = rgb.copy()
    flattened[:, :24] = 255  # transparency is shown on white, not as the hidden black
    return tmp / "alpha.png", Image.fromarray(flattened)


def _palette_gif(tmp: Path):
    _rgb("circle").quantize(32).save(tmp / "palette.gif")
    return tmp / "palette.gif", Image.open(tmp / "palette.gif").convert("RGB")


def _cmyk(tmp: Path):
    _rgb("square").convert("CMYK").save(tmp / "print.jpg", quality=95)
    return tmp / "print.jpg", Image.open(tmp / "print.jpg").convert("RGB")


ODD_IMAGES = {"16-bit PNG": _sixteen_bit, "RGBA": _rgba, "palette GIF": _palette_gif, "CMYK JPEG": _cmyk}


@pytest.mark.parametrize("kind", ODD_IMAGES)
def test_odd_image_is_classified_as_it_looks(client, predictor, tmp_path, kind):
    path, looks_like = ODD_IMAGES[kind](tmp_path)
    probs, _ = classify(client, path)
    assert_same(probs, predictor.predict(looks_like), tol=1e-4)


def _sideways_candidates():
    """Wide images from plain noise to a clear shape, for a model that may be unsure or very sure."""
    rng = np.random.default_rng(0)
    for seed in range(4):
        noise = rng.integers(0, 256, (48, 96, 3), dtype=np.uint8)
        shape = np.asarray(draw_shape("triangle", 96, np.random.default_rng(seed)).resize((96, 48)))
        for weight in (0.0, 0.25, 0.5, 0.75, 0.9, 1.0):
            yield Image.fromarray((weight * shape + (1 - weight) * noise).astype(np.uint8))


def test_exif_rotated_photo_is_turned_upright(client, predictor, tmp_path):
    """A photo stored sideways with an EXIF tag saying so is classified as it is displayed. The
    picture is picked so that the model answers differently when it is turned; otherwise ignoring
    the tag would go unnoticed."""
    for upright in _sideways_candidates():
        stored = upright.transpose(Image.Transpose.ROTATE_90)
        expected, sideways = predictor.predict(upright), predictor.predict(stored)
        if max(abs(expected[k] - sideways[k]) for k in expected) > 1e-3:
            break
    else:
        pytest.fail("no test image that the model sees differently when rotated")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "phone.png", exif=exif)
    probs, _ = classify(client, tmp_path / "phone.png")
    assert_same(probs, expected, tol=1e-4)


# ----------------------------------------------------------------------------------------------
# Mistakes and Model tabs


def _captions(gallery) -> list[str]:
    return [item["caption"] for item in gallery]


@pytest.mark.parametrize("true, predicted, expected", [
    ("all", "all", 4), ("disc", "all", 2), ("all", "disc", 2), ("wedge", "disc", 2), ("box", "wedge", 0)])
def test_mistakes_filters_show_exactly_the_matching_pairs(client, true, predicted, expected):
    gallery, note = client.predict("b-renamed", true, predicted, api_name="/mistakes")
    captions = _captions(gallery)
    assert len(captions) == expected
    for text in captions:
        t, p = re.fullmatch(r"(\w+) \(true, [<>]?[\d.]+%\) → (\w+) [<>]?[\d.]+%", text).groups()
        assert true in ("all", t) and predicted in ("all", p)
    assert f"**{expected}**" in note if expected else note == "No test images of box were taken for wedge."


def test_mistakes_of_an_unknown_class_is_a_readable_error(client):
    with pytest.raises(AppError, match="'circle' is not a class of this model"):
        client.predict("b-renamed", "circle", "all", api_name="/mistakes")


def test_mistake_captions_and_order(client):
    gallery, note = client.predict("b-renamed", "all", "all", api_name="/mistakes")
    assert _captions(gallery) == ["disc (true, 5%) → box 91%", "wedge (true, 5%) → disc 84%",
                                  "disc (true, 5%) → wedge 66%", "wedge (true, 5%) → disc 52%"]
    assert "of 4 in the test set" in note or "**4**" in note


def test_switching_model_updates_every_tab_and_prediction(client, predictor, tmp_path):
    (note, true_filter, predicted_filter, gallery, mistakes_note, most_confused, confusion, confusion_png,
     per_class, summary, curves, samples) = client.predict("b-renamed", api_name="/select_model")
    assert "disc, box, wedge" in note
    assert [c[0] for c in true_filter["choices"]] == ["all", *RENAMED] and true_filter["value"] == "all"
    assert len(gallery) == 4
    assert most_confused["headers"] == ["true", "predicted", "images"]
    assert most_confused["data"] == [["wedge", "disc", 2], ["disc", "box", 1], ["disc", "wedge", 1]]
    assert confusion["headers"][1:] == RENAMED
    assert [row[1:] for row in confusion["data"]] == CONFUSION
    assert [row[0] for row in per_class["data"]] == RENAMED
    assert "fast_cnn" in summary and "Test accuracy" in summary and "b-renamed" in summary
    assert "temperature" in summary and "python training/finetune.py" in summary
    assert confusion_png is not None

    path = tmp_path / "square.png"
    draw_shape("square", 64).save(path)
    original, _ = classify(client, path, "a-shapes")
    renamed, _ = classify(client, path, "b-renamed")
    # The same weights under new names: same probabilities, new labels. A switch that kept serving
    # the first model would give the old names.
    assert list(renamed) != list(original)
    assert_same(renamed, {RENAMED[predictor.labels.index(k)]: v for k, v in original.items()})


# ----------------------------------------------------------------------------------------------
# The logic behind the app, without a server


def test_model_store_loads_each_model_once(models_dir):
    store = logic.ModelStore(logic.find_bundles(models_dir))
    assert store.get("a-shapes") is store.get("a-shapes")
    with pytest.raises(logic.BundleError, match="unknown model"):
        store.get("nope")


def test_model_store_predicts_as_the_bundle_was_evaluated(tiny_bundle, tmp_path):
    augmented = shutil.copytree(tiny_bundle, tmp_path / "tta")
    config = json.loads((augmented / "config.json").read_text())
    config["classifier"]["tta"] = True  # as bundles written before there were TTA modes record it
    (augmented / "config.json").write_text(json.dumps(config))
    store = logic.ModelStore({"plain": str(tiny_bundle), "tta": str(augmented)})
    assert store.get("tta").tta == "flip-shift" and store.get("plain").tta == "none"
    image = np.asarray(draw_shape("square", 40))
    assert_same(store.get("tta").predict(image), Predictor(augmented, tta="flip-shift").predict(image), tol=1e-6)
    assert "Test-time augmentation | yes" in logic.model_summary(store.bundle("tta"), str(augmented))


def test_default_model_prefers_the_list_then_name_order(models_dir):
    choices = logic.find_bundles(models_dir)
    assert list(choices) == ["a-shapes", "b-renamed"]
    assert logic.default_model(choices) == "a-shapes"
    assert logic.default_model(choices, preferred=("b-renamed",)) == "b-renamed"
    assert logic.default_model(choices, str(models_dir / "b-renamed")) == "b-renamed"
    extra = logic.model_choices(models_dir, "owner/model")
    assert list(extra) == ["owner/model", "a-shapes", "b-renamed"]
    assert logic.model_choices(models_dir, str(models_dir / "a-shapes")) == choices  # no duplicate
    with pytest.raises(logic.BundleError, match="no model bundles"):
        logic.default_model({})


def test_confusion_cell_sets_both_filters(models_dir):
    from classifier.bundle import load_bundle

    report = logic.EvalReport.from_bundle(load_bundle(models_dir / "b-renamed"))
    headers, rows = report.confusion_table()
    assert headers == ["true \\ predicted", *RENAMED] and rows[2] == ["wedge", 2, 0, 8]
    assert report.filters_for_cell("wedge", 1) == ("wedge", "disc")
    assert report.filters_for_cell("wedge", 0) == ("wedge", "all")  # the row's name: all its mistakes
    assert len(report.gallery(*report.filters_for_cell("wedge", 1))) == 2
    assert report.errors_in_split("wedge", "disc") == 2 and report.errors_in_split() == 4


def test_most_confused_pairs_come_from_the_confusion_matrix(models_dir):
    from classifier.bundle import load_bundle

    report = logic.EvalReport.from_bundle(load_bundle(models_dir / "b-renamed"))
    # Off-diagonal, non-zero cells of CONFUSION, most frequent first; ties in matrix order.
    assert report.most_confused() == [("wedge", "disc", 2), ("disc", "box", 1), ("disc", "wedge", 1)]
    assert report.most_confused(limit=1) == [("wedge", "disc", 2)]
    assert report.most_confused_table(2) == (["true", "predicted", "images"],
                                             [["wedge", "disc", 2], ["disc", "box", 1]])
    assert logic.EvalReport(RENAMED, report.eval_dir).most_confused() == []  # no matrix: no pairs


def test_an_empty_filter_says_why_the_gallery_is_empty(models_dir):
    from classifier.bundle import load_bundle

    report = logic.EvalReport.from_bundle(load_bundle(models_dir / "b-renamed"))
    assert report.gallery("box", "wedge") == []
    assert report.summary("box", "wedge") == "No test images of box were taken for wedge."
    assert report.summary("box", "all") == "No test images of box were misclassified."
    # The matrix counts mistakes the bundle did not keep: say so, not "none were taken".
    report.mistakes = [m for m in report.mistakes if m["true"] != "wedge"]
    assert report.summary("wedge", "disc") == (
        "None of the 2 test images of wedge taken for disc were kept in this bundle "
        "(it keeps the most confident mistakes only).")
    # Same class twice keeps its own explanation.
    assert "pick two different classes" in report.summary("box", "box")


def test_unreachable_hub_model_stops_start_up_with_a_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(SystemExit) as stop:
        app_module.main(["--model", "nobody/no-such-model", "--models-dir", str(tmp_path)])
    message = str(stop.value.code)
    assert message.startswith("app.py: cannot start:") and "nobody/no-such-model" in message


def test_no_models_at_all_stops_start_up_with_a_message(tmp_path):
    with pytest.raises(SystemExit) as stop:
        app_module.main(["--models-dir", str(tmp_path / "empty")])
    assert "no model bundles" in str(stop.value.code)


def test_servable_dirs_follow_hub_cache_symlinks_but_not_the_weights(tmp_path):
    """A Hub snapshot is symlinks into blobs/; Gradio checks resolved paths, so blobs/ must be listed."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    (snapshot / "eval" / "mistakes").mkdir(parents=True)
    blobs.mkdir()
    (blobs / "1234").write_bytes(b"png")
    (snapshot / "eval" / "mistakes" / "0000.png").symlink_to(blobs / "1234")
    (snapshot / "model.safetensors").write_bytes(b"weights")
    dirs = logic.servable_dirs(snapshot)
    assert (snapshot / "eval").resolve() in dirs and blobs.resolve() in dirs
    assert snapshot.resolve() not in dirs
    assert logic.servable_dirs(tmp_path / "no-eval") == []


# ----------------------------------------------------------------------------------------------
# Where the model looked (Grad-CAM)


def test_heatmap_is_computed_only_when_asked(client, predictor, tmp_path):
    path = tmp_path / "triangle.png"
    draw_shape("triangle", 64).save(path)
    hidden = client.predict(handle_file(str(path)), "a-shapes", False, api_name="/heatmap")
    # Not asked: nothing computed, the panel stays hidden and empty.
    assert hidden["visible"] is False and hidden["value"] is None
    shown = client.predict(handle_file(str(path)), "a-shapes", True, api_name="/heatmap")
    assert shown["visible"] is True and "Where the model looked for" in shown["label"]
    picture = Image.open(shown["value"]["path"])
    assert min(picture.size) >= 256  # the 32 px input the model saw, enlarged under its heatmap
    expected, label = predictor.explain(path)
    assert label == next(iter(predictor.predict(path)))
    difference = np.abs(np.asarray(picture, np.int16) - np.asarray(expected, np.int16))
    assert difference.mean() < 1 and difference.max() <= 16, (difference.mean(), difference.max())


def test_heatmap_of_a_bad_file_is_a_readable_error(client, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(AppError, match=r"notes\.png .*Upload a"):
        client.predict(handle_file(str(bad)), "a-shapes", True, api_name="/heatmap")


def test_explain_names_the_class_and_the_mistake_at_a_gallery_place(models_dir):
    report = logic.EvalReport.from_bundle(logic.ModelStore(logic.find_bundles(models_dir)).bundle("b-renamed"))
    mistake = report.mistake_at(1, "wedge", "all")  # the second shown when filtering on wedge
    assert (mistake["true"], mistake["predicted"]) == ("wedge", "disc")
    assert Path(mistake["path"]).is_file()
    with pytest.raises(IndexError):
        report.mistake_at(2, "wedge", "all")
    explanation = logic.explain(Predictor(models_dir / "b-renamed"), mistake["path"], mistake["predicted"])
    assert explanation.label == "disc" and "disc" in explanation.title()
    assert explanation.picture.mode == "RGB"


@pytest.mark.parametrize("argv, env, message", [
    (["--max-batch", "0"], {}, "--max-batch must be at least 1, not 0"),
    ([], {"MAX_BATCH": "eight"}, "argument --max-batch: invalid int value: 'eight'"),
])
def test_a_bad_batch_size_is_refused_before_anything_loads(argv, env, message, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit):
        app_module.main(argv)
    assert message in capsys.readouterr().err
