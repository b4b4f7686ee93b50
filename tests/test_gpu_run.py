"""benchmarks/gpu_run.py: its --tiny mode runs every phase of the GPU run on this CPU, so the one
prepared GPU run cannot fail on a typo; and the arithmetic that sizes the fine-tune to the time left."""

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import CLASSES, make_image_folder

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_run.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_run = load_script()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`gpu_run.py --tiny` on a generated tarball laid out as the CIFAR-10 one (train/ and test/
    of class folders of 32 px JPEGs): no network, no ../shared."""
    tmp = tmp_path_factory.mktemp("gpu_run")
    images = make_image_folder(tmp / "images", per_class=40, splits=("train", "test"), fmt="jpg")
    tarball = tmp / "tiny-jpeg.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(images / split, arcname=split)
    out, work = tmp / "out", tmp / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--data", str(tarball), "--out", str(out),
                           "--work", str(work)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"out": out, "work": work, "stdout": done.stdout,
            "results": json.loads((out / "results.json").read_text())}


def test_tiny_run_writes_every_table_within_its_budget(tiny_run):
    results, out = tiny_run["results"], tiny_run["out"]
    phases = results["phases"]
    assert list(phases) == ["data", "throughput", "airbench", "fast", "lite", "pack", "latency"]
    for name in ("data", "throughput", "fast", "lite", "pack", "latency"):
        assert phases[name]["status"] == "done", (name, phases[name])
    # On a CPU airbench94 cannot train (it hard-codes CUDA): the phase says why instead.
    assert phases["airbench"]["status"].startswith("skipped: airbench")
    assert results["data"] == {"layout": str(tiny_run["work"] / "cifar10"), "classes": sorted(CLASSES),
                               "train": 75, "val": 15, "test": 30}
    # At most 8 flat files come back from the GPU machine, none over 16 MiB.
    files = [p for p in out.iterdir()]
    assert all(p.is_file() for p in files) and len(files) <= 8
    assert all(p.stat().st_size < 16 * 2**20 for p in files)
    markdown = (out / "results.md").read_text()
    for heading in ("## airbench94 and the fast recipe", "## Fine-tuned EfficientNet-Lite", "## Throughput",
                    "## Latency on this CPU", "## Phases"):
        assert heading in markdown
    assert "Goal (at least 94% mean in less time than airbench94)" in markdown


def test_airbench_gets_the_same_images_in_its_own_format(tiny_run):
    airbench = tiny_run["results"]["airbench"]
    data = tiny_run["results"]["data"]
    # train/ and test/ of the layout (the validation hold-out is not airbench's)
    assert (airbench["train_images"], airbench["test_images"]) == (data["train"], data["test"])
    check = airbench["format_check"]
    assert check["train_images"] == data["train"]
    if check["loader"].startswith("airbench.CifarLoader"):  # airbench importable: its own loader read them
        assert check["batch"][1:] == [3, 32, 32] and check["labels"] == [0, 1, 2]


def test_fast_recipe_runs_every_seed_through_the_command_line(tiny_run):
    fast = tiny_run["results"]["fast"]
    assert fast["warmup"]["returncode"] == 0 and fast["warmup"]["epochs_done"] == 1
    assert [r["seed"] for r in fast["runs"]] == [0, 1]
    for run in fast["runs"]:
        assert run["returncode"] == 0 and "--recipe fast" in run["command"]
        assert 0 <= run["accuracy"] <= 1 and run["tta"] == "flip-shift"
        assert run["train_seconds"] > 0 and run["seconds"] > run["train_seconds"]
        assert run["in_memory_loader"]


def test_lite_bundle_is_packed_with_its_own_evaluation(tiny_run):
    results, out = tiny_run["results"], tiny_run["out"]
    (lite,) = results["lite"]
    assert lite["model"] == "tf_efficientnet_lite0" and lite["epochs_done"] == lite["planned_epochs"] == 1
    assert 0 <= lite["accuracy"] <= 1 and lite["tta"] == "flip" and lite["input_size"] == [3, 64, 64]
    assert lite["in_memory_loader"]
    for flag in ("--pretrained-source pypi", "--image-size 64", "--loader memory", "--tta flip",
                 "--freeze-epochs 0", "--backbone-lr-scale 1.0", "--label-smoothing 0.1"):
        assert flag in lite["command"]
    best = results["best"]
    assert best["model"] == "tf_efficientnet_lite0" and best["accuracy"] == lite["accuracy"]
    assert best["beats_shipped"] is False  # 30 test images are not the shipped model's 10,000
    with tarfile.open(out / best["archive"]) as tar:
        names = set(tar.getnames())
    for member in ("config.json", "model.safetensors", "README.md", "eval/metrics.json"):
        assert f"tf_efficientnet_lite0-64px/{member}" in names
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = set(tar.getnames())
    assert "runs/fast-seed1/metrics.jsonl" in names and "workers/airbench.json" in names


def test_throughput_and_latency_rows_are_measured(tiny_run):
    results = tiny_run["results"]
    rows = results["throughput"]["rows"]
    assert [(r["model"], r["size"]) for r in rows] == [("fast_cnn", 32), ("tf_efficientnet_lite0", 64)]
    assert all(r["train_images_per_second"] > 0 and r["eval_images_per_second"] > 0 for r in rows)
    new, shipped = results["latency"]
    assert new["input_size"] == [3, 64, 64] and shipped["input_size"] == [3, 160, 160]
    assert new["forward_ms"] > 0 and shipped["predict_ms"] > 0


def test_tables_of_a_gpu_run(tiny_run):
    """What only the GPU produces (airbench runs, a refitted fine-tune), rendered from the tiny run's numbers."""
    d = json.loads(json.dumps(tiny_run["results"]))
    runs = [{"seed": s, "accuracy": a, "seconds": t} for s, a, t in ((0, 0.9398, 3.1), (1, 0.9404, 3.0))]
    d["airbench"].update(runs=runs, warmup_seconds=4.2, tta="flip-shift", airbench="0.1.8")
    # The tiny data can be learnt perfectly in one epoch; the goal line is checked on a recipe below 94%.
    for run in d["fast"]["runs"]:
        run["accuracy"] = 0.9312
    d["lite"][0]["first_try"] = {"planned_epochs": 12, "stopped": "its first epoch (25.0 s) says 12 epochs do not fit",
                                 "seconds": 40.0, "epoch_seconds": [25.0]}
    markdown = gpu_run.render_markdown(d)
    assert "| airbench94 0.1.8 | 2 | 94.01 ± 0.04 (93.98-94.04) (flip-shift) | 3.05 ± 0.07 (3.00-3.10) |" in markdown
    assert "warmup94 4.2 s" in markdown
    assert "Goal (at least 94% mean in less time than airbench94): **not met**: the fast recipe" in markdown
    assert "| 1 | 94.04 | 3.0 |" in markdown
    assert "first try: 12 epochs, its first epoch (25.0 s) says 12 epochs do not fit" in markdown


def test_epochs_fit_the_time_left():
    plan = gpu_run.GPU
    counts = {"train": 49000, "val": 1000, "test": 10000}
    rates = {"train": 3000 / gpu_run.LOADER_EFFICIENCY, "eval": 10000 / gpu_run.LOADER_EFFICIENCY}
    # an epoch: 49000/3000 + 1000/10000 + the checkpoint = 18.43 s; the run's fixed cost: 35 + 21000/10000 = 37.1 s
    assert gpu_run.plan_epochs(37.1 + 10 * 18.44, counts, rates, plan) == 10
    assert gpu_run.plan_epochs(37.1 + 10 * 18.42, counts, rates, plan) == 9
    assert gpu_run.plan_epochs(10, counts, rates, plan) == 0
    assert gpu_run.plan_epochs(1e6, counts, rates, plan) == plan.lite_max_epochs


def test_a_slow_first_epoch_refits_the_run():
    # first epoch 20 s (+2 s of checkpoint), seen 30 s into the run: 9 more epochs and 10 s of
    # evaluation need 208 s
    assert gpu_run.refit_epochs(30, 20, 10, 208, 10) is None
    # with 150 s left, a fresh run pays its 10 s start again: (150 - 10 - 10) / 22 = 5 epochs
    assert gpu_run.refit_epochs(30, 20, 10, 150, 10) == 5


def test_spread_reads_as_mean_sd_and_range():
    assert gpu_run.spread([0.94, 0.95, 0.93], scale=100) == "94.00 ± 1.00 (93.00-95.00)"
    assert gpu_run.spread([3.5]) == "3.50" and gpu_run.spread([]) == "-"
