"""The learning-rate range test: it leaves the model alone, sweeps as promised, suggests sensibly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from classifier.cli.lr_find import main
from classifier.config import TrainConfig
from classifier.errors import LRFinderError
from classifier.lr_finder import lr_range_test, suggest
from classifier.plots import plot_lr_finder


def _separable_loader(n: int = 256, batch_size: int = 32, seed: int = 0, label_noise: float = 0.0) -> DataLoader:
    """Two Gaussian blobs as 3x8x8 'images': learnable within a few dozen steps. With label noise
    the loss cannot reach zero, so a too-high rate makes it explode instead of saturate."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 3, 8, 8, generator=g) + (y.float() * 2 - 1).view(-1, 1, 1, 1) * 0.8
    y = torch.where(torch.rand(n, generator=g) < label_noise, 1 - y, y)
    return DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=batch_size, shuffle=True, generator=g)


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


def test_model_and_optimizer_are_left_untouched():
    model = _small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y, _ = next(iter(_separable_loader()))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()  # momentum buffers now exist: the range test must not advance them
    weights = {k: v.clone() for k, v in model.state_dict().items()}  # includes BatchNorm running stats
    opt_state = {i: s["momentum_buffer"].clone() for i, s in enumerate(optimizer.state.values())}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()

    result = lr_range_test(model, _separable_loader(), optimizer=optimizer, num_steps=40, end_lr=1.0)

    assert len(result.lrs) > 10
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), f"{key} changed"
    for i, state in enumerate(optimizer.state.values()):
        assert torch.equal(state["momentum_buffer"], opt_state[i])
    assert optimizer.param_groups[0]["lr"] == 0.01
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert torch.equal(torch.get_rng_state(), rng), "the test must not shift the training's random draws"


def test_sweep_is_exponential_and_suggestion_is_on_the_descent():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.ReLU(), nn.Linear(32, 2))
    result = lr_range_test(mlp, _separable_loader(label_noise=0.2), TrainConfig(optimizer="sgd", weight_decay=0),
                           start_lr=1e-5, end_lr=100.0, num_steps=80)
    lrs = np.asarray(result.lrs)
    assert lrs[0] == pytest.approx(1e-5)
    ratios = lrs[1:] / lrs[:-1]
    assert np.allclose(ratios, (100.0 / 1e-5) ** (1 / 79))  # constant growth factor: a straight line on a log axis
    assert result.diverged, "SGD at lr 100 should blow the loss up and end the sweep early"
    assert len(lrs) < 80
    assert 1e-5 < result.suggestion < lrs[-1]
    # The suggestion sits where the smoothed loss is already below its starting level.
    at = int(np.searchsorted(lrs, result.suggestion))
    assert result.smoothed[at] < result.smoothed[0]
    assert result.summary()["suggestion"] == result.suggestion


def test_suggestions_on_a_known_curve():
    lrs = list(np.logspace(-6, 1, 140))
    log_lr = np.log10(lrs)
    # flat at 2.0 up to 1e-4, falling linearly (in log lr) to 0.5 at 1e-1, then climbing steeply
    loss = np.where(log_lr < -4, 2.0, np.where(log_lr < -1, 2.0 - 0.5 * (log_lr + 4), 0.5 + 3 * (log_lr + 1)))
    s = suggest(lrs, list(loss))
    assert 1e-4 < s["valley"] < 1e-1
    assert 1e-4 < s["steepest"] < 1e-1
    assert s["minimum"] == pytest.approx(lrs[int(np.argmin(loss))] / 10)


def test_group_ratios_are_kept():
    """A body at 0.1x the head's rate stays at 0.1x throughout the sweep."""
    seen = []

    class SpySGD(torch.optim.SGD):
        def step(self, closure=None):
            seen.append([g["lr"] for g in self.param_groups])
            return super().step(closure)

    model = _small_cnn()
    body = [p for n, p in model.named_parameters() if not n.startswith("5.")]
    head = [p for n, p in model.named_parameters() if n.startswith("5.")]
    optimizer = SpySGD([{"params": head, "lr": 1.0}, {"params": body, "lr": 0.1}], lr=1.0)
    lr_range_test(model, _separable_loader(), optimizer=optimizer, num_steps=20, end_lr=1e-2)
    assert len(seen) == 20
    assert all(b == pytest.approx(h * 0.1) for h, b in seen)
    assert seen[-1][0] == pytest.approx(1e-2)


def test_bad_arguments_are_refused():
    with pytest.raises(LRFinderError, match="start_lr < end_lr"):
        lr_range_test(_small_cnn(), _separable_loader(), start_lr=1.0, end_lr=0.1)
    with pytest.raises(LRFinderError, match="exploded"):
        lr_range_test(_small_cnn(), _separable_loader(), TrainConfig(optimizer="sgd"), start_lr=1e6, end_lr=1e9,
                      num_steps=30)


def test_plot_is_written(tmp_path):
    result = lr_range_test(_small_cnn(), _separable_loader(), num_steps=30, end_lr=1.0)
    path = plot_lr_finder(result, tmp_path / "plots" / "lr.png")
    with Image.open(path) as image:
        assert image.size[0] > 400 and image.size[1] > 200


def test_command_line_writes_plot_and_curve(image_folder, tmp_path, capsys):
    out = tmp_path / "lr.png"
    code = main(["--data", str(image_folder), "--model", "tutorial_tanh_cnn", "--batch-size", "16",
                 "--steps", "30", "--workers", "0", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    curve = json.loads(out.with_suffix(".json").read_text())
    assert out.exists() and len(curve["lrs"]) == len(curve["smoothed"]) > 10
    assert f"--lr {curve['suggestion']:.3g}" in printed
    assert math.isfinite(curve["suggestion"])


def test_command_line_reports_a_bad_model(image_folder, tmp_path, capsys):
    code = main(["--data", str(image_folder), "--model", "no_such_net", "--workers", "0",
                 "--out", str(tmp_path / "lr.png")])
    assert code == 2
    assert "unknown model 'no_such_net'" in capsys.readouterr().err


def test_finetune_lr_auto_uses_the_suggestion(image_folder, tmp_path):
    """--lr auto: the finder runs first, fit trains at its suggestion, the bundle records both."""
    from classifier.cli import train as finetune

    out = tmp_path / "run"
    code = finetune.main(["--data", str(image_folder), "--model", "tutorial_tanh_cnn", "--epochs", "1",
                          "--batch-size", "16", "--lr", "auto", "--lr-finder-steps", "25", "--workers", "0",
                          "--mistakes", "0", "--out", str(out)])
    assert code == 0
    config = json.loads((out / "bundle" / "config.json").read_text())["classifier"]
    suggestion = config["lr_finder"]["suggestion"]
    assert config["training"]["lr"] == "auto"
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["config"]["lr"] == pytest.approx(suggestion)
    assert (out / "bundle" / "eval" / "lr_finder.png").exists()
