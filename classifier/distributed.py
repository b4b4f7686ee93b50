"""The little that the library needs of torch.distributed, each a no-op in a single process.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous variables; `init_from_env` turns them
into a process group (nccl on CUDA, gloo on CPU). Nothing here is home-made distribution: it is
PyTorch's own DDP, with helpers so the rest of the code reads the same with or without it.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env() -> bool:
    """Join the process group torchrun describes; False (and nothing done) outside torchrun."""
    if not launched_by_torchrun() or is_distributed():
        return is_distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    return True


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` in DistributedDataParallel when distributed, else unchanged."""
    if not is_distributed():
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def gather_predictions(logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor):
    """Every rank's (logits, targets, indices) gathered on all ranks, each sample once, by index.

    Shards differ in length, so each is padded to the longest before all_gather; samples that a
    DistributedSampler repeated to even out the shards are dropped by their dataset index.
    """
    backend_device = torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")
    count = torch.tensor([len(targets)], device=backend_device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    gathered = []
    for tensor in (logits, targets, indices):
        padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=backend_device)
        padded[: len(tensor)] = tensor.to(backend_device)
        parts = [torch.zeros_like(padded) for _ in range(world_size())]
        dist.all_gather(parts, padded)
        gathered.append(torch.cat([p[: int(c.item())] for p, c in zip(parts, counts)]).cpu())
    logits, targets, indices = gathered
    order = torch.argsort(indices, stable=True)
    logits, targets, indices = logits[order], targets[order], indices[order]
    first = torch.ones(len(indices), dtype=torch.bool)
    first[1:] = indices[1:] != indices[:-1]
    return logits[first], targets[first], indices[first]
