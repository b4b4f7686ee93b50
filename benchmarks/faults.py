#!/usr/bin/env python
"""The slow faults, made for real, each checked and timed; prints a table (tests/test_faults.py has the quick ones).

    python benchmarks/faults.py                      # every fault below
    python benchmarks/faults.py stalled-rank full-disk

- stalled-rank: a torchrun job of two CPU processes (gloo) whose rank 1 stops itself (SIGSTOP) at
  epoch 2, as a hung driver or a stuck disk would; CLASSIFIER_COLLECTIVE_TIMEOUT=20. Expected: rank 0
  ends in one `error:` line naming rank 1 and where it stopped, within about the timeout (gloo's own
  default would have waited 30 minutes in silence).
- full-disk: --out on a tmpfs too small for a second checkpoint beside the first (mounted in a user
  namespace: `unshare -rm`), so the disk really fills. Expected: one line naming the file, the last
  whole checkpoint kept, and --resume on a larger disk finishing the run.
- read-only: --out in a folder bind-mounted read-only. Expected: refused in one line before any
  data is loaded.
- unpack-race: four processes load one fresh .tar.gz of 6,000 images at once. Expected: all see
  every image; one complete copy in the cache.

Needs Linux with unshare (util-linux) for full-disk and read-only. Run with OMP_NUM_THREADS=1 on a
shared machine; the times are wall-clock on whatever it is.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PYTHON = sys.executable
SMALL_RUN = ["--model", "fast_cnn", "--model-args", '{"widths": [8, 16]}', "--batch-size", "8", "--lr", "0.05",
             "--workers", "0", "--mistakes", "0", "--device", "cpu"]


def environment(cache: Path, **extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CLASSIFIER_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), **extra}
    for name in [n for n in env if n.startswith("TORCHELASTIC_")]:
        env.pop(name)
    return env


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def make_folder(root: Path, per_class: int = 12, size: int = 32) -> Path:
    from tests.conftest import make_image_folder

    return make_image_folder(root, per_class=per_class, size=size)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------


STOPPING_RANK = textwrap.dedent("""
    # training/finetune.py, except that rank 1 stops itself (SIGSTOP) at epoch 2, step 1.
    import os, signal, sys
    from classifier import distributed

    noted = distributed.note_progress

    def note_progress(epoch, step):
        noted(epoch, step)
        if epoch == 1 and step == 1 and distributed.rank() == 1:
            os.kill(os.getpid(), signal.SIGSTOP)

    distributed.note_progress = note_progress
    from classifier.cli.train import main
    sys.exit(main())
""")


def stalled_rank(work: Path) -> tuple[bool, str]:
    data = make_folder(work / "shapes", per_class=16)
    script = work / "stopping_rank.py"
    script.write_text(STOPPING_RANK)
    timeout = 20
    command = [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
               str(script), "--data", str(data), *SMALL_RUN, "--epochs", "3", "--out", str(work / "run")]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=environment(work / "cache", CLASSIFIER_COLLECTIVE_TIMEOUT=str(timeout)))
    seconds = time.perf_counter() - started
    lines = error_lines(result.stdout + result.stderr)
    named = [line for line in lines if re.search(r"rank 1 \(.*pid \d+\) stopped answering \d+ s ago, at epoch 2, step \d", line)]
    ok = result.returncode != 0 and len(named) == 1
    return ok, (f"exit {result.returncode} after {seconds:.0f} s (timeout {timeout} s): "
                f"{named[0] if named else (lines or result.stderr.splitlines()[-3:])}")


def _unshare(script: str, work: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=environment(work / "cache"))


def full_disk(work: Path) -> tuple[bool, str]:
    data = make_folder(work / "shapes")
    sizing = work / "sizing"
    args = ["--data", str(data), *SMALL_RUN, "--epochs", "2"]
    subprocess.run([PYTHON, "-m", "classifier", "train", *args, "--out", str(sizing)], cwd=ROOT, check=True,
                   capture_output=True, env=environment(work / "cache"))
    # Room for config.yaml, the first epoch's files and half a second checkpoint: the disk fills
    # while the second epoch's checkpoint is written beside the first.
    first = sum((sizing / name).stat().st_size for name in ("last.pt", "best.safetensors", "metrics.jsonl",
                                                             "curves.png", "config.yaml"))
    size_kb = (first + (sizing / "last.pt").stat().st_size // 2) // 1024 + 4 * 4  # tmpfs counts 4 KB pages
    disk = work / "disk"
    disk.mkdir()
    out = disk / "run"
    train = f"{shlex.quote(PYTHON)} -m classifier train {shlex.join(args)} --out {shlex.quote(str(out))}"
    script = (f"mount -t tmpfs -o size={size_kb}k tmpfs {shlex.quote(str(disk))} && {{ {train}; echo exit=$?; "
              f"cp -r {shlex.quote(str(out))} {shlex.quote(str(work / 'kept'))}; }}")
    result = _unshare(script, work)
    lines = error_lines(result.stderr)
    exit_code = re.search(r"exit=(\d+)", result.stdout)
    kept = work / "kept"
    resumed = subprocess.run([PYTHON, "-m", "classifier", "train", *args, "--out", str(kept), "--resume"], cwd=ROOT,
                             capture_output=True, text=True, env=environment(work / "cache")) if kept.exists() else None
    ok = (exit_code is not None and exit_code.group(1) == "2" and len(lines) == 1 and "no space left" in lines[0]
          and resumed is not None and resumed.returncode == 0 and (kept / "bundle" / "model.safetensors").exists())
    return ok, (f"tmpfs of {size_kb} KB: exit {exit_code.group(1) if exit_code else '?'}: "
                f"{lines[0] if lines else result.stderr[-300:]} | then --resume elsewhere: exit "
                f"{resumed.returncode if resumed else '-'}")


def read_only(work: Path) -> tuple[bool, str]:
    data = make_folder(work / "shapes")
    locked = work / "locked"
    locked.mkdir()
    train = (f"{shlex.quote(PYTHON)} -m classifier train --data {shlex.quote(str(data))} {shlex.join(SMALL_RUN)} "
             f"--epochs 1 --out {shlex.quote(str(locked / 'run'))}")
    started = time.perf_counter()
    result = _unshare(f"mount --bind {locked} {locked} && mount -o remount,ro,bind {locked} && {train}", work)
    seconds = time.perf_counter() - started
    lines = error_lines(result.stderr)
    ok = (result.returncode == 2 and len(lines) == 1 and "not writable" in lines[0]
          and "epoch 1/" not in result.stdout + result.stderr)
    return ok, f"exit {result.returncode} after {seconds:.1f} s, before training: {lines[0] if lines else result.stderr[-300:]}"


def unpack_race(work: Path) -> tuple[bool, str]:
    from tests.conftest import make_image_folder

    root = make_image_folder(work / "src", per_class=1000, size=8, splits=("train", "test"))
    archive = work / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "train", arcname="train")
        tar.add(root / "test", arcname="test")
    code = ("from classifier.data import load_data; d = load_data(%r); "
            "print(len(d.train) + len(d.val) + len(d.test))" % str(archive))
    started = time.perf_counter()
    processes = [subprocess.Popen([PYTHON, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=environment(work / "cache")) for _ in range(4)]
    outputs = [p.communicate(timeout=600) for p in processes]
    seconds = time.perf_counter() - started
    counts = [out.strip() for out, _ in outputs]
    copies = [p for p in (work / "cache" / "archives").iterdir() if p.is_dir()]
    files = sum(1 for _ in copies[0].rglob("*.png")) if len(copies) == 1 else None
    ok = counts == ["6000"] * 4 and len(copies) == 1 and files == 6000
    failures = [err.strip().splitlines()[-1] for _, err in outputs if err.strip() and "Traceback" in err]
    return ok, (f"4 processes in {seconds:.1f} s: images seen {counts}; cache: {len(copies)} copy, {files} files"
                + (f"; {failures[0]}" if failures else ""))


FAULTS = {"stalled-rank": stalled_rank, "full-disk": full_disk, "read-only": read_only, "unpack-race": unpack_race}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("faults", nargs="*", metavar="FAULT", help=f"which to run: {', '.join(FAULTS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.faults) - set(FAULTS))
    if unknown:
        parser.error(f"unknown fault(s) {', '.join(unknown)}; choose from {', '.join(FAULTS)}")
    rows = []
    for name in args.faults or FAULTS:
        with tempfile.TemporaryDirectory(prefix=f"fault-{name}-") as work:
            started = time.perf_counter()
            try:
                ok, outcome = FAULTS[name](Path(work))
            except Exception as exc:  # noqa: BLE001 - a fault script reports, it does not stop at the first
                ok, outcome = False, f"{type(exc).__name__}: {exc}"
            rows.append((name, "ok" if ok else "FAILED", f"{time.perf_counter() - started:.0f}", outcome))
            print(json.dumps(dict(zip(("fault", "result", "seconds", "outcome"), rows[-1]))), flush=True)
    print("\n| fault | result | seconds | outcome |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |")
    return 0 if all(row[1] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
