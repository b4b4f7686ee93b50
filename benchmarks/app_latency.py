#!/usr/bin/env python
"""End-to-end latency of the app through gradio_client, beside the bare model; a markdown table.

    python benchmarks/app_latency.py                      # the default shipped bundle
    python benchmarks/app_latency.py --model assets/models/cifar10-cnn --requests 50

The app runs as `python app.py` in a child process (as deployed: its own interpreter, its thread
and queue settings), on 127.0.0.1. Rows, all on the same image:
- model forward: Predictor.probabilities (forward + calibrated softmax) on one preprocessed
  tensor, in this process, in the NHWC (channels_last) layout the Predictor uses, and on a copy
  switched to plain NCHW beside it for comparison;
- Predictor.predict: decode + resize + forward + calibrated softmax, in this process (with
  test-time augmentation where the bundle was evaluated with it, as the app predicts);
- the app, one client: sequential calls to /classify (upload, queue, predict, reply);
- the app, --clients clients at once: each client its own thread and connection.
Latencies are per request (p50, p95); the ratio is the app's p50 over Predictor.predict's p50, the
price of HTTP, the upload and Gradio's queue. This process uses as many torch threads as each of
the app's workers does, so the model rows compare like with like.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import app as app_module  # noqa: E402  (its CONCURRENCY sets the app's torch threads)
from classifier import app_logic as demo  # noqa: E402
from classifier.images import open_image  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(model: str, port: int, log: Path, timeout: float = 180.0) -> subprocess.Popen:
    """`python app.py --model MODEL` on 127.0.0.1:port; returns once it answers HTTP."""
    import httpx

    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1"}
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", model, "--host", "127.0.0.1",
                               "--port", str(port)], cwd=ROOT, env=env, stdout=log.open("w"),
                              stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the app exited with code {server.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise SystemExit(f"the app did not answer within {timeout:.0f} s:\n{log.read_text()[-2000:]}")


def client_latencies(url: str, image: str, model_name: str, clients: int, requests: int) -> tuple[list[float], float]:
    """Per-request latencies of `clients` threads making `requests` calls each; and the wall time."""
    from gradio_client import Client, handle_file

    connections = [Client(url, verbose=False, download_files=False) for _ in range(clients)]
    for c in connections:  # warm: the first call of a client opens its connection
        c.predict(handle_file(image), model_name, api_name="/classify")
    latencies: list[float] = []
    lock, start_line = threading.Lock(), threading.Barrier(clients)

    def work(c):
        start_line.wait()
        mine = timed(lambda: c.predict(handle_file(image), model_name, api_name="/classify"), requests)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=work, args=(c,)) for c in connections]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - start


def row(name: str, clients: int, times: list[float], wall: float | None, reference: float | None) -> str:
    p50, p95 = percentile(times, 50) * 1000, percentile(times, 95) * 1000
    throughput = f"{len(times) / wall:.1f}" if wall else f"{1 / statistics.mean(times):.1f}"
    ratio = f"{p50 / reference:.1f}x" if reference else ""
    return f"| {name} | {clients} | {len(times)} | {p50:.1f} | {p95:.1f} | {throughput} | {ratio} |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a bundle folder or Hub id (default: the app's default bundle)")
    parser.add_argument("--image", default=str(demo.EXAMPLES_DIR / "cat.jpg"))
    parser.add_argument("--requests", type=int, default=40, help="sequential requests of the one client")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-each", type=int, default=8, help="requests of each concurrent client")
    args = parser.parse_args(argv)

    choices = demo.model_choices(demo.MODELS_DIR, args.model)
    model_name = demo.default_model(choices, args.model)
    location = choices[model_name]
    threads = max(1, (os.cpu_count() or 1) // app_module.CONCURRENCY)  # what each app worker gets
    torch.set_num_threads(threads)

    predictor = demo.ModelStore({model_name: location}).get(model_name)  # as the app builds it
    batch = predictor.preprocess(open_image(args.image)).unsqueeze(0)
    timed(lambda: predictor.predict(args.image), 5)  # warm-up, as the app does on loading a model
    forward = timed(lambda: predictor.probabilities(batch), args.requests)
    # The same Predictor path with the layout switched back, so the two rows differ in that alone.
    nchw = copy.copy(predictor)
    nchw.model, nchw.channels_last = copy.deepcopy(predictor.model).to(memory_format=torch.contiguous_format), False
    timed(lambda: nchw.probabilities(batch), 5)
    forward_nchw = timed(lambda: nchw.probabilities(batch), args.requests)
    predict = timed(lambda: predictor.predict(args.image), args.requests)
    reference = percentile(predict, 50) * 1000

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_app(location, port, Path(tmp) / "app.log")
        try:
            url = f"http://127.0.0.1:{port}"
            single, _ = client_latencies(url, args.image, model_name, 1, args.requests)
            many, wall = client_latencies(url, args.image, model_name, args.clients, args.requests_each)
        finally:
            server.terminate()
            server.wait(timeout=30)

    print(f"model {model_name} ({predictor.bundle.architecture}, tta {predictor.tta}, input "
          f"{'x'.join(map(str, predictor.bundle.pretrained_cfg['input_size'][1:]))}), image {Path(args.image).name}; "
          f"{os.cpu_count()} CPUs, {threads} torch threads per prediction, app concurrency "
          f"{app_module.CONCURRENCY}; torch {torch.__version__}\n")
    print("| path | clients | requests | p50 ms | p95 ms | requests/s | p50 / Predictor p50 |")
    print("|---|---|---|---|---|---|---|")
    print(row("model forward (one tensor), NCHW copy of the Predictor", 1, forward_nchw, None, None))
    print(row("model forward (one tensor), NHWC as the Predictor runs it", 1, forward, None, None))
    print(row("Predictor.predict (decode, resize, forward)", 1, predict, None, None))
    print(row("app via gradio_client", 1, single, None, reference))
    print(row("app via gradio_client", args.clients, many, wall, reference))


if __name__ == "__main__":
    main()
