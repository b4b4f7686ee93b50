"""Grad-CAM (classifier.cam): the heatmap lands on the object that decided the class, through both
ways of finding the feature map, and on the shipped bundles through the Predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from classifier.errors import NoFeatureMap
from classifier.cam import colorize, grad_cam, grad_cam_tta, overlay, peak_position
from classifier.predict import Predictor

SIZE = 32


class RedDetector(nn.Module):
    """A constructed CNN whose class 1 ("red thing") is the amount of red-not-green-or-blue in the
    image, found by a 3x3 conv, then max-pooled to a 8x8 map (the map Grad-CAM must find), and
    class 0 the opposite; a plain nn.Sequential body, so only the hook path can find the map."""

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[0, :, 1, 1] = torch.tensor([1.0, -1.0, -1.0])  # red minus green and blue
            conv.weight[1:, :, 1, 1] = 0.01  # channels with a little signal everywhere, no class evidence
        self.body = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(4))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[-1.0, 0, 0, 0], [1.0, 0, 0, 0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.pool(self.body(x)))


class SplitRedDetector(RedDetector):
    """The same network with timm's forward_features / forward_head split."""

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, x):
        return self.fc(self.pool(x))


def scene(top: int, left: int, side: int = 8) -> torch.Tensor:
    """A grey, noisy image with one red square at (top, left)."""
    rng = np.random.default_rng(top * 100 + left)
    x = torch.from_numpy(rng.uniform(0.3, 0.4, (3, SIZE, SIZE)).astype(np.float32))
    x[:, top:top + side, left:left + side] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1)
    return x


@pytest.mark.parametrize("model_class", [RedDetector, SplitRedDetector])
@pytest.mark.parametrize("top, left", [(0, 0), (4, 20), (20, 8), (24, 24)])
def test_heatmap_peaks_on_the_object(model_class, top, left):
    model = model_class().eval()
    heatmap, target = grad_cam(model, scene(top, left))
    assert target == 1  # the red square makes it "red thing"
    assert heatmap.shape == (SIZE, SIZE) and float(heatmap.max()) == pytest.approx(1.0)
    row, col = peak_position(heatmap)
    assert top - 2 <= row < top + 10 and left - 2 <= col < left + 10, (row, col)
    # Most of the heat is on the square: the far corner opposite it is cold.
    far_row, far_col = (SIZE - 1 - top - 4, SIZE - 1 - left - 4)
    assert float(heatmap[max(0, far_row), max(0, far_col)]) < 0.2


def test_mirror_averaged_heatmap_still_peaks_on_the_object():
    heatmap = grad_cam_tta(RedDetector().eval(), scene(4, 20), target=1, tta="flip")
    row, col = peak_position(heatmap)
    assert 2 <= row < 14 and 18 <= col < 30


def test_evidence_against_a_class_is_not_shown_as_heat():
    # For class 0 ("not red") the red square only argues against: ReLU leaves no positive evidence.
    heatmap, target = grad_cam(RedDetector().eval(), scene(8, 8), target=0)
    assert target == 0 and float(heatmap.max()) == 0.0


def test_a_model_without_a_feature_map_says_so():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 2))
    with pytest.raises(NoFeatureMap, match="no convolutional feature map"):
        grad_cam(mlp, scene(0, 0))


def test_hooks_are_removed_and_training_mode_restored():
    model = RedDetector().train()
    grad_cam(model, scene(0, 0))
    assert model.training
    assert not any(m._forward_hooks for m in model.modules())


def test_colour_map_runs_from_blue_to_red_and_the_overlay_is_enlarged():
    colours = colorize(np.array([[0.0, 0.5, 1.0]]))
    assert colours[0, 0, 2] > colours[0, 0, 0]  # cold: blue
    assert colours[0, 2, 0] > colours[0, 2, 2]  # hot: red
    picture = overlay(Image.new("RGB", (32, 32), "white"), np.ones((32, 32), np.float32))
    assert picture.size == (256, 256)


@pytest.mark.parametrize("bundle", ["assets/models/cifar10-cnn", "assets/models/cifar10-efficientnet-lite0"])
def test_shipped_bundles_explain_their_prediction(bundle):
    predictor = Predictor(bundle)
    picture, label = predictor.explain("tests/assets/cat.jpg")
    assert label == next(iter(predictor.predict("tests/assets/cat.jpg")))
    assert picture.mode == "RGB" and min(picture.size) >= 256
    # A heatmap is drawn: the picture is not just the enlarged grey-ish photo, it has saturated colours.
    hsv = np.asarray(picture.convert("HSV"))
    assert (hsv[..., 1] > 150).mean() > 0.2
    with pytest.raises(ValueError, match="not a class"):
        predictor.explain("tests/assets/cat.jpg", label="lion")
