"""classifier.loop.fit: learning, schedules, freezing, early stopping, checkpoints, exact resume, NaN."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, DistributedSampler

from classifier.config import TrainConfig
from classifier.data import ImageDataset, collate_skipping_broken, load_data, materialize_small
from classifier.errors import TrainingDiverged
from classifier.loop import LAST_CHECKPOINT, fit
from classifier.models import create_model
from classifier.runtime import autocast_dtype
from classifier.transforms import eval_transform, train_transform
from tests.conftest import make_image_folder, preprocessing


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("shapes"), per_class=30)
    return materialize_small(load_data(str(root), val_fraction=0.2, test_fraction=0.1))


def loaders(data, batch_size=16, augment=True, seed=0):
    def make(split, train):
        pcfg = preprocessing(32, (0.3,) * 3, (0.3,) * 3)
        transform = train_transform(pcfg, small=True) if train and augment else eval_transform(pcfg)
        dataset = ImageDataset(split, transform)
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=train, seed=seed)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_skipping_broken)
    return make(data.train, True), make(data.val, False)


def small_cnn(seed=0, drop_rate=0.0):
    torch.manual_seed(seed)
    return create_model("fast_cnn", num_classes=3, widths=(8, 16, 32), drop_rate=drop_rate)


def test_fit_learns_and_writes_its_logs(shapes, tmp_path):
    model = small_cnn()
    train, val = loaders(shapes)
    result = fit(model, train, val, TrainConfig(epochs=4, lr=0.05, optimizer="sgd"), tmp_path)
    assert result.history[-1]["val_acc"] >= 0.8
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    best = load_file(str(result.best_weights))
    assert result.best_epoch == min(result.history, key=lambda r: r["val_loss"])["epoch"]
    assert set(best) == set(model.state_dict())
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries behind


def test_fit_trains_channels_last_on_the_cpu(shapes, tmp_path):
    """NHWC weights and batches (1.0-2.2x the images/s of NCHW here: benchmarks/step_speed.py);
    the saved weights are plain contiguous tensors all the same."""
    torch.manual_seed(0)
    model = create_model("tutorial_cifar_cnn", num_classes=3)  # takes its NCHW batches as given
    seen = []
    model.register_forward_pre_hook(  # training batches only: validation feeds the NHWC weights as it is
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)) if m.training else None)
    result = fit(model, *loaders(shapes), TrainConfig(epochs=1, lr=0.05, optimizer="sgd"), tmp_path)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert seen and all(seen)
    assert all(t.is_contiguous() for t in load_file(str(result.best_weights)).values())


def test_mixup_and_cutmix_train_on_mixed_soft_targets(shapes, tmp_path, monkeypatch):
    from classifier import loop as train

    calls = []
    real = train.SOFT_TARGET_LOSS

    def spy(logits, targets):
        calls.append((len(targets), targets.max(1).values.min().item()))
        return real(logits, targets)

    monkeypatch.setattr(train, "SOFT_TARGET_LOSS", spy)
    config = TrainConfig(epochs=6, lr=0.05, optimizer="sgd", mixup=0.2, cutmix=1.0, label_smoothing=0.1)
    train_loader, val_loader = loaders(shapes, batch_size=16)
    result = fit(small_cnn(), train_loader, val_loader, config, tmp_path / "even")
    assert [n for n, _ in calls] == [len(batch[1]) for batch in train_loader] * 6  # every batch mixed
    assert min(top for _, top in calls) < 0.9  # soft targets: mixed labels, smoothing folded in
    assert result.history[-1]["val_acc"] >= 0.7  # it still learns the shapes

    calls.clear()  # odd batches cannot be paired off: they train unmixed on their own labels
    odd = loaders(shapes, batch_size=13)
    assert all(len(batch[1]) % 2 for batch in odd[0])
    fit(small_cnn(), *odd, TrainConfig(epochs=1, lr=0.05, optimizer="sgd", mixup=0.2), tmp_path / "odd")
    assert calls == []


def test_no_mixing_unless_asked():
    from classifier.loop import batch_mixer

    assert batch_mixer(TrainConfig(), small_cnn()) is None
    mixer = batch_mixer(TrainConfig(cutmix=1.0), small_cnn())
    assert mixer.num_classes == 3 and mixer.cutmix_alpha == 1.0 and mixer.mixup_alpha == 0.0


class StopAfter(Exception):
    pass


@pytest.mark.parametrize("ema_decay", [0.0, 0.9], ids=["raw", "moving-average"])
def test_interrupted_run_resumes_exactly(shapes, tmp_path, ema_decay):
    """A run stopped after epoch 2 and resumed ends bit-for-bit where an uninterrupted run ends.

    The tolerance is zero on purpose: on the CPU with a fixed thread count every operation is
    deterministic, and the checkpoint restores model, optimiser, schedule, the weights' moving
    average and every RNG (the data order, augmentation and dropout draw from them), so any
    difference is a resume bug.
    """
    config = TrainConfig(epochs=4, lr=0.05, optimizer="sgd", schedule="onecycle", label_smoothing=0.1,
                         ema_decay=ema_decay)
    whole = small_cnn(drop_rate=0.2)
    fit(whole, *loaders(shapes), config, tmp_path / "whole")

    def stop(record):
        if record["epoch"] == 2:
            raise StopAfter

    interrupted = small_cnn(drop_rate=0.2)
    with pytest.raises(StopAfter):
        fit(interrupted, *loaders(shapes), config, tmp_path / "cut", on_epoch_end=stop)
    resumed = small_cnn(seed=123, drop_rate=0.2)  # a fresh process: different initial weights
    result = fit(resumed, *loaders(shapes), config, tmp_path / "cut", resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    uninterrupted = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in again] == [r["val_loss"] for r in uninterrupted]


def test_moving_average_of_the_weights_is_validated_and_delivered(shapes, tmp_path, monkeypatch):
    """Without warm-up the average starts at the initial weights: after each step
    average = decay * average + (1 - decay) * weights. It is what the run validates, saves as its
    best and ends with; the raw weights stay in last.pt (to resume) and in the record beside it."""
    from classifier import loop as train

    snapshots = []  # one conv weight after every optimiser step
    real_build = train.build_optimizer

    def recording_optimizer(model, config):
        optimizer = real_build(model, config)
        optimizer.register_step_post_hook(lambda *_: snapshots.append(model.state_dict()[key].clone()))
        return optimizer

    monkeypatch.setattr(train, "build_optimizer", recording_optimizer)
    model = small_cnn()
    key = next(k for k, v in model.state_dict().items() if v.ndim == 4)
    expected = model.state_dict()[key].clone()
    decay = 0.8
    config = TrainConfig(epochs=2, lr=0.05, optimizer="sgd", schedule="constant", ema_decay=decay)
    train_loader, val_loader = loaders(shapes)
    result = fit(model, train_loader, val_loader, config, tmp_path)

    for weights in snapshots:
        expected = decay * expected + (1 - decay) * weights
    assert len(snapshots) == config.epochs * len(train_loader)
    torch.testing.assert_close(model.state_dict()[key], expected)
    assert not torch.allclose(snapshots[-1], expected)  # the average is not the last step's weights
    checkpoint = torch.load(tmp_path / LAST_CHECKPOINT, weights_only=True)
    assert torch.equal(checkpoint["model"][key], snapshots[-1])
    assert torch.equal(checkpoint["ema"][key], model.state_dict()[key])
    if result.best_epoch == 2:
        assert torch.equal(load_file(str(result.best_weights))[key], model.state_dict()[key])
    for record in result.history:
        assert {"val_acc", "val_loss", "raw_val_acc", "raw_val_loss"} <= set(record)
        assert record["val_loss"] != record["raw_val_loss"]


def test_warmed_up_average_forgets_the_initial_weights(shapes, tmp_path):
    """timm's warm-up (the first update replaces the average, then decay 1 - (1 + step)**(-2/3) up
    to the one asked for) starts from the first step's weights instead; with a slow decay the two
    kinds of average end far apart."""
    config = dict(epochs=1, lr=0.05, optimizer="sgd", ema_decay=0.999)
    initial = small_cnn().state_dict()
    kept, warmed = small_cnn(), small_cnn()
    fit(kept, *loaders(shapes), TrainConfig(**config), tmp_path / "kept")
    fit(warmed, *loaders(shapes), TrainConfig(**config, ema_warmup=True), tmp_path / "warmed")
    key = next(k for k, v in initial.items() if v.ndim == 4)
    distance = lambda model: (model.state_dict()[key] - initial[key]).norm().item()  # noqa: E731
    assert distance(kept) < 0.1 * distance(warmed)


@pytest.mark.parametrize("first, then", [(0.0, 0.9), (0.9, 0.0)])
def test_a_run_resumes_only_with_the_kind_of_weights_it_delivers(shapes, tmp_path, first, then):
    """Its earlier epochs validated (and saved as the best) the average, or the raw weights: mixing
    the two in one run is refused with one clear line (a USER_ERRORS one, so the CLI prints it)."""
    from classifier.errors import USER_ERRORS, ResumeMismatch

    def stop(record):
        raise StopAfter

    with pytest.raises(StopAfter):
        fit(small_cnn(), *loaders(shapes), TrainConfig(epochs=2, lr=0.05, optimizer="sgd", ema_decay=first),
            tmp_path, on_epoch_end=stop)
    with pytest.raises(ResumeMismatch, match=f"other settings than this run's: ema_decay {first:g} -> {then:g}"):
        fit(small_cnn(), *loaders(shapes), TrainConfig(epochs=2, lr=0.05, optimizer="sgd", ema_decay=then),
            tmp_path, resume=True)
    assert issubclass(ResumeMismatch, USER_ERRORS)


def test_early_stopping_on_validation_loss(shapes, tmp_path):
    # A rate this low barely moves the weights, so validation loss soon stops improving.
    config = TrainConfig(epochs=30, lr=1e-4, optimizer="sgd", schedule="constant", patience=2)
    result = fit(small_cnn(), *loaders(shapes, augment=False), config, tmp_path)
    losses = [r["val_loss"] for r in result.history]
    assert result.stopped_early and len(losses) < 30
    # It stopped exactly `patience` epochs after the best one, none of which was better.
    assert len(losses) == result.best_epoch + 2
    assert min(losses[result.best_epoch:]) >= losses[result.best_epoch - 1]


def test_freeze_epochs_train_only_the_head_first(shapes, tmp_path):
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}

    def snapshot(record):
        seen[record["epoch"]] = {k: v.clone() for k, v in model.state_dict().items()}

    head = {id(p) for p in model.get_classifier().parameters()}
    body = next(name for name, p in model.named_parameters() if p.requires_grad and id(p) not in head and p.ndim == 4)
    config = TrainConfig(epochs=2, lr=0.05, optimizer="sgd", freeze_epochs=1, backbone_lr_scale=0.5)
    fit(model, *loaders(shapes), config, tmp_path, on_epoch_end=snapshot)
    assert torch.equal(seen[1][body], before[body])                    # body frozen in epoch 1
    assert not torch.equal(seen[1]["fc.weight"], before["fc.weight"])  # head trained
    assert not torch.equal(seen[2][body], seen[1][body])               # body trains after


class NaNAfter(torch.nn.Module):
    """Wraps a model and poisons its output from the n-th training call on."""

    def __init__(self, model, n):
        super().__init__()
        self.model, self.n, self.calls = model, n, 0
        self.get_classifier = model.get_classifier

    def forward(self, x):
        if self.training:
            self.calls += 1
        out = self.model(x)
        return out * float("nan") if self.training and self.calls >= self.n else out


def test_nan_loss_stops_the_run_and_saves_nothing_broken(shapes, tmp_path):
    steps_per_epoch = len(loaders(shapes)[0])
    model = NaNAfter(small_cnn(), n=steps_per_epoch + 1)  # epoch 1 fine, epoch 2 diverges
    with pytest.raises(TrainingDiverged, match="NaN or infinite at epoch 2"):
        fit(model, *loaders(shapes), TrainConfig(epochs=3, lr=0.05, optimizer="sgd"), tmp_path)
    checkpoint = torch.load(tmp_path / LAST_CHECKPOINT, weights_only=True)
    assert checkpoint["epoch"] == 0  # only epoch 1 was saved
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("optimizer, schedule", [("adamw", "cosine"), ("sgd", "constant"), ("adamw", "onecycle")])
def test_optimisers_and_schedules(shapes, tmp_path, optimizer, schedule):
    config = TrainConfig(epochs=2, lr=0.01 if optimizer == "sgd" else 2e-3, optimizer=optimizer,
                         schedule=schedule, grad_clip=1.0, label_smoothing=0.1, warmup_epochs=0.5)
    result = fit(small_cnn(), *loaders(shapes), config, tmp_path)
    lrs = [r["lr"] for r in result.history]
    if schedule == "constant":
        assert lrs == [0.01, 0.01]
    else:
        assert lrs[-1] < 1e-4  # annealed to (almost) nothing at the end
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] + 0.05


def test_mixed_precision_choice():
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "auto") is None and autocast_dtype(cpu, "bf16") == torch.bfloat16
    assert autocast_dtype(cpu, "off") is None


@pytest.mark.parametrize("steps_per_epoch, epochs", [(1, 1), (1, 3), (2, 2), (50, 1)])
def test_onecycle_works_for_any_number_of_steps(steps_per_epoch, epochs):
    from classifier.loop import build_optimizer, build_scheduler

    model = small_cnn()
    config = TrainConfig(epochs=epochs, lr=0.1, optimizer="sgd", schedule="onecycle")
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    lrs = []
    for _ in range(steps_per_epoch * epochs):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert max(lrs) <= 0.1 + 1e-9
    if len(lrs) > 1:
        assert lrs[-1] < max(lrs)  # annealed by the end
