"""classifier.plots' lesson figures: every conv layer's filters, an image's channels as numbers."""

import numpy as np
import pytest
from PIL import Image

from classifier.models import conv_filters, create_model
from classifier.plots import _filter_mosaic, plot_conv_filters, plot_image_channels

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG


def test_conv_filters_lists_every_convolution_in_order():
    layers = conv_filters(create_model("tutorial_apparel_cnn", num_classes=10, in_chans=1))
    assert [(name, w.shape) for name, w in layers] == [("features.0", (4, 1, 3, 3)), ("features.4", (4, 4, 3, 3))]
    assert all(isinstance(w, np.ndarray) for _, w in layers)


def test_the_mosaic_places_each_kernel_in_its_row_and_column():
    weight = np.arange(2 * 3 * 3 * 3, dtype=float).reshape(2, 3, 3, 3)
    mosaic = _filter_mosaic(weight, max_filters=8, max_inputs=8)
    assert mosaic.shape == (3 * 4 - 1, 2 * 4 - 1)  # a row per input, kernels with one-pixel gaps
    np.testing.assert_array_equal(mosaic[8:11, 4:7], weight[1, 2])  # filter 1's kernel on input 2
    assert np.isnan(mosaic[3]).all() and np.isnan(mosaic[:, 3]).all()
    assert _filter_mosaic(weight, max_filters=1, max_inputs=2).shape == (7, 3)


@pytest.mark.parametrize("name, in_chans", [("tutorial_apparel_cnn", 1), ("tutorial_tuning_cnn", 3)])
def test_plot_conv_filters_writes_a_png_of_every_layer(tmp_path, name, in_chans):
    layers = conv_filters(create_model(name, num_classes=10, in_chans=in_chans))
    path = plot_conv_filters(layers, tmp_path / "figures" / "filters.png")
    assert _is_png(path)
    assert Image.open(path).height > 150 * len(layers)  # one panel per layer, not only the first


def test_plot_conv_filters_needs_a_layer(tmp_path):
    with pytest.raises(ValueError, match="no convolution layers"):
        plot_conv_filters([], tmp_path / "none.png")


def test_plot_image_channels_with_values_and_with_a_colour_bar(tmp_path):
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    assert _is_png(plot_image_channels(small, tmp_path / "small.png"))
    large = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # arrays too, past values_up_to
    assert _is_png(plot_image_channels(large, tmp_path / "large.png"))
    grey = Image.fromarray(large[:, :, 0])  # converted to RGB: three equal channels
    assert _is_png(plot_image_channels(grey, tmp_path / "grey.png"))
    with pytest.raises(ValueError, match="RGB"):
        plot_image_channels(large[:, :, 0], tmp_path / "bad.png")
