"""The in-memory fast path: a whole split as one uint8 tensor on the device, augmented there in batches.

For small images (CIFAR's 32 px, Fashion-MNIST's 28) a DataLoader spends more time opening,
cropping and converting each image in Python than the model spends on it. `DeviceLoader` holds
the split as one uint8 tensor where the model runs (GPU memory, or the CPU array that
`data.materialize_small` already made, without a copy) and builds each batch with a few tensor
operations: one gather that also does the random translation and the mirroring, then float
conversion, an optional resize to the model's input size, and normalisation. No per-image Python
runs on the hot path. This is airbench's loader (KellerJordan/cifar10-airbench), with what a
training library needs besides: exact reproducibility, resume, and DDP shards.

Augmentation, at the images' own resolution (cheap, and the same for any input size):
- translation by up to `translate` pixels each way, reflecting at the borders (the same pictures
  as torchvision's RandomCrop with reflect padding);
- mirroring: "alternate" (airbench) mirrors each image in every other epoch, starting from a
  random half, so any two consecutive epochs show both versions of every image; "random" flips a
  fair coin per image and epoch; "none".

Everything random is drawn per dataset index from (seed, epoch) with a CPU generator, so a sample
looks the same whichever rank, batch size, world size or device it is on, and a resumed run (fit
calls `set_epoch`) sees exactly what the uninterrupted run saw.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from classifier import distributed
from classifier.errors import DataError

FLIP_MODES = ("alternate", "random", "none")
# The share of free accelerator memory the data may take; the rest is the model's and the batches'.
DEVICE_MEMORY_SHARE = 0.5


def _as_nhwc(images) -> torch.Tensor:
    """A uint8 array or tensor (N,H,W) or (N,H,W,C) as a uint8 tensor (N,H,W,C), sharing memory."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if tensor.dtype != torch.uint8 or tensor.ndim not in (3, 4):
        raise ValueError(f"expected uint8 images (N,H,W) or (N,H,W,C), got {tuple(tensor.shape)} {tensor.dtype}")
    return tensor if tensor.ndim == 4 else tensor.unsqueeze(-1)


def fits_on_device(arrays: Sequence, device: torch.device | str) -> bool:
    """Whether these uint8 arrays can live on `device` beside a model.

    On the CPU they already are in memory (the loader views them without a copy); on a GPU they
    must fit in DEVICE_MEMORY_SHARE of its free memory.
    """
    device = torch.device(device)
    nbytes = sum(int(a.nbytes) for a in arrays)
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes <= DEVICE_MEMORY_SHARE * free
    return nbytes <= 2**30  # other accelerators report no free memory: stay modest


def _seed(seed: int, stream: int, epoch: int = 0) -> int:
    """A generator seed for (run seed, stream, epoch): independent streams, none negative."""
    return int(np.random.SeedSequence([seed % 2**32, stream, epoch]).generate_state(1)[0])


def _reflect(index: torch.Tensor, n: int) -> torch.Tensor:
    """Indices outside [0, n) mirrored back inside, as reflect padding does (edge not repeated)."""
    index = index.abs()
    return torch.where(index > n - 1, 2 * (n - 1) - index, index)


class DeviceLoader:
    """Batches (x, y, index) of a uint8 image array, made on `device`; see the module docstring.

    images: uint8 (N,H,W) or (N,H,W,C); targets: N ints. x is float32 (or `dtype`), normalised
    by mean and std (in [0, 1] units), `size` x `size` (default: the images' own size), in
    channels_last memory order unless `channels_last` is False; y and index are int64. Under DDP
    (rank and world_size default to torch.distributed's) a training loader deals a (seed, epoch)
    permutation of the data round-robin to the ranks, padded as DistributedSampler pads, so every
    rank runs the same number of steps and the N per-rank batches of a step together are one
    global batch of the permutation; an evaluation loader gives each rank every N-th sample,
    without repeats, so summed metrics are exact.
    """

    def __init__(self, images, targets, *, batch_size: int, train: bool, mean: Sequence[float],
                 std: Sequence[float], device: torch.device | str = "cpu", size: int | None = None,
                 channels: int | None = None, translate: int | None = None, flip: str = "alternate",
                 interpolation: str = "bilinear", seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, drop_last: bool | None = None,
                 dtype: torch.dtype = torch.float32, channels_last: bool = True):
        if flip not in FLIP_MODES:
            raise ValueError(f"flip must be one of {FLIP_MODES}, not {flip!r}")
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"unknown interpolation {interpolation!r}")
        self.device = torch.device(device)
        self.images = _as_nhwc(images).to(self.device)
        self.targets = torch.as_tensor(np.asarray(targets), dtype=torch.int64).to(self.device)
        if len(self.targets) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.targets)} targets")
        n, height, width, stored = self.images.shape
        self.channels = channels or stored
        if self.channels != stored and stored != 1:
            raise ValueError(f"cannot make {self.channels}-channel batches of {stored}-channel images")
        if len(mean) != self.channels or len(std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values each")
        self.batch_size, self.train, self.seed = int(batch_size), train, seed
        self.size = size if size and (size, size) != (height, width) else None
        self.interpolation = interpolation
        self.translate = (max(1, round(min(height, width) / 16)) if translate is None else translate) if train else 0
        self.flip = flip if train else "none"
        self.dtype, self.channels_last = dtype, channels_last
        self.rank = distributed.rank() if rank is None else rank
        self.world_size = distributed.world_size() if world_size is None else world_size
        # Evaluation shards exactly as the DataLoader path does (each sample on one rank, none repeated).
        self._shard = None if train else distributed.ShardSampler(self.images, self.world_size, self.rank)
        per_rank = math.ceil(n / self.world_size) if train else len(self._shard)
        self.drop_last = (train and per_rank >= self.batch_size) if drop_last is None else drop_last
        self._per_rank = per_rank
        # x / 255 normalised in one multiply-add: (x / 255 - mean) / std = x * scale - shift
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std_t), mean_t / std_t
        self.epoch = 0

    @classmethod
    def from_split(cls, split, **kwargs) -> "DeviceLoader":
        """A loader over a data.Split held in memory (see data.materialize_small)."""
        if not split.in_memory:
            raise ValueError("DeviceLoader needs a split decoded into memory (data.materialize_small)")
        return cls(split.items, split.targets, **kwargs)

    # -- the sampler's side ------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Reseed the order and the augmentation for `epoch` (fit() calls this every epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self._per_rank // self.batch_size
        return math.ceil(self._per_rank / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order, shifts, flips = self.plan(self.epoch)
        # With no set_epoch between passes (a plain loop), the next pass is the next epoch.
        self.epoch += 1
        order, shifts, flips = (t.to(self.device) if t is not None else None for t in (order, shifts, flips))
        for b in range(len(self)):
            index = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.batch(index, shifts, flips), self.targets[index], index

    def plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This rank's sample order for `epoch`, and every sample's (dy, dx) shift and mirror flag.

        Drawn on the CPU from (seed, epoch), so they do not depend on the device or the rank.
        """
        n = len(self.images)
        if not self.train:
            return torch.tensor(list(self._shard), dtype=torch.int64), None, None
        generator = torch.Generator().manual_seed(_seed(self.seed, 0, epoch))
        order = torch.randperm(n, generator=generator)
        total = self._per_rank * self.world_size
        order = torch.cat([order, order[: total - n]])[self.rank::self.world_size]
        r = self.translate
        shifts = torch.randint(-r, r + 1, (n, 2), generator=generator) if r else None
        if self.flip == "random":
            flips = torch.rand(n, generator=generator) < 0.5
        elif self.flip == "alternate":
            # Which half starts mirrored is fixed for the run (seed alone); the epoch alternates it.
            start = torch.rand(n, generator=torch.Generator().manual_seed(_seed(self.seed, 1))) < 0.5
            flips = start ^ bool(epoch % 2)
        else:
            flips = None
        return order, shifts, flips

    # -- the transform's side ----------------------------------------------------------------

    def batch(self, index: torch.Tensor, shifts: torch.Tensor | None = None,
              flips: torch.Tensor | None = None) -> torch.Tensor:
        """The float batch of the images at `index` (on the device), shifted and mirrored as given."""
        if shifts is None and flips is None:
            x = self.images[index]
        else:
            # One gather does translation (with reflection at the borders) and mirroring: output
            # pixel (i, j) of image k is input pixel (reflect(i + dy), reflect(j' + dx)), where
            # j' = W - 1 - j for a mirrored image.
            _, height, width, _ = self.images.shape
            rows = torch.arange(height, device=self.device).expand(len(index), height)
            cols = torch.arange(width, device=self.device).expand(len(index), width)
            if flips is not None:
                cols = torch.where(flips[index, None], width - 1 - cols, cols)
            if shifts is not None:
                shift = shifts[index]
                rows = _reflect(rows + shift[:, :1], height)
                cols = _reflect(cols + shift[:, 1:], width)
            x = self.images[index[:, None, None], rows[:, :, None], cols[:, None, :]]
        x = x.permute(0, 3, 1, 2)  # (B,C,H,W) view of NHWC memory: channels_last for free
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1)  # grey images for a 3-channel model
        x = x.float()
        if self.size:
            x = pillow_resize(x, self.size, self.interpolation)
        x = x.mul_(self._scale).sub_(self._shift)
        if self.dtype != torch.float32:
            x = x.to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)


def pillow_resize(x: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """A float batch (0..255) resized to size x size as Pillow resizes uint8 images, which is what
    the eval transform (classifier.transforms) does to each image: the antialiased filter of
    Pillow's kind, and -- what F.interpolate alone does not do -- the two separable passes,
    horizontal then vertical, each rounded and clamped to uint8. Bicubic overshoots, and without
    the clamp between passes 1% of the pixels of a 32 -> 160 px upscale came out up to 19 levels
    from Pillow's; with it they agree to one level on 0.05% of them (bilinear: exactly)."""
    if interpolation == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest")
    for shape in ((x.shape[-2], size), (size, size)):
        if tuple(x.shape[-2:]) != shape:
            x = F.interpolate(x, size=shape, mode=interpolation, antialias=True, align_corners=False)
            x = x.clamp_(0, 255).round_()
    return x


# ----------------------------------------------------------------------------------------------
# Choosing the path, and the three loaders of a run

LOADER_MODES = ("auto", "memory", "workers")


def use_memory_loader(mode: str, data, device: torch.device | str) -> bool:
    """Whether a run takes the in-memory path: `mode` is "auto", "memory" or "workers".

    "auto" takes it when every split was decoded into memory (data.materialize_small does that for
    small images) and fits on the device; "memory" insists, and says why it cannot.
    """
    if mode not in LOADER_MODES:
        raise ValueError(f"--loader must be one of {LOADER_MODES}, not {mode!r}")
    if mode == "workers":
        return False
    splits = (data.train, data.val, data.test)
    if not all(split.in_memory for split in splits):
        if mode == "memory":
            raise DataError("--loader memory needs small images decoded into memory (64 px or less); "
                            "these are read from files: use --loader workers")
        return False
    if not fits_on_device([split.items for split in splits], device):
        if mode == "memory":
            raise DataError(f"--loader memory: the data does not fit in {device}'s free memory; "
                            "use --loader workers")
        return False
    return True


def memory_loaders(data, *, batch_size: int, eval_batch_size: int, **kwargs
                   ) -> tuple[DeviceLoader, DeviceLoader, DeviceLoader]:
    """Train, validation and test DeviceLoaders of `data`; kwargs go to every DeviceLoader."""
    return (DeviceLoader.from_split(data.train, batch_size=batch_size, train=True, **kwargs),
            DeviceLoader.from_split(data.val, batch_size=eval_batch_size, train=False, **kwargs),
            DeviceLoader.from_split(data.test, batch_size=eval_batch_size, train=False, **kwargs))
