"""`python -m classifier export`: model.onnx written into the bundle and checked against torch, on the
tiny bundle the tests train (conftest.tiny_bundle), a copy each time (the export writes into it)."""

from __future__ import annotations

import re
import shutil

import pytest

from classifier.cli import export as export_cli
from classifier.onnx_runtime import INFO_FILE, ONNX_FILE, OnnxPredictor
from tests.conftest import make_image_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / "bundle")


def test_export_writes_model_onnx_and_prints_the_verification(bundle, tmp_path, capsys):
    images = make_image_folder(tmp_path / "photos", per_class=4)
    assert export_cli.main([str(bundle), "--images", str(images)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {bundle / ONNX_FILE}" in out and (bundle / INFO_FILE).is_file()
    assert "verified on 12 images against torch" in out
    difference = float(re.search(r"max probability difference\s+(\S+)", out).group(1))
    assert difference < 1e-4
    assert re.search(r"top-1 agreement\s+100\.00%", out)
    assert OnnxPredictor(bundle).labels == ["circle", "square", "triangle"]


def test_export_to_another_file_without_test_images_says_it_was_not_verified(bundle, tmp_path, capsys):
    shutil.rmtree(bundle / "eval" / "mistakes", ignore_errors=True)  # a bundle that kept no thumbnails
    out_file = tmp_path / "elsewhere" / "tiny.onnx"
    assert export_cli.main([str(bundle), "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert out_file.is_file() and not (bundle / ONNX_FILE).exists()
    assert "not verified: the bundle keeps no test images" in out


def test_export_refuses_what_it_cannot_use(tmp_path, bundle, capsys):
    assert export_cli.main([str(tmp_path / "nothing")]) == 2
    assert "error:" in capsys.readouterr().err
    assert export_cli.main([str(bundle), "--images", str(tmp_path / "absent.jpg")]) == 2
    assert "no such image or folder" in capsys.readouterr().err
    assert not (bundle / ONNX_FILE).exists()  # refused before any export
