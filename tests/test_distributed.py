"""DistributedDataParallel under torchrun, on this CPU: two processes with gloo, small made-up data.

The end-to-end tests launch `python -m torch.distributed.run` on training/finetune.py exactly as a
user would, and compare with a single-process run of the same command. The others check, without
launching anything, the properties the distributed code relies on.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader, DistributedSampler

from classifier import distributed
from classifier.bundle import WEIGHTS_FILE, load_bundle, make_config, save_bundle
from classifier.models import create_model

REPO = Path(__file__).resolve().parents[1]
FINETUNE = REPO / "training" / "finetune.py"
CLASS_COLOURS = {"red": (200, 50, 50), "green": (50, 190, 60), "blue": (50, 70, 210)}
# Per class: 16 train (48, even: no sampler padding, so the global batches match exactly),
# 3 val and 5 test (9 and 15, odd: the two ranks' evaluation shards differ in length).
SPLIT_SIZES = {"train": 16, "val": 3, "test": 5}
EPOCHS = 3
GLOBAL_BATCH = 16

# Tolerance for the single-process and two-process runs, which do the same arithmetic in another
# order: a gradient summed over 16 samples in one process, or over 8 on each rank, all-reduced and
# halved, differs in its last bits (float32 resolves 6e-8 relative). After the nine SGD steps here
# the runs differed by at most 1.5e-8 in a weight and 1.1e-7 in a loss. 1e-4 leaves a margin of a
# thousand for other thread counts and kernels, and stays far below what a real mistake does to the
# same run: a per-rank batch of 8 instead of 16 moved weights by 7e-2 and losses by 0.6, a doubled
# learning rate weights by 3e-2 and losses by 0.25.
TOLERANCE = 1e-4


def make_flat_colour_folder(root: Path, size: int = 16, seed: int = 0) -> Path:
    """root/{train,val,test}/<class>/*.png: each image one flat colour, near its class's colour.

    On the DataLoader path, training augmentation (reflect-padded random crops, horizontal flips)
    draws from each process's own random stream, so one process and two would augment differently
    (the in-memory loader draws per sample from (seed, epoch), and would agree). A flat image is
    unchanged by any crop or flip, so the comparison holds for either loader and is left to what
    DDP must get right: the batches, the gradient average, the learning rate, the reductions.
    """
    rng = np.random.default_rng(seed)
    for split, per_class in SPLIT_SIZES.items():
        for name, colour in CLASS_COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixel = np.clip(np.array(colour) + rng.integers(-60, 60, 3), 0, 255).astype(np.uint8)
                Image.fromarray(np.tile(pixel, (size, size, 1))).save(folder / f"{i:02d}.png")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def finetune_args(data: Path, out: Path) -> list[str]:
    return ["--data", str(data), "--model", "tutorial_cifar_cnn", "--model-args", '{"drop_rate": 0}',
            "--epochs", str(EPOCHS), "--batch-size", str(GLOBAL_BATCH), "--lr", "0.05", "--optimizer", "sgd",
            "--workers", "0", "--device", "cpu", "--seed", "0", "--mistakes", "3", "--out", str(out)]


def torchrun(nproc: int, script: Path, args: list[str], *, elastic: bool = False) -> list[str]:
    """A one-machine torchrun job: the plain kind (a master port), or the elastic kind a multi-machine
    job uses (a c10d rendezvous endpoint), which here may restart the job once."""
    if elastic:
        launcher = ["--nnodes=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{free_port()}",
                    "--max-restarts=1", "--monitor-interval=0.2"]
    else:
        launcher = [f"--master-port={free_port()}"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *launcher,
            str(script), *args]


def start(command: list[str], cache: Path) -> tuple[list[str], subprocess.Popen]:
    env = dict(os.environ, OMP_NUM_THREADS="1", CLASSIFIER_CACHE=str(cache), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO))
    for name in [n for n in env if n.startswith("TORCHELASTIC_")] + ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"]:
        env.pop(name, None)  # whatever launched pytest must not leak into the jobs
    return command, subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)


def finish(job: tuple[list[str], subprocess.Popen]) -> str:
    """The job's stdout and stderr once it has exited, which it must do with status 0."""
    command, process = job
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    assert process.returncode == 0, f"{' '.join(command)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    return stdout + stderr


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def epoch_log_lines(output: str, epoch: int) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(f"epoch {epoch}/{EPOCHS} ")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same command in one process and under torchrun with two (gloo, CPU)."""
    base = tmp_path_factory.mktemp("ddp")
    data = make_flat_colour_folder(base / "colours")
    # Side by side, which keeps both cores busy while the processes import torch. Each job has its
    # own decoded-image cache: two jobs filling one at once would race.
    single = start([sys.executable, str(FINETUNE), *finetune_args(data, base / "single")], base / "cache1")
    ddp = start(torchrun(2, FINETUNE, finetune_args(data, base / "ddp")), base / "cache2")
    return {"base": base, "data": data, "single": (base / "single", finish(single)),
            "ddp": (base / "ddp", finish(ddp))}


def test_two_processes_train_and_evaluate_like_one(runs):
    (single, _), (ddp, ddp_stdout) = runs["single"], runs["ddp"]

    # Per epoch: the training loss and accuracy (summed over the ranks' shards), the validation
    # loss and accuracy (over 9 images shared 5 + 4, each counted once) and the learning rate.
    one, two = history(single), history(ddp)
    assert [r["epoch"] for r in two] == list(range(1, EPOCHS + 1))
    for a, b in zip(one, two):
        for key in ("train_loss", "val_loss", "lr"):
            assert b[key] == pytest.approx(a[key], rel=TOLERANCE, abs=TOLERANCE), (key, a, b)
        assert (b["train_acc"], b["val_acc"]) == (a["train_acc"], a["val_acc"])
    assert one[0]["train_loss"] != pytest.approx(one[-1]["train_loss"], abs=1e-3)  # it did train

    # The test evaluation gathered from both ranks: all 15 images once, the same predictions.
    m1 = json.loads((single / "test_metrics.json").read_text())
    m2 = json.loads((ddp / "test_metrics.json").read_text())
    assert m2["num_samples"] == m1["num_samples"] == 15
    assert m2["confusion_matrix"] == m1["confusion_matrix"]
    assert m2["accuracy"] == m1["accuracy"]
    assert m2["loss"] == pytest.approx(m1["loss"], rel=TOLERANCE, abs=TOLERANCE)

    # The weights in the two bundles.
    w1, w2 = load_file(single / "bundle" / WEIGHTS_FILE), load_file(ddp / "bundle" / WEIGHTS_FILE)
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=TOLERANCE, atol=TOLERANCE, msg=name)

    # Rank 0 alone logs and reports: each epoch line once, one summary, no second copy of anything.
    assert all(len(epoch_log_lines(ddp_stdout, e)) == 1 for e in range(1, EPOCHS + 1)), ddp_stdout
    assert ddp_stdout.count("test accuracy") == 1
    assert len(history(ddp)) == EPOCHS


CRASH_ONCE = """
import os, runpy, signal, sys
sys.path.insert(0, {repo!r})
import torch.distributed as dist
import classifier.run as run_module

real_fit = run_module.fit

def fit(*args, on_epoch_end=None, **kwargs):
    def maybe_crash(record):
        if on_epoch_end:
            on_epoch_end(record)
        if record["epoch"] == 1 and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
            # fit() calls this after rank 0 has written epoch 1's checkpoint: once every rank is
            # here, rank 1 of the first attempt dies hard, as if the OOM killer had taken it.
            dist.barrier()
            if os.environ["RANK"] == "1":
                os.kill(os.getpid(), signal.SIGKILL)
    return real_fit(*args, on_epoch_end=maybe_crash, **kwargs)

run_module.fit = fit
sys.argv = [{finetune!r}, *sys.argv[1:]]
runpy.run_path({finetune!r}, run_name="__main__")
"""


def test_a_killed_rank_restarts_the_job_which_resumes(runs):
    """torchrun --max-restarts=1 restarts both ranks after one dies; they resume, not start over."""
    base, (ddp, _) = runs["base"], runs["ddp"]
    script = base / "crash_once.py"
    script.write_text(CRASH_ONCE.format(repo=str(REPO), finetune=str(FINETUNE)))
    out = base / "restarted"
    output = finish(start(torchrun(2, script, finetune_args(runs["data"], out), elastic=True), base / "cache2"))

    # The first attempt did fail. torchrun names the rank it noticed first: rank 1, killed (-9), or at
    # times rank 0, which it stopped (-15) after rank 0's next collective call had already failed.
    assert re.search(r"failed \(exitcode: -(9|15)\) local_rank: [01]", output), output
    assert "restarted by torchrun after a failure: resuming" in output
    assert f"resumed from {out / 'last.pt'} at epoch 2" in output
    # Epoch 1 was trained once, by the first attempt; the second attempt trained epochs 2 and 3.
    for epoch in range(1, EPOCHS + 1):
        assert len(epoch_log_lines(output, epoch)) == 1, output
    assert [r["epoch"] for r in history(out)] == list(range(1, EPOCHS + 1))
    # The resumed run restored everything (weights, optimiser, schedule, RNG, data order): it ends
    # where the uninterrupted two-process run ended. Same world size, same order of arithmetic:
    # only float noise from thread scheduling could differ, and here none does.
    interrupted, straight = load_file(out / "bundle" / WEIGHTS_FILE), load_file(ddp / "bundle" / WEIGHTS_FILE)
    for name in straight:
        torch.testing.assert_close(interrupted[name], straight[name], rtol=1e-6, atol=1e-6, msg=name)
    assert history(out)[-1]["val_loss"] == pytest.approx(history(ddp)[-1]["val_loss"], rel=1e-6)


# ----------------------------------------------------------------------------------------------
# The properties the above relies on, checked directly


@pytest.mark.parametrize("n, world, batch", [(48, 2, 16), (50, 2, 10), (60, 4, 12), (64, 4, 32)])
def test_per_rank_batches_together_are_the_single_process_batch(n, world, batch):
    """DistributedSampler deals the permutation out rank, rank + N, ...: step k's per-rank batches
    of batch/N are together batch k of the one-process run, when N divides the dataset size."""
    dataset = list(range(n))
    epoch = 3

    def batches(rank: int, replicas: int) -> list[list[int]]:
        sampler = DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=True, seed=7)
        sampler.set_epoch(epoch)
        return [b.tolist() for b in DataLoader(dataset, batch_size=batch // replicas, sampler=sampler)]

    one = batches(0, 1)
    per_rank = [batches(r, world) for r in range(world)]
    assert all(len(p) == len(one) for p in per_rank)
    for k, global_batch in enumerate(one):
        assert sorted(sum((p[k] for p in per_rank), [])) == sorted(global_batch)
    assert sorted(sum(one, [])) == dataset


class _Numbers(torch.utils.data.Dataset):
    """Sample i is (tensor [i], label 0, index i), the shape of ImageDataset's samples."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        i = key[0] if isinstance(key, tuple) else key  # the training sampler's (index, epoch), as ImageDataset
        return torch.tensor([float(i)]), 0, i


@pytest.mark.parametrize("n, world", [(50, 2), (48, 4), (33, 2)])
def test_run_loaders_give_each_rank_its_share_of_the_same_global_batches(monkeypatch, n, world):
    """run._loader (the DataLoader path): training batches of batch/N per rank that together
    are the one-process batches, the same number of steps on every rank; evaluation shards that
    hold every sample once. With 33 samples on 2 ranks, the one repeat that evens out the shards
    falls in the partial last batch, which is dropped: it only shows where padding would complete
    one more batch (47 samples, batch 16, 4 ranks: 3 steps instead of 2)."""
    from classifier import run as run_module
    from classifier.config import RunConfig

    cfg = RunConfig(workers=0, seed=5)
    dataset, batch = _Numbers(n), 16

    def indices(rank: int, replicas: int, train: bool) -> list[list[int]]:
        monkeypatch.setattr(distributed, "world_size", lambda: replicas)
        monkeypatch.setattr(distributed, "rank", lambda: rank)
        size = batch // replicas if train else 2 * batch // replicas
        loader = run_module._loader(dataset, size, train=train, cfg=cfg, device=torch.device("cpu"))
        if train:
            loader.sampler.set_epoch(1)
        return [b[2].tolist() for b in loader]

    one = indices(0, 1, train=True)
    per_rank = [indices(r, world, train=True) for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1  # DDP needs the same number of steps everywhere
    assert len(per_rank[0]) == len(one) == n // batch  # the partial last batch is dropped alike
    for k, global_batch in enumerate(one):
        assert sorted(sum((p[k] for p in per_rank), [])) == sorted(global_batch)
    evaluation = [sum(indices(r, world, train=False), []) for r in range(world)]
    assert sorted(sum(evaluation, [])) == list(range(n))


@pytest.mark.parametrize("n, world", [(15, 2), (9, 2), (10, 4), (3, 3)])
def test_evaluation_shards_cover_each_sample_exactly_once(n, world):
    shards = [list(distributed.ShardSampler(range(n), num_replicas=world, rank=r)) for r in range(world)]
    assert sorted(sum(shards, [])) == list(range(n))
    assert [len(distributed.ShardSampler(range(n), num_replicas=world, rank=r)) for r in range(world)] == \
        [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match="cannot be shared"):
        distributed.ShardSampler(range(2), num_replicas=4, rank=0)


def test_gather_predictions_keeps_each_sample_once(tmp_path):
    """The padded repeats of a DistributedSampler shard are dropped by dataset index."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        indices = torch.tensor([4, 0, 2, 0, 4])  # 0 and 4 repeated, as padding repeats them
        logits = torch.tensor([[4.0], [0.0], [2.0], [0.0], [4.0]])
        targets = torch.tensor([1, 0, 1, 0, 1])
        got_logits, got_targets, got_indices = distributed.gather_predictions(logits, targets, indices)
    finally:
        dist.destroy_process_group()
    assert got_indices.tolist() == [0, 2, 4]
    assert got_logits.flatten().tolist() == [0.0, 2.0, 4.0]
    assert got_targets.tolist() == [0, 1, 1]


def test_a_sync_batchnorm_model_saves_a_bundle_that_loads_into_the_plain_model(tmp_path):
    """convert_sync_batchnorm keeps every parameter and buffer name, so no conversion back is needed."""
    torch.manual_seed(0)
    plain = create_model("fast_cnn", num_classes=3, widths=[8, 16])
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(create_model("fast_cnn", num_classes=3, widths=[8, 16]))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
    assert list(converted.state_dict()) == list(plain.state_dict())
    with torch.no_grad():  # make the running statistics something a wrong mapping would show
        for m in converted.modules():
            if isinstance(m, torch.nn.SyncBatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    config = make_config(converted, architecture="fast_cnn", label_names=["a", "b", "c"],
                         model_args={"widths": [8, 16], "in_chans": 3}, input_size=(3, 16, 16),
                         mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear", crop_pct=1.0)
    save_bundle(tmp_path / "bundle", converted, config)
    model = load_bundle(tmp_path / "bundle").model
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model.eval()(x), converted.eval()(x))


def test_sync_batchnorm_is_left_out_on_the_cpu(caplog, tmp_path):
    """PyTorch's SyncBatchNorm has no CPU kernel: training would fail at the first batch."""
    model = create_model("fast_cnn", num_classes=3, widths=[8, 16])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        same = distributed.convert_sync_batchnorm(model, torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    assert same is model and not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    assert "needs CUDA" in caplog.text


def test_restart_count_comes_from_torchrun(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert distributed.restart_count() == 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert distributed.restart_count() == 2
