"""training/finetune.py as a user runs it: a real run, --help, readable errors, kill and --resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "finetune.py"


def finetune(*args, cwd=None, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(SCRIPT), *map(str, args)]
    if popen:
        return subprocess.Popen(command, env=env, cwd=cwd, **popen)
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("cli") / "shapes", per_class=24, splits=("train", "test"))


def test_help_lists_every_option_with_its_default():
    out = finetune("--help").stdout
    for option in ("--data", "--classes", "--val-fraction", "--model", "--pretrained", "--epochs", "--lr",
                   "--optimizer", "--schedule", "--label-smoothing", "--grad-clip", "--freeze-epochs",
                   "--patience", "--amp", "--resume", "--out"):
        assert option in out
    assert "(default: sgd)" in out and "(default: chosen from the data" in out and "(default: None)" not in out


def test_a_real_run_writes_a_bundle(folder, tmp_path):
    out = tmp_path / "run"
    result = finetune("--data", folder, "--model", "tutorial_cifar_cnn", "--epochs", "2", "--batch-size", "16",
                      "--lr", "0.02", "--workers", "0", "--out", out, "--classes", "circle,square", "--cutmix", "1.0",
                      "--model-ema-decay", "0.9")
    assert result.returncode == 0, result.stderr
    assert "tutorial_cifar_cnn: 537,086 parameters" in result.stdout  # parameter count is printed
    assert result.stdout.count("epoch ") >= 2 and "test accuracy" in result.stdout
    bundle = out / "bundle"
    config = json.loads((bundle / "config.json").read_text())
    assert config["label_names"] == ["circle", "square"]
    assert config["classifier"]["training"]["cutmix"] == 1.0 and config["classifier"]["training"]["mixup"] == 0.0
    assert config["classifier"]["training"]["ema_decay"] == 0.9  # the bundle holds the weights' average
    assert "the moving average of the weights (decay 0.9) at epoch" in (bundle / "README.md").read_text()
    assert all("raw_val_acc" in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    assert config["classifier"]["command"].startswith("python ") and "--classes circle,square" in config["classifier"]["command"]
    metrics = json.loads((bundle / "eval" / "metrics.json").read_text())
    low, high = metrics["accuracy_ci95"]
    assert metrics["num_samples"] == 48 and metrics["split"] == "test"  # the data's own test split
    assert f"test accuracy {metrics['accuracy']:.1%} (95% CI {low:.1%}-{high:.1%}, n=48)" in result.stdout
    for name in ("model.safetensors", "eval/confusion_matrix.png", "eval/mistakes.json", "eval/curves.png"):
        assert (bundle / name).exists(), name
    assert (out / "metrics.jsonl").exists() and (out / "last.pt").exists()


@pytest.mark.parametrize("args, message", [
    (["--data", "/no/such/folder"], "no such file or directory"),
    (["--model", "resnet9000"], "unknown model"),
    (["--classes", "circle,hexagon"], "unknown class"),
    (["--val-fraction", "0"], "a run needs a validation split"),  # it crashed in decoding an empty split
])
def test_user_mistakes_get_one_clear_line(folder, tmp_path, args, message):
    base = {"--data": str(folder), "--model": "fast_cnn"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = [x for pair in base.items() for x in pair]
    result = finetune(*argv, "--epochs", "1", "--workers", "0", "--out", tmp_path / "r")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--mixup", "-0.2"], "alpha must be 0 (off) or positive, not -0.2"),
    (["--model-ema-decay", "1"], "the decay must be 0 (off) or between 0 and 1, like 0.9998; not 1"),
    (["--model-ema-decay", "fast"], "'fast' is not a number"),
])
def test_bad_option_values_are_refused_before_anything_runs(args, message):
    result = finetune(*args)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.timeout(900)  # three full runs in subprocesses; about 30 s on a quiet machine
def test_killed_run_resumes_to_the_same_result(folder, tmp_path):
    """SIGKILL after the first checkpoint, then --resume: same final metrics as an unbroken run.

    On the CPU with one thread the run is deterministic and the checkpoint carries every RNG, so
    the metrics must agree to float precision; 1e-6 only absorbs JSON round-tripping.
    """
    args = ["--data", folder, "--model", "fast_cnn", "--model-args", '{"widths": [8, 16, 32], "drop_rate": 0.1}',
            "--epochs", "5", "--batch-size", "8", "--workers", "0", "--lr", "0.05"]
    whole = finetune(*args, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    process = finetune(*args, "--out", out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "bundle").exists()

    resumed = finetune(*args, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    a = json.loads((tmp_path / "whole" / "test_metrics.json").read_text())
    b = json.loads((out / "test_metrics.json").read_text())
    for key in ("accuracy", "loss", "macro_f1", "ece"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    assert b["confusion_matrix"] == a["confusion_matrix"]
