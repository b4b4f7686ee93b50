#!/usr/bin/env python
"""Every lesson, each as its one command, on this CPU: the lesson's figure beside ours.

    OMP_NUM_THREADS=1 python benchmarks/tutorials.py                  # every lesson (~20 min, 2-core CPU)
    OMP_NUM_THREADS=1 python benchmarks/tutorials.py --only apparel,cifar3

For each lesson (recipes/tutorial-NAME.yaml) it runs `python -m classifier tutorial NAME` with the
data given by --set, as a learner would, in a fresh process, and reads the figure from the bundle the
lesson made: the split its evaluation shows (test, or a carved one), its size and 95% interval. Where
the whole lesson would take hours here, SHORTER cuts it with more --set settings (fewer epochs, a
smaller grid), and the table says so: those figures are not the lesson's and are not meant to match.

The data, built offline by benchmarks/offline_datasets.py where it is missing (docs/offline_data.md):
- CIFAR-10: the JPEG copy in shared/data (--cifar);
- Fashion-MNIST: the four idx files from Debian's dataset-fashion-mnist (OUT/data/FashionMNIST/raw);
- the transfer lesson's "folder of scene photos": no scene photos are at hand offline, so CIFAR-10's
  airplane and ship images upscaled to mixed photo sizes (200-640 px; 300 train, 100 val) stand in;
  their detail is that of 32 px images.

Writes benchmarks/results/tutorials_cpu.md (the table, the machine, the commands); the runs go to
OUT (default /tmp/tutorials-bench), each lesson in OUT/runs/, started afresh.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

from classifier.bundle import EVAL_DIR, METRICS_FILE  # noqa: E402
from classifier.cli import recipe, tutorial  # noqa: E402
from classifier.intervals import describe_accuracy  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "tutorials_cpu.md"
# shared/data sits beside the checkout (../shared), or beside the folder of worktrees (../../shared)
CIFAR = next((base / "shared" / "data" / "cifar10-jpeg.tar.gz" for base in ROOT.parents
              if (base / "shared" / "data" / "cifar10-jpeg.tar.gz").is_file()), ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
PHOTO_CLASSES = ("airplane", "ship")

# The settings that cut a lesson short on a CPU, and why; a lesson not here runs whole.
SHORTER = {
    "cifar10": (["epochs=3"], "3 of the lesson's 30 epochs (30 take about 24 min here: 78.12%, docs/results.md)"),
    "transfer": (["epochs=8", "image_size=128", "lr_finder_steps=20"],
                 "at most 8 epochs (the recipe: 15, early stopping at 3) at 128 px (224), a 20-step LR range "
                 "test (100); at 224 px, 3 epochs took 455 s here for 68% (the head alone in the first)"),
    "tuning": (["classes=airplane,automobile,ship", "trials=2", "trial_epochs=1", "epochs=2"],
               "3 classes (airplane, automobile, ship), the grid's first 2 of 8 points for 1 epoch each "
               "(10), the winner retrained for 2 epochs (30)"),
}


def data_settings(name: str, data: dict[str, Path]) -> list[str]:
    """The --set settings that say where a lesson's data is."""
    if name == "apparel":
        return [f"data_dir={data['fashion']}"]
    if name == "transfer":
        return [f"data={data['photos']}"]
    return [f"data_dir={data['cifar']}"]


def what_data(name: str) -> str:
    return {"apparel": "Fashion-MNIST (Debian's dataset-fashion-mnist)",
            "transfer": f"CIFAR-10 {' and '.join(PHOTO_CLASSES)} upscaled to photo sizes (300 train, 100 val)",
            "cifar3": "CIFAR-10 airplane, automobile, ship (JPEG copy)",
            "tuning": "CIFAR-10 (JPEG copy)", "cifar10": "CIFAR-10 (JPEG copy)"}.get(name, "")


def build_data(out: Path, cifar: Path) -> dict[str, Path]:
    """The lessons' data under OUT/data, built by offline_datasets.py where it is not there yet."""
    root = out / "data"
    fashion_raw = root / "FashionMNIST" / "raw"
    photos = root / f"cifar-{'-'.join(PHOTO_CLASSES)}-photos"
    steps = [step for step, there in (("fashion-raw", fashion_raw.is_dir()), ("photos", photos.is_dir())) if not there]
    if steps:
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "offline_datasets.py"), str(root),
                        "--only", ",".join(steps), "--classes", *PHOTO_CLASSES, "--cifar", str(cifar)],
                       check=True, cwd=ROOT)
    return {"fashion": root, "photos": photos, "cifar": cifar}


def run_lesson(name: str, settings: list[str], runs: Path, log_dir: Path) -> dict:
    """`python -m classifier tutorial NAME --set ...` in a fresh process, in OUT/runs (the recipes'
    outs are relative), and the figure of the bundle it made."""
    argv = ["-m", "classifier", "tutorial", name, *(f"--set={item}" for item in settings)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    planned = recipe.plan(tutorial.lessons()[name], settings)
    for command, options, _ in planned.steps:  # afresh: a finished step would be skipped
        if command in recipe.MAKING:
            shutil.rmtree(runs / str(options["out"]), ignore_errors=True)
    started = time.perf_counter()
    load = os.getloadavg()[0]
    with open(log_dir / f"{name}.log", "w") as log:
        code = subprocess.run([sys.executable, *argv], cwd=runs, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - started
    bundles = [recipe.bundle_of(command, options) for command, options, _ in planned.steps]
    made = {}  # bundle -> (its architecture, its metrics), the lesson's own (the last) last
    for bundle in filter(None, bundles):
        metrics_path = runs / bundle / EVAL_DIR / METRICS_FILE
        if code == 0 and metrics_path.is_file():
            config = json.loads((runs / bundle / "config.json").read_text())
            made[bundle] = (config["architecture"], json.loads(metrics_path.read_text()))
    metrics = made.pop(tutorial.made_bundle(planned), (None, {}))[1]
    return {"code": code, "seconds": seconds, "load": load, "metrics": metrics, "others": list(made.values()),
            "reported": planned.lesson.get("reported", ""), "command": "python " + shlex.join(argv)}


def ours(result: dict) -> str:
    m = result["metrics"]
    if not m:
        return f"failed (exit {result['code']})"
    text = f"{describe_accuracy(m['accuracy'], m.get('accuracy_ci95'), m['num_samples'])} on {m.get('split', 'test')}"
    others = "; ".join(f"{name}: {o['accuracy']:.1%}" for name, o in result.get("others", []))
    return text + (f" (before it, {others})" if others else "")


HEADER = ["| lesson | data | the lesson's figure | ours | seconds | load | cut short | command |",
          "|---|---|---|---|---:|---:|---|---|"]


def row(name: str, r: dict) -> str:
    short = SHORTER.get(name, (None, "no: the whole lesson"))[1]
    return (f"| {name} | {what_data(name)} | {r['reported']} | {ours(r)} | {r['seconds']:.0f} | "
            f"{r['load']:.1f} | {short} | `{r['command']}` |")


def table(results: dict[str, dict], earlier: dict[str, str] | None = None) -> str:
    """The rows of `results`, and (with --only) the `earlier` file's rows of the other lessons, in
    the lessons' order."""
    rows = dict(earlier or {}) | {name: row(name, r) for name, r in results.items()}
    order = list(tutorial.lessons())
    return "\n".join(HEADER + [rows[n] for n in sorted(rows, key=lambda n: (order.index(n) if n in order else 99, n))]) + "\n"


def earlier_rows(path: Path) -> dict[str, str]:
    """lesson -> its row, in a table this script wrote before."""
    if not path.is_file():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ") and line not in HEADER]
    return {line.split("|")[1].strip(): line for line in lines}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=None, help="comma-separated lessons (default: all)")
    p.add_argument("--cifar", type=Path, default=CIFAR, help="CIFAR-10 as the JPEG .tar.gz (shared/data)")
    p.add_argument("--out", type=Path, default=Path("/tmp/tutorials-bench"), help="data and runs")
    p.add_argument("--results", type=Path, default=RESULTS, help="the table, as Markdown")
    args = p.parse_args(argv)
    names = list(tutorial.lessons()) if not args.only else args.only.split(",")
    data = build_data(args.out, args.cifar.resolve())
    runs = args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        settings = data_settings(name, data) + SHORTER.get(name, ([], ""))[0]
        print(f"{name}: python -m classifier tutorial {name} {' '.join('--set=' + s for s in settings)}", flush=True)
        results[name] = run_lesson(name, settings, runs, args.out)
        print(f"  {ours(results[name])}, {results[name]['seconds']:.0f} s (log: {args.out / (name + '.log')})", flush=True)
    # --only reruns some lessons: the others keep their rows (each row names its own command)
    text = table(results, earlier_rows(args.results) if args.only else None)
    print("\n" + text)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(
        f"# benchmarks/tutorials.py on {platform.machine()} ({os.cpu_count()} cores, shared), {date.today()}\n\n"
        f"Each lesson as one command, `python -m classifier tutorial NAME`, in a fresh process (wall-clock "
        f"seconds: start-up, data, training, evaluation, figures; `load` is the 1-minute load average "
        f"when it started, the machine being shared). OMP_NUM_THREADS={threads}. Figures are accuracy on "
        f"the split the bundle's evaluation shows, with its 95% interval and size; a lesson cut short "
        f"(fewer epochs, a smaller grid) says how, and its figure is not the lesson's.\n\n"
        f"Command: `OMP_NUM_THREADS={threads} python benchmarks/tutorials.py`"
        + (f" (this time `--only {args.only}`: the other rows are from an earlier run of the same script)"
           if args.only else "") + "\n\n" + text)
    print(f"table: {args.results}")
    return 0 if all(r["code"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
