"""`python -m classifier predict`: text, JSON, plots, submissions, and bad images one line each."""

from __future__ import annotations

import csv
import json
import runpy
import sys
from pathlib import Path

import pytest
from PIL import Image

from classifier.cli.predict import main
from tests.conftest import CLASSES, draw_shape


@pytest.fixture
def images(tmp_path) -> dict[str, Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    paths = {}
    for kind in CLASSES:
        paths[kind] = folder / f"{kind}.png"
        draw_shape(kind, 32).save(paths[kind])
    paths["empty"] = tmp_path / "empty.jpg"
    paths["empty"].write_bytes(b"")
    paths["text"] = tmp_path / "notes.png"
    paths["text"].write_text("not an image at all")
    return paths


def test_top_k_per_image_as_text(tiny_bundle, images, capsys):
    assert main([str(tiny_bundle), str(images["circle"]), str(images["square"]), "--top-k", "2"]) == 0
    blocks: dict[str, list[list[str]]] = {}
    current = None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  "):  # "  class  12.34%  ###"
            blocks[current].append(line.split())
        else:  # the image's path
            current = line
            blocks[current] = []
    assert list(blocks) == [str(images["circle"]), str(images["square"])]
    for rows in blocks.values():
        assert len(rows) == 2 and all(row[0] in CLASSES for row in rows)
        probabilities = [float(row[1].rstrip("%")) for row in rows]
        assert probabilities == sorted(probabilities, reverse=True)


def test_json_with_a_bad_image_keeps_the_others(tiny_bundle, images, capsys):
    code = main([str(tiny_bundle), str(images["circle"]), str(images["empty"]), str(images["text"]),
                 str(images["triangle"]), "--json"])
    captured = capsys.readouterr()
    assert code == 1, "some images failed: scripts must be able to tell"
    result = json.loads(captured.out)
    assert [r["id"] for r in result] == ["circle", "empty", "notes", "triangle"]
    good = [r for r in result if "predictions" in r]
    assert len(good) == 2
    for r in good:
        assert len(r["predictions"]) == len(CLASSES)  # top-5 capped at the number of classes
        assert sum(r["predictions"].values()) == pytest.approx(1.0, abs=1e-4)
    errors = {r["id"]: r["error"] for r in result if "error" in r}
    assert "empty (0 bytes)" in errors["empty"] and "not an image file" in errors["notes"]
    assert captured.err.count("error: ") == 2  # one readable line per bad file


def test_folder_to_submission_csv(tiny_bundle, images, tmp_path):
    submission = tmp_path / "out" / "submission.csv"
    assert main([str(tiny_bundle), str(images["circle"].parent), "--submission", str(submission)]) == 0
    with open(submission) as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == sorted(CLASSES)  # the folder's files, by name
    assert all(r["label"] in CLASSES for r in rows)
    # tiny_bundle learned the shapes: most of these clear examples are right
    assert sum(r["id"] == r["label"] for r in rows) >= 2


def test_csv_of_ids_keeps_its_order_and_reports_missing_ones(tiny_bundle, tmp_path, capsys):
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    for i, kind in zip((60002, 60000, 60001), CLASSES):
        draw_shape(kind, 32).save(test_dir / f"{i}.png")
    ids = tmp_path / "test.csv"
    ids.write_text("id\n60000\n60001\n60003\n60002\n")
    submission = tmp_path / "submission.csv"
    code = main([str(tiny_bundle), "--csv", str(ids), "--image-dir", str(test_dir), "--submission", str(submission)])
    err = capsys.readouterr().err
    assert code == 1
    assert "60003: no image with this id" in err and "missing from" in err
    lines = submission.read_text().splitlines()
    assert lines[0] == "id,label"
    assert [line.split(",")[0] for line in lines[1:]] == ["60000", "60001", "60002"]


def test_plot_shows_image_and_bars(tiny_bundle, images, tmp_path, capsys):
    plot = tmp_path / "pred.png"
    assert main([str(tiny_bundle), str(images["circle"]), str(images["square"]), "--plot", str(plot)]) == 0
    with Image.open(plot) as image:
        width, height = image.size
    assert width > 600 and height > 300  # two rows of image + bar chart
    assert f"plot: {plot}" in capsys.readouterr().out


def test_bundle_and_argument_errors_are_one_line(tmp_path, images, capsys):
    assert main([str(tmp_path / "nowhere"), str(images["circle"])]) == 2
    assert "no such bundle folder" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "give image files" in capsys.readouterr().err


# Only in-process: the classifier package is imported already when runpy runs it as __main__.
@pytest.mark.filterwarnings("ignore:'classifier.__main__' found in sys.modules:RuntimeWarning")
def test_runs_as_a_module(tiny_bundle, images, monkeypatch, capsys):
    """`python -m classifier predict ...` (run in this process: a new interpreter costs seconds)."""
    monkeypatch.setattr(sys, "argv", ["classifier", "predict", str(tiny_bundle), str(images["triangle"]), "--json",
                                      "--top-k", "1"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("classifier", run_name="__main__")
    assert exit_.value.code == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert list(entry["predictions"])[0] in CLASSES and len(entry["predictions"]) == 1
