"""fast_cnn (airbench94's net), the fast recipe's options, and the test-time augmentation it is evaluated with."""

import copy

import pytest
import torch
from torch import nn

from classifier.config import RunConfig, apply_recipe
from classifier.models import create_model
from classifier.tta import TTA, TTA_MODES, tta_logits, tta_mode


def net(**kwargs):
    torch.manual_seed(0)
    return create_model("fast_cnn", num_classes=3, widths=(8, 16), **kwargs)


def correlated_images(n=64, size=16):
    """Smooth images: neighbouring pixels and the channels are strongly correlated, as in photos."""
    base = torch.randn(n, 1, size // 4, size // 4)
    x = nn.functional.interpolate(base, size=size, mode="bilinear").repeat(1, 3, 1, 1)
    return x + 0.1 * torch.randn(n, 3, size, size)


def test_the_first_training_batch_whitens_the_input_patches():
    model = net().train()
    x = correlated_images()
    model(x)
    whiten = model.whiten
    assert bool(whiten.initialised)
    half = whiten.weight[: whiten.out_channels // 2]
    out = nn.functional.conv2d(x, half).permute(0, 2, 3, 1).reshape(-1, half.shape[0])
    covariance = out.T @ out / len(out)
    # The filters' outputs are decorrelated with (nearly) unit variance: whitened patches.
    off_diagonal = covariance - torch.diag(torch.diag(covariance))
    assert off_diagonal.abs().max() < 0.05
    assert torch.diag(covariance)[:4].min() > 0.9  # the strong directions; tiny ones are damped by eps
    assert not whiten.weight.requires_grad and whiten.bias.requires_grad


def test_the_whitening_survives_saving_and_is_not_redone():
    model = net().train()
    model(correlated_images())
    loaded = net(bias_lr_scale=64.0)
    loaded.load_state_dict(model.state_dict())
    loaded.train()(torch.randn(8, 3, 16, 16))  # different data: must not re-whiten
    assert torch.equal(loaded.whiten.weight, model.whiten.weight)
    eval_only = net().eval()
    eval_only(torch.randn(2, 3, 16, 16))
    assert not bool(eval_only.whiten.initialised)  # evaluation never sets the filters


def test_batchnorm_biases_learn_bias_lr_scale_times_faster():
    def step_of_effective_bias(scale):
        model = net(bias_lr_scale=scale).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        fast_bias = model.groups[0][3]
        before = (fast_bias.bias * fast_bias.scale).detach().clone()
        torch.manual_seed(1)
        model(correlated_images(16)).square().sum().backward()
        optimizer.step()
        return (fast_bias.bias * fast_bias.scale).detach() - before

    slow, fast = step_of_effective_bias(1.0), step_of_effective_bias(64.0)
    torch.testing.assert_close(fast, 64 * slow, rtol=1e-3, atol=1e-7)


def test_the_fast_bias_survives_a_deep_copy_and_sync_batchnorm_conversion():
    model = net().eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "scale") and hasattr(m, "bias"):
                m.bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 16, 16)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    torch.testing.assert_close(converted(x), model(x))


def test_tta_averages_mirror_and_shifted_views():
    calls = []

    class Corner(nn.Module):  # looks at one pixel: sees every view differently
        def forward(self, x):
            calls.append(x.shape)
            return x[:, :, 0, :3].mean(1)

    x = torch.randn(4, 3, 8, 8)
    assert tta_logits(Corner(), x, "flip-shift").shape == (4, 3) and len(calls) == 6
    assert not torch.allclose(tta_logits(Corner(), x), Corner()(x))
    calls.clear()
    mirrored = tta_logits(Corner(), x, "flip")
    assert len(calls) == 2
    torch.testing.assert_close(mirrored, (Corner()(x) + Corner()(x.flip(-1))) / 2)
    torch.testing.assert_close(tta_logits(Corner(), x, "none"), Corner()(x))
    flat = torch.ones(4, 3, 8, 8) * torch.randn(4, 3, 1, 1)  # every view of a flat image is the same
    for mode in TTA_MODES:
        torch.testing.assert_close(TTA(Corner(), mode)(flat), Corner()(flat))


def test_tta_modes_read_the_bools_older_bundles_recorded():
    assert tta_mode(True) == "flip-shift" and tta_mode(False) == tta_mode(None) == "none"
    assert tta_mode("flip") == "flip"
    with pytest.raises(ValueError, match="expected one of none, flip, flip-shift"):
        tta_mode("mirror")


def test_the_fast_recipe_fills_only_what_the_user_left_out():
    values = apply_recipe({"model": "fast_cnn", "recipe": "auto", "epochs": 20, "batch_size": 128, "lr": None,
                           "label_smoothing": 0.0}, given={"epochs", "label_smoothing"})
    assert values["recipe"] == "fast" and values["epochs"] == 20 and values["label_smoothing"] == 0.0
    assert values["batch_size"] == 512 and values["lr"] == pytest.approx(0.75) and values["tta"] == "flip-shift"
    assert values["warmup_epochs"] == pytest.approx(4.6)  # 23% of the 20 epochs given
    smaller = apply_recipe({"model": "fast_cnn", "recipe": "fast", "batch_size": 256}, given={"batch_size"})
    assert smaller["lr"] == pytest.approx(0.375)  # the learning rate follows the batch size
    other = apply_recipe({"model": "resnet18", "recipe": "auto", "batch_size": 64}, given=set())
    assert other == {"model": "resnet18", "recipe": "none", "batch_size": 64}
    RunConfig(**apply_recipe({"model": "fast_cnn", "recipe": "fast"}))  # every key is a RunConfig field
    with pytest.raises(ValueError, match="unknown recipe"):
        apply_recipe({"recipe": "slow"})


def test_the_command_line_fills_fast_cnns_options_from_the_recipe():
    from classifier.cli import train as finetune

    parser = finetune.build_parser()

    def config(*argv):
        return finetune.config_from_args(parser.parse_args(list(argv)), finetune.given_options(parser, list(argv)))

    fast = config("--model", "fast_cnn", "--epochs=3", "--batch-size", "64", "--tta", "none")
    assert fast.recipe == "fast" and fast.epochs == 3 and fast.batch_size == 64 and fast.tta == "none"
    assert fast.lr == pytest.approx(64 * 1.5 / 1024) and fast.label_smoothing == 0.2 and fast.momentum == 0.85
    plain = config("--model", "fast_cnn", "--recipe", "none")
    assert plain.recipe == "none" and plain.batch_size == RunConfig.batch_size and plain.lr is None
    other = config("--model", "resnet18")
    assert other.recipe == "none" and other.label_smoothing == RunConfig.label_smoothing
    abbreviated = config("--model", "fast_cnn", "--batch", "256")  # argparse takes --batch for --batch-size
    assert abbreviated.batch_size == 256 and abbreviated.lr == pytest.approx(256 * 1.5 / 1024)
