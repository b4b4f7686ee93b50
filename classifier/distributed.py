"""The little that the library needs of torch.distributed, each a no-op in a single process.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, the rendezvous variables and, after a failure,
TORCHELASTIC_RESTART_COUNT; `init_from_env` turns them into a process group (nccl on CUDA, gloo on
CPU). Nothing here is home-made distribution: it is PyTorch's own DDP, samplers and collectives,
with helpers so the rest of the code reads the same with or without them.

What the rest of the library relies on:

- the batch size and learning rate a user gives are global: each of N processes gets batch/N
  samples per step, DDP averages the gradients, so one step is one step of the global batch;
- training shards are PyTorch's DistributedSampler (every rank the same number of steps, which
  DDP needs); evaluation shards are `ShardSampler` (no padded repeats, so sums are exact);
- rank 0 alone writes files and reads checkpoints, and sends what it read to the other ranks
  (`broadcast_state`), so other machines need not see rank 0's disk;
- a rank that stops answering stalls the others at their next collective operation until the
  timeout (CLASSIFIER_COLLECTIVE_TIMEOUT seconds, 600 by default, where gloo's own is 30 minutes);
  each process's heartbeat thread tells which rank went silent, where, and since when (`Heartbeat`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import threading
import time
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from classifier.errors import ConfigError, StalledRank, UserError

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT_ENV = "CLASSIFIER_COLLECTIVE_TIMEOUT"
# How long a collective operation waits for a silent rank. Long enough for what rank 0 does alone
# while the others wait at the next collective (a checkpoint, the bundle and its evaluation files);
# data preparation, which can take far longer (unpacking, decoding), waits on a group of its own.
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0
PREPARATION_TIMEOUT = timedelta(hours=6)
_preparation_group = None
_heartbeat: "Heartbeat | None" = None


def collective_timeout() -> timedelta:
    """CLASSIFIER_COLLECTIVE_TIMEOUT (seconds), else DEFAULT_COLLECTIVE_TIMEOUT_S."""
    text = os.environ.get(COLLECTIVE_TIMEOUT_ENV, "").strip()
    if not text:
        return timedelta(seconds=DEFAULT_COLLECTIVE_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"{COLLECTIVE_TIMEOUT_ENV}={text!r}: give a number of seconds above 0, e.g. 600")
    return timedelta(seconds=seconds)


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


def restart_count() -> int:
    """How many times torchrun (--max-restarts) has restarted this machine's processes; 0 at first."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def _restart_store():
    """The rendezvous store for a restarted attempt, with keys of its own; None when not needed.

    torchrun's agent keeps one key-value store for the whole job (TORCHELASTIC_USE_AGENT_STORE)
    and, in this PyTorch, gives a restarted attempt no fresh namespace in it. init_process_group
    would then find the first attempt's keys (the dead processes' addresses) and fail to connect
    (pytorch/pytorch#135712). This is what torch.distributed's own env:// rendezvous used to do: the
    same store, behind a PrefixStore named after the attempt, which every process on this machine
    agrees on. Machines restarted by an elastic agent without failing themselves keep count 0, so
    for restarts across machines PyTorch's own switch TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a new
    store per attempt) is the one that holds; see the README.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or restart_count() == 0:
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"/worker/attempt_{restart_count()}", store)


def init_from_env(device: str = "auto") -> bool:
    """Join the process group torchrun describes; False (and nothing done) outside torchrun.

    `device` is the --device the run will use: nccl only moves CUDA tensors, so a run asked to use
    the CPU on a machine with GPUs needs gloo.
    """
    if not launched_by_torchrun() or is_distributed():
        return is_distributed()
    store = _restart_store()
    where = {} if store is None else {"store": store, "rank": int(os.environ["RANK"]),
                                      "world_size": int(os.environ["WORLD_SIZE"])}
    on_cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    timeout = collective_timeout()
    if on_cuda:
        torch.cuda.set_device(local_rank())
        # device_id binds the group to this process's GPU, so barriers need not guess which GPU.
        dist.init_process_group(backend="nccl", device_id=torch.device("cuda", local_rank()), timeout=timeout,
                                **where)
    else:
        dist.init_process_group(backend="gloo", timeout=timeout, **where)
    global _preparation_group, _heartbeat
    _preparation_group = dist.new_group(backend="gloo", timeout=PREPARATION_TIMEOUT)
    _heartbeat = Heartbeat.start(timeout)
    return True


class Heartbeat:
    """A thread in each process that, every `interval` seconds, writes a beat (a count, this rank's
    progress, host and pid) to the rendezvous store and reads the other ranks' beats.

    A rank whose count stops moving for `silent_after` seconds is stopped (SIGSTOP, a hung driver,
    a dead machine): a thread of a healthy process keeps beating even while its main thread waits
    in a collective. The silence is logged at once on every rank (under nccl the watchdog ends the
    process at the timeout without a word) and named by `stall_report` when the collective fails.
    Counts, not clocks, are compared: the machines' clocks need not agree.
    """

    def __init__(self, store, interval: float):
        self.store, self.interval, self.silent_after = store, interval, 3 * interval
        self.progress = "setting up"
        self.silent: dict[int, str] = {}  # rank -> what it last said and how long ago

    @classmethod
    def start(cls, timeout: timedelta) -> "Heartbeat | None":
        address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not address or not port:
            return None
        try:
            # A client of the rendezvous store of its own (under torchrun, the agent's): the thread
            # must not share the process group's connection.
            store = dist.PrefixStore(f"classifier/heartbeat/{restart_count()}",
                                     dist.TCPStore(address, int(port), is_master=False, timeout=timedelta(seconds=30)))
        except Exception as exc:  # noqa: BLE001 - without a heartbeat the run goes on, only less explained
            log.warning("no heartbeat between the processes (%s): a stalled rank will not be named", exc)
            return None
        heartbeat = cls(store, interval=min(5.0, max(0.5, timeout.total_seconds() / 20)))
        threading.Thread(target=heartbeat._run, name="classifier-heartbeat", daemon=True).start()
        return heartbeat

    def _run(self) -> None:
        me, world = rank(), world_size()
        others = [r for r in range(world) if r != me]
        seen: dict[int, tuple[int, float]] = {}  # rank -> (its last count, when it last moved)
        beat = 0
        identity = {"host": socket.gethostname(), "pid": os.getpid()}
        while True:
            beat += 1
            try:
                self.store.set(str(me), json.dumps({"beat": beat, "progress": self.progress, **identity}))
                now = time.monotonic()
                for other in others:
                    if self.store.check([str(other)]):
                        self._watch(other, json.loads(self.store.get(str(other))), seen, now)
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending, and so is the thread
                return
            time.sleep(self.interval)

    def _watch(self, other: int, record: dict, seen: dict, now: float) -> None:
        last = seen.get(other)
        if last is None or last[0] != record["beat"]:
            seen[other] = (record["beat"], now)
            if self.silent.pop(other, None):
                log.warning("rank %d answers again", other)
            return
        quiet = now - last[1]
        if quiet >= self.silent_after:
            if other not in self.silent:
                log.warning("warning: rank %d (%s, pid %s) has not answered for %.0f s, since %s", other,
                            record["host"], record["pid"], quiet, record["progress"])
            self.silent[other] = (f"rank {other} ({record['host']}, pid {record['pid']}) stopped answering "
                                  f"{quiet:.0f} s ago, at {record['progress']}")


def note_progress(epoch: int, step: int) -> None:
    """Where this rank is, for the heartbeat (a stalled rank is named with it)."""
    if _heartbeat is not None:
        _heartbeat.progress = f"epoch {epoch + 1}, step {step}"


@contextlib.contextmanager
def stall_report() -> Iterator[None]:
    """A collective that failed because a rank went silent, as a StalledRank naming that rank."""
    try:
        yield
    except RuntimeError as exc:  # gloo's timeouts and closed connections; DistBackendError among them
        if _heartbeat is None or not _heartbeat.silent or isinstance(exc, UserError):
            raise
        silent = "; ".join(_heartbeat.silent[r] for r in sorted(_heartbeat.silent))
        raise StalledRank(f"{silent}. The other processes waited for it at a collective operation until the "
                          f"timeout ({collective_timeout().total_seconds():g} s, {COLLECTIVE_TIMEOUT_ENV}); look at "
                          f"that process (stopped? stuck on a disk or the network? out of memory?), then start the "
                          f"job again with --resume") from exc


def restarted() -> bool:
    """Whether torchrun restarted this job after a failure, as far as any of its processes knows.

    Only the processes on the machine where the failure happened see a restart count above 0; the
    answer is agreed by all, so that every rank resumes or none does.
    """
    flag = torch.tensor([1.0 if restart_count() > 0 else 0.0], device=_collective_device())
    if is_distributed():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _collective_device() -> torch.device:
    """Where tensors for a collective must be: nccl moves CUDA tensors only, gloo CPU ones."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def shutdown() -> None:
    global _heartbeat, _preparation_group
    _heartbeat = _preparation_group = None
    if is_distributed():
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` in DistributedDataParallel when distributed, else unchanged."""
    if not is_distributed():
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """The model with SyncBatchNorm layers (for DDP), or unchanged where that cannot run.

    Call before `wrap`. The conversion replaces the layers in place and keeps their parameters and
    buffers under the same names, so a state_dict saved from the converted model loads into the
    plain one (and the bundle needs no conversion back). PyTorch's SyncBatchNorm has kernels for
    GPUs only: on the CPU each process keeps its own batch statistics, as without the option.
    """
    if not is_distributed():
        return model
    if device.type != "cuda":
        log.warning("--sync-batchnorm needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); "
                    "each process normalises with its own batch statistics")
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_state(state):
    """Rank 0's `state` (tensors and plain data, as in a checkpoint, or None) on every rank.

    For what rank 0 alone reads from disk: every rank then starts from the same state even when
    the other ranks run on machines that cannot see rank 0's files. The state travels as the bytes
    of torch.save and is read back with weights_only, as the file itself would be; tensors arrive
    on the CPU.
    """
    if not is_distributed():
        return state
    device = _collective_device()
    payload = None
    if is_main_process() and state is not None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = torch.frombuffer(bytearray(buffer.getbuffer()), dtype=torch.uint8)
    size = torch.tensor([-1 if payload is None else len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    if size.item() < 0:  # rank 0 had nothing (no checkpoint yet): neither has anyone
        return None
    data = payload.to(device) if payload is not None else torch.empty(int(size.item()), dtype=torch.uint8,
                                                                      device=device)
    dist.broadcast(data, src=0)
    if is_main_process():
        return state
    return torch.load(io.BytesIO(data.cpu().numpy().tobytes()), map_location="cpu", weights_only=True)


@contextlib.contextmanager
def local_main_first():
    """Run the body on each machine's local rank 0 first, then on the other ranks of that machine.

    For work that fills a cache on the local disk (unpacking an archive, decoding images, a
    download): the first process writes it, the others then find it, instead of all writing the
    same files at once.
    """
    first = local_rank() == 0
    # The others may wait far longer than for a training step: on a group with a timeout of its own.
    wait = (lambda: dist.barrier(group=_preparation_group)) if _preparation_group is not None else barrier
    if not first:
        wait()
    try:
        yield
    finally:
        if first:
            wait()


class ShardSampler(Sampler[int]):
    """Dataset indices rank, rank + N, rank + 2N, ...: each sample on exactly one of N ranks.

    For evaluation. DistributedSampler pads the shards to equal length with repeated samples, which
    training needs (every rank must take the same number of DDP steps) but which would count those
    samples twice in a summed loss or accuracy. Evaluation has no collective per batch, so the
    shards may differ in length by one. In one process this is the dataset in order.
    """

    def __init__(self, dataset, num_replicas: int | None = None, rank: int | None = None):
        self.length = len(dataset)
        self.num_replicas = world_size() if num_replicas is None else num_replicas
        self.rank = (dist.get_rank() if is_distributed() else 0) if rank is None else rank
        if 0 < self.length < self.num_replicas:
            # predict_logits needs at least one sample per rank to know the shape of the logits.
            raise ValueError(f"an evaluation split of {self.length} images cannot be shared by "
                             f"{self.num_replicas} processes; use fewer processes or a larger split")

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))


def gather_predictions(logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor):
    """Every rank's (logits, targets, indices) gathered on all ranks, each sample once, by index.

    Shards differ in length, so each is padded to the longest before all_gather; samples that a
    DistributedSampler repeated to even out the shards are dropped by their dataset index.
    """
    backend_device = _collective_device()
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
    # Sorting by dataset index puts a repeat next to its original (stable: the first copy stays
    # first); both are the same image through the same model in eval mode, so either may be kept.
    order = torch.argsort(indices, stable=True)
    logits, targets, indices = logits[order], targets[order], indices[order]
    first = torch.ones(len(indices), dtype=torch.bool)
    first[1:] = indices[1:] != indices[:-1]
    return logits[first], targets[first], indices[first]
