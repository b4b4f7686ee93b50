"""The dataset, model and sample-prediction reports, as functions and as `python -m classifier report`."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from classifier.bundle import load_bundle
from classifier.data import load_data
from classifier.cli.report import main
from classifier.reports.dataset import dataset_report
from classifier.reports.model import comparison_markdown, model_from_name, model_report
from classifier.reevaluate import bundle_data, rerun_config
from classifier.reports.samples import samples_report
from tests.conftest import make_image_folder


@pytest.fixture
def messy_folder(tmp_path):
    """Shapes with too few squares, an empty file, a truncated PNG and one grey-scale image."""
    root = make_image_folder(tmp_path / "messy", per_class=20)
    for path in sorted((root / "square").glob("*.png"))[6:]:
        path.unlink()
    (root / "circle" / "empty.png").write_bytes(b"")
    good = (root / "circle" / "000.png").read_bytes()
    (root / "circle" / "cut.png").write_bytes(good[: len(good) // 2])  # a valid header, half the pixels
    Image.new("L", (40, 30), 128).save(root / "triangle" / "grey.png")
    return root


def test_dataset_report_finds_the_problems(messy_folder):
    data = load_data(str(messy_folder), val_fraction=0.1, test_fraction=0.1)
    report = dataset_report(data)
    total = {c: sum(report.counts[s][i] for s in ("train", "val", "test")) for i, c in enumerate(report.classes)}
    assert total == {"circle": 21, "square": 6, "triangle": 21}  # cut.png still counted: its header reads
    assert report.imbalance > 3
    text = " ".join(report.warnings)
    assert "class imbalance: 'circle'" in text and "'square'" in text
    assert "fewer than 10 training images for: square" in text
    assert "different image sizes" in text and "mixed image modes" in text
    unreadable = "\n".join(report.unreadable)
    assert "empty.png" in unreadable and "cut.png" in unreadable  # one by the loader, one by the full decode
    assert report.sizes["32x32"] > 0 and report.sizes["40x30"] == 1 and report.modes["L"] == 1
    assert len(report.mean) == len(report.std) == 3
    assert all(0 < m < 1 for m in report.mean) and all(0 < s < 1 for s in report.std)


def test_data_command_writes_report_and_pictures(messy_folder, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["data", "--data", str(messy_folder), "--out", str(out), "--per-class", "4"]) == 0
    printed = capsys.readouterr().out
    assert "| circle |" in printed and "## Warnings" in printed and "## Unreadable files" in printed
    assert json.loads((out / "report.json").read_text())["counts"]["train"][1] < 6
    assert "empty.png" in (out / "unreadable.txt").read_text()
    with Image.open(out / "samples.png") as grid:
        assert grid.size[1] > grid.size[0] / 4  # three rows of four images
    assert (out / "counts.png").exists()


def test_tutorial_comparison_fully_connected_vs_convolutional():
    mlp, size = model_from_name("tutorial_mlp", num_classes=2)
    cnn, _ = model_from_name("tutorial_tanh_cnn", num_classes=2)
    mlp_report, cnn_report = model_report(mlp, size, "tutorial_mlp"), model_report(cnn, size, "tutorial_tanh_cnn")
    assert cnn_report.parameters == 18_090
    assert mlp_report.parameters == sum(p.numel() for p in mlp.parameters()) == 3_737_474
    assert mlp_report.by_kind()["convolution"] == 0
    assert cnn_report.by_kind()["convolution"] == 448 + 1_160  # 16x3x3x3+16, then 8x16x3x3+8
    first = cnn_report.layers[0]
    assert (first.name, first.type, first.output_shape) == ("features.0", "Conv2d", (16, 32, 32))
    assert cnn_report.bytes == 4 * 18_090
    assert "tutorial_mlp has 207x the parameters of tutorial_tanh_cnn" in comparison_markdown([mlp_report, cnn_report])


def test_every_parameter_is_in_the_table_of_a_timm_model():
    model, size = model_from_name("resnet18", num_classes=5, image_size=64)
    report = model_report(model, size, "resnet18")
    assert report.parameters == sum(p.numel() for p in model.parameters())
    assert report.layers[-1].output_shape == (5,)


def test_model_command_compares_and_draws(tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["model", "--model", "tutorial_mlp", "tutorial_tanh_cnn", "--num-classes", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "**3,737,474 parameters**" in printed and "**18,090 parameters**" in printed
    assert "no filters to show" in printed  # the MLP has none
    assert (out / "tutorial_tanh_cnn" / "filters.png").exists()
    assert (out / "tutorial_tanh_cnn" / "feature_maps.png").exists()
    assert not (out / "tutorial_mlp" / "filters.png").exists()
    assert "207x" in (out / "comparison.md").read_text()


def test_network_figures_draw_every_conv_layer_and_one_images_channels(tmp_path):
    from classifier.reports.model import CHANNEL_VALUES_SIDE, centre_crop, input_image, plot_network_figures

    photo = Image.new("RGB", (50, 40), (200, 30, 30))
    model, size = model_from_name("tutorial_tuning_cnn", 10)
    drawn = plot_network_figures(model, photo, size, tmp_path / "colour")
    assert set(drawn) == {"conv_filters", "channels", "edges"} and all(p.is_file() for p in drawn.values())
    with Image.open(drawn["conv_filters"]) as filters:  # a panel for each of the four convolutions
        assert filters.height > filters.width
    # the channels are the pixels at the network's input size, cropped to where values are legible
    assert centre_crop(input_image(photo, size), CHANNEL_VALUES_SIDE).size == (16, 16)
    grey, grey_size = model_from_name("tutorial_apparel_cnn", 10, in_chans=1)
    assert set(plot_network_figures(grey, photo.convert("L"), grey_size, tmp_path / "grey")) == {"conv_filters", "edges"}
    mlp, mlp_size = model_from_name("tutorial_mlp", 2)
    assert plot_network_figures(mlp, None, mlp_size, tmp_path / "mlp") == {}  # no filters, no image


def test_model_command_on_a_bundle_with_an_image(tiny_bundle, tmp_path, capsys):
    image = tmp_path / "photo.png"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(image)
    out = tmp_path / "bundle-model"
    assert main(["model", "--bundle", str(tiny_bundle), "--image", str(image), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    weights = load_bundle(tiny_bundle).model
    assert report["parameters"] == sum(p.numel() for p in weights.parameters())
    with Image.open(out / "feature_maps.png") as maps:
        assert maps.size[0] > maps.size[1]
    assert main(["model", "--model", "no_such_net"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_samples_report_rebuilds_the_bundle_test_split(tiny_bundle, tmp_path, capsys):
    bundle = load_bundle(tiny_bundle)
    data = bundle_data(bundle, rerun_config(bundle, str(tiny_bundle)))
    result = samples_report(bundle, data, tmp_path / "samples.png", count=12)
    # the same split as training evaluated: the same accuracy as the bundle records
    assert result["accuracy"] == pytest.approx(bundle.project["metrics"]["accuracy"], abs=1e-6)
    assert result["shown"] == 12 and result["images"] == len(data.test)
    assert (tmp_path / "samples.png").exists()
    # the command line finds the data through the bundle when --data is not given
    assert main(["samples", str(tiny_bundle), "--out", str(tmp_path / "cli.png"), "--count", "8"]) == 0
    assert f"accuracy {result['accuracy']:.4f}" in capsys.readouterr().out


def test_samples_report_refuses_other_data(tiny_bundle, tmp_path, capsys):
    other = make_image_folder(tmp_path / "other", per_class=3)
    (other / "circle").rename(other / "oval")
    assert main(["samples", str(tiny_bundle), "--data", str(other), "--out", str(tmp_path / "x.png")]) == 2
    assert "are not the bundle's" in capsys.readouterr().err
