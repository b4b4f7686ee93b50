"""classifier.fastdata: the in-memory loader's batches, augmentation, shards, resize, and training through it."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from torchvision import transforms as T

from classifier.data import load_data, materialize_small
from classifier.errors import DataError
from classifier.fastdata import DeviceLoader, fits_on_device, memory_loaders, use_memory_loader
from classifier.models import create_model
from classifier.config import TrainConfig
from classifier.loop import LAST_CHECKPOINT, fit
from tests.conftest import make_image_folder

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def images(n=24, size=32, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, size, size, channels) if channels > 1 else (n, size, size)
    return rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, 3, n)


def loader(x, y, **kwargs):
    kwargs = {"batch_size": 8, "train": True, "mean": MEAN, "std": STD, **kwargs}
    return DeviceLoader(x, y, **kwargs)


def all_batches(dl, epoch=0):
    dl.set_epoch(epoch)
    return list(dl)


def test_eval_batches_match_torchvision_to_tensor_and_normalize():
    x, y = images(10)
    reference = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    batches = list(loader(x, y, train=False, batch_size=4))
    assert [len(b[0]) for b in batches] == [4, 4, 2]  # evaluation keeps the last partial batch
    got = torch.cat([b[0] for b in batches])
    expected = torch.stack([reference(Image.fromarray(image)) for image in x])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.cat([b[1] for b in batches]).tolist() == y.tolist()
    assert torch.cat([b[2] for b in batches]).tolist() == list(range(10))


def test_grey_images_for_a_three_channel_model_are_repeated_like_pillows_rgb():
    x, y = images(4, channels=1)
    got = next(iter(loader(x, y, train=False, channels=3)))[0]
    reference = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    expected = torch.stack([reference(Image.fromarray(image).convert("RGB")) for image in x])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_training_batches_are_reflect_padded_crops_and_mirror_images():
    x, y = images(16)
    dl = loader(x, y, translate=3, flip="random", batch_size=16, drop_last=False)
    order, shifts, flips = dl.plan(epoch=5)
    batch = dl.batch(order, shifts, flips)
    normalize = T.Normalize(MEAN, STD)
    for k, index in enumerate(order.tolist()):
        image = torch.from_numpy(x[index]).permute(2, 0, 1).float()[None]
        padded = F.pad(image, (3, 3, 3, 3), mode="reflect")[0]  # torchvision's RandomCrop(padding, "reflect")
        dy, dx = shifts[index].tolist()
        crop = padded[:, 3 + dy:35 + dy, 3 + dx:35 + dx]
        if flips[index]:
            crop = crop.flip(-1)
        torch.testing.assert_close(batch[k], normalize(crop / 255), atol=1e-5, rtol=1e-5)
    assert shifts.abs().max() == 3 and 0 < flips.sum() < 16


def test_augmentation_is_reproducible_per_seed_and_epoch_and_differs_across_epochs():
    x, y = images(32)
    a, b = loader(x, y, seed=1), loader(x, y, seed=1)
    for first, second in zip(all_batches(a, 3), all_batches(b, 3)):
        assert all(torch.equal(p, q) for p, q in zip(first, second))
    assert not torch.equal(all_batches(a, 3)[0][2], all_batches(a, 4)[0][2])  # a new order
    images_3 = torch.cat([batch[0][batch[2].argsort()] for batch in all_batches(a, 3)])
    images_4 = torch.cat([batch[0][batch[2].argsort()] for batch in all_batches(a, 4)])
    assert not torch.equal(images_3, images_4)  # and new crops
    other_seed = loader(x, y, seed=2)
    assert not torch.equal(all_batches(other_seed, 3)[0][2], all_batches(a, 3)[0][2])
    # A loop that never calls set_epoch still gets a new epoch each pass.
    plain = loader(x, y, seed=1)
    assert not torch.equal(next(iter(plain))[2], next(iter(plain))[2])


def test_alternating_flip_mirrors_every_image_in_exactly_one_of_two_epochs():
    x, y = images(40)
    dl = loader(x, y, translate=0, flip="alternate")
    even, odd = dl.plan(6)[2], dl.plan(7)[2]
    assert torch.equal(even ^ odd, torch.ones(40, dtype=torch.bool))
    assert torch.equal(dl.plan(8)[2], even) and 10 < int(even.sum()) < 30


@pytest.mark.parametrize("n, world", [(12, 3), (10, 3), (7, 2)])
def test_ddp_shards_are_disjoint_cover_the_data_and_run_the_same_number_of_steps(n, world):
    x, y = images(n)
    # Evaluation: every sample exactly once, no padding.
    shards = [torch.cat([b[2] for b in loader(x, y, train=False, batch_size=2, rank=r, world_size=world)])
              for r in range(world)]
    assert sorted(torch.cat(shards).tolist()) == list(range(n))
    # Training: equal step counts; disjoint when n divides evenly, else padded by at most world - 1.
    train = [loader(x, y, batch_size=2, rank=r, world_size=world, drop_last=False) for r in range(world)]
    assert len({len(dl) for dl in train}) == 1
    indices = torch.cat([torch.cat([b[2] for b in all_batches(dl, 1)]) for dl in train])
    assert set(indices.tolist()) == set(range(n)) and len(indices) - n == (-n) % world


def test_ranks_together_make_the_single_process_batches():
    """The same global batches, with the same augmentation, for any number of processes."""
    x, y = images(24)
    single = all_batches(loader(x, y, batch_size=8, seed=3), 2)
    ranks = [all_batches(loader(x, y, batch_size=4, seed=3, rank=r, world_size=2), 2) for r in range(2)]
    assert len(ranks[0]) == len(single) == 3
    for step, whole in enumerate(single):
        parts = [ranks[r][step] for r in range(2)]
        index = torch.cat([p[2] for p in parts])
        assert sorted(index.tolist()) == sorted(whole[2].tolist())
        order = whole[2].argsort()
        combined = torch.cat([p[0] for p in parts])[index.argsort()]
        assert torch.equal(combined, whole[0][order])


def test_resize_on_the_device_gives_the_models_size_close_to_torchvision():
    x, y = images(6)
    dl = loader(x, y, train=False, size=96, interpolation="bicubic", batch_size=6)
    got = next(iter(dl))[0]
    assert got.shape == (6, 3, 96, 96)
    reference = T.Compose([T.Resize(96, interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                           T.Normalize(MEAN, STD)])
    expected = torch.stack([reference(Image.fromarray(image)) for image in x])
    # Pillow and torch compute the same filter in different arithmetic: off by a grey level or so.
    assert (got - expected).abs().mean() < 2 / 255 / min(STD)
    train = loader(x, y, size=64, batch_size=3)
    assert next(iter(train))[0].shape == (3, 3, 64, 64)
    assert next(iter(loader(x, y, train=False, dtype=torch.bfloat16)))[0].dtype == torch.bfloat16


def test_bad_arguments_are_refused():
    x, y = images(4)
    with pytest.raises(ValueError, match="flip"):
        loader(x, y, flip="sometimes")
    with pytest.raises(ValueError, match="targets"):
        loader(x, y[:3])
    with pytest.raises(ValueError, match="mean and std"):
        loader(x, y, mean=(0.5,), std=(0.5,))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("fast-shapes"), per_class=30)
    return materialize_small(load_data(str(root), val_fraction=0.2, test_fraction=0.1))


def shapes_loaders(data, seed=0):
    return memory_loaders(data, batch_size=16, eval_batch_size=32, mean=MEAN, std=STD, seed=seed)


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return create_model("fast_cnn", num_classes=3, widths=(8, 16, 32))


def test_fit_through_the_device_loader_learns(shapes, tmp_path):
    train, val, _ = shapes_loaders(shapes)
    result = fit(small_cnn(), train, val, TrainConfig(epochs=4, lr=0.1, optimizer="sgd", label_smoothing=0.2),
                 tmp_path)
    assert result.history[-1]["val_acc"] >= 0.7  # three classes: chance is a third


class StopAfter(Exception):
    pass


def test_a_resumed_run_through_the_device_loader_ends_where_the_whole_run_ends(shapes, tmp_path):
    config = TrainConfig(epochs=3, lr=0.1, optimizer="sgd")
    whole = small_cnn()
    fit(whole, *shapes_loaders(shapes)[:2], config, tmp_path / "whole")

    def stop(record):
        if record["epoch"] == 1:
            raise StopAfter

    with pytest.raises(StopAfter):
        fit(small_cnn(), *shapes_loaders(shapes)[:2], config, tmp_path / "cut", on_epoch_end=stop)
    assert (tmp_path / "cut" / LAST_CHECKPOINT).exists()
    resumed = small_cnn(seed=7)
    fit(resumed, *shapes_loaders(shapes)[:2], config, tmp_path / "cut", resume=True)
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_the_memory_path_is_chosen_for_data_held_in_memory(shapes, tmp_path):
    assert use_memory_loader("auto", shapes, "cpu") and use_memory_loader("memory", shapes, "cpu")
    assert not use_memory_loader("workers", shapes, "cpu")
    assert fits_on_device([shapes.train.items], "cpu")
    on_disk = load_data(str(make_image_folder(tmp_path / "disk", per_class=4)))
    assert not use_memory_loader("auto", on_disk, "cpu")
    with pytest.raises(DataError, match="--loader workers"):
        use_memory_loader("memory", on_disk, "cpu")
    with pytest.raises(ValueError, match="--loader"):
        use_memory_loader("gpu", shapes, "cpu")


def test_a_run_takes_the_memory_path_by_itself(shapes, tmp_path):
    from classifier.config import RunConfig
    from classifier.run import prepare

    cfg = RunConfig(data="unused", model="fast_cnn", model_args={"widths": [8, 16]}, batch_size=16,
                    out=str(tmp_path))
    setup = prepare(cfg, torch.device("cpu"), data=shapes)
    assert isinstance(setup.train_loader, DeviceLoader) and isinstance(setup.test_loader, DeviceLoader)
    assert setup.train_loader.train and not setup.test_loader.train
    forced = prepare(RunConfig(**{**cfg.__dict__, "loader": "workers"}), torch.device("cpu"), data=shapes)
    assert not isinstance(forced.train_loader, DeviceLoader)
