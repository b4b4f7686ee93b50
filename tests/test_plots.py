"""classifier.plots' lesson figures: every conv layer's filters, an image's channels as numbers, a hand-set edge kernel."""

import numpy as np
import pytest
from PIL import Image

from classifier.models import conv_filters, create_model
from classifier.plots import (SOBEL_VERTICAL, _filter_mosaic, edge_response, plot_conv_filters, plot_edge_kernel,
                              plot_image_channels)

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


def _vertical_step(height: int = 8, width: int = 8, step: int = 4) -> np.ndarray:
    """Black on the left of column `step`, white from it on: one vertical edge."""
    image = np.zeros((height, width), dtype=np.uint8)
    image[:, step:] = 255
    return image


def test_the_sobel_kernel_answers_at_the_step_and_nowhere_else():
    response = edge_response(_vertical_step())
    # columns 3 and 4 straddle the step: (255 - 0) x (1 + 2 + 1) each, every row alike
    assert np.allclose(response[:, 3:5], 4 * 255)
    flat = np.delete(response, [3, 4], axis=1)
    assert np.allclose(flat, 0)  # flat areas and the borders (repeated, not zero-padded) give nothing


def test_the_kernel_is_not_flipped_and_a_horizontal_one_sees_no_vertical_edge():
    # conv2d is a cross-correlation: the kernel flipped left-right gives the opposite sign
    assert np.allclose(edge_response(_vertical_step(), SOBEL_VERTICAL[:, ::-1].copy())[:, 3:5], -4 * 255)
    assert np.allclose(edge_response(_vertical_step(), SOBEL_VERTICAL.T.copy()), 0)


def test_plot_edge_kernel_writes_a_png(tmp_path):
    path = plot_edge_kernel(Image.fromarray(_vertical_step(16, 24, 10)).convert("RGB"), tmp_path / "edges.png")
    assert _is_png(path)
    laplacian = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]])
    assert _is_png(plot_edge_kernel(_vertical_step(), tmp_path / "laplacian.png", kernel=laplacian))


def test_edge_response_needs_a_3x3_kernel():
    with pytest.raises(ValueError, match="3x3 kernel"):
        edge_response(_vertical_step(), np.ones((5, 5)))
