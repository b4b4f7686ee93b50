#!/usr/bin/env python
"""The app's resident memory after floods of large uploads, and its prediction speed, per malloc setting; a table.

    python benchmarks/app_memory.py                       # the shipped lite0, 3 floods of 40 photos of 24 MP
    python benchmarks/app_memory.py --floods 2 --uploads 20 --megapixels 12

Each setting runs in a child process of its own (glibc's thresholds cannot be put back): the app's
model store loads the bundle and answers one warm-up request (the resting size is measured then),
then each flood sends --uploads large JPEGs at once through a pool of 40 threads of which 2 run at a
time, as Gradio's worker threads and the app's CONCURRENCY do; the resident size is measured after
each flood, once the requests are done. Speed: predictions per second of a 640x480 photo, one
request at a time, after the floods. The settings:
- default: glibc as it comes;
- training: classifier.allocator.keep_freed_memory(), the thresholds training uses;
- serving: classifier.allocator.keep_freed_memory(serving=True), the app's (see that module).
The limit the app must keep: after the floods, at most 1.5x its resting size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = ("default", "training", "serving")
LIMIT = 1.5


def status(field: str) -> float:
    """A /proc/self/status size (VmRSS, VmHWM) in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024**2
    raise KeyError(field)


def make_photo(path: Path, megapixels: float, seed: int = 0) -> Path:
    """A smooth picture with some noise: a JPEG the size a phone's is (a few MB)."""
    import numpy as np
    from PIL import Image

    width = int((megapixels * 1e6 * 1.5) ** 0.5)
    height = int(width / 1.5)
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    colour = rng.uniform(60, 200, 3).astype(np.float32)
    pixels = colour * (0.6 + 0.4 * x) * (0.7 + 0.3 * y) + rng.normal(0, 6, (height, width, 3)).astype(np.float32)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def child(args: argparse.Namespace) -> dict:
    import torch

    from classifier import app_logic as logic
    from classifier.allocator import keep_freed_memory

    if args.setting == "training":
        keep_freed_memory()
    elif args.setting == "serving":
        keep_freed_memory(serving=True)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # as app.main: the cores split between 2 requests
    choices = logic.find_bundles()
    store = logic.ModelStore(choices)
    name = logic.default_model(choices)
    predictor = store.get(name)  # loads and answers the warm-up request
    small = args.small
    logic.classify(predictor, small)
    resting = status("VmRSS")
    after = []
    gate = threading.Semaphore(2)

    def request(path: str) -> None:
        with gate:
            logic.classify(store.get(name), path)

    for flood in range(args.floods):
        with ThreadPoolExecutor(max_workers=40) as pool:  # Gradio's worker threads (anyio's default limit)
            list(pool.map(request, [args.photo] * args.uploads))
        time.sleep(3.0)  # the requests are done; what the process keeps is what it holds now
        after.append(status("VmRSS"))
    started = time.perf_counter()
    for _ in range(args.speed_requests):
        logic.classify(predictor, small)
    rate = args.speed_requests / (time.perf_counter() - started)
    return {"setting": args.setting, "model": name, "resting_gb": resting, "after_floods_gb": after,
            "peak_gb": status("VmHWM"), "ratio": after[-1] / resting, "predictions_per_s": rate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--floods", type=int, default=3)
    parser.add_argument("--uploads", type=int, default=40, help="large photos per flood")
    parser.add_argument("--megapixels", type=float, default=24.0)
    parser.add_argument("--speed-requests", type=int, default=30)
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)  # in the child
    parser.add_argument("--photo", help=argparse.SUPPRESS)
    parser.add_argument("--small", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.setting:
        print(json.dumps(child(args)))
        return 0
    with tempfile.TemporaryDirectory() as work:
        photo = make_photo(Path(work) / "large.jpg", args.megapixels)
        small = make_photo(Path(work) / "small.jpg", 0.3, seed=1)
        print(f"# {args.floods} floods of {args.uploads} uploads of a {args.megapixels:g} MP JPEG "
              f"({photo.stat().st_size / 1e6:.1f} MB); speed on a 640x480 JPEG; {os.cpu_count()} CPUs", flush=True)
        rows = []
        for setting in args.settings:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
            out = subprocess.run([sys.executable, __file__, "--setting", setting, "--photo", str(photo), "--small",
                                  str(small), "--floods", str(args.floods), "--uploads", str(args.uploads),
                                  "--speed-requests", str(args.speed_requests)],
                                 capture_output=True, text=True, env=env, cwd=ROOT)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                return 1
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| malloc setting | resting GB | after each flood GB | peak GB | after / resting | predictions/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        floods = ", ".join(f"{gb:.2f}" for gb in r["after_floods_gb"])
        verdict = "" if r["ratio"] <= LIMIT else f" (over {LIMIT}x)"
        print(f"| {r['setting']} | {r['resting_gb']:.2f} | {floods} | {r['peak_gb']:.2f} | {r['ratio']:.2f}{verdict} | "
              f"{r['predictions_per_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
