#!/usr/bin/env python
"""What a Space made by `python -m classifier deploy` installs: packages and megabytes, per runtime.

    python benchmarks/space_install.py            # writes benchmarks/results/space_install.md

For each runtime the requirements are the ones deploy would stage (classifier.space.space_requirements:
the lock tools/lock.py made, else the ranges) plus the gradio of this environment, which the Space
installs as its sdk_version. Each is installed into a fresh virtual environment under /tmp with pip
(the network, or this machine's package mirrors); measured: the distributions installed beyond an
empty venv's and `du -sb` of the venv less the empty venv's.

Runtime torch needs PyTorch's CPU index (classifier.space.CPU_TORCH_INDEX). Where it does not answer
pip would install PyPI's CUDA build and its nvidia-* wheels instead, which is not what a Space gets;
then the torch row is resolved only (`pip install --dry-run --report`: the same distributions a fresh
install would get, counted) and its size is the installed files of those same distributions in this
interpreter, which has PyPI's CUDA build: an upper bound, said so in the table.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as metadata
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from classifier import space  # noqa: E402

MB = 1e6
RESULT = ROOT / "benchmarks" / "results" / "space_install.md"


def du_bytes(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def requirements_for(runtime: str) -> tuple[str, str]:
    import gradio

    text, source = space.space_requirements(runtime)
    return text + f"gradio=={gradio.__version__}\n", source


def installed(python: Path) -> dict[str, str]:
    listing = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True,
                             check=True).stdout
    return {item["name"].lower(): item["version"] for item in json.loads(listing)}


def fresh_install(requirements: str, folder: Path) -> dict:
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    python = folder / "bin" / "python"
    empty_bytes, empty_packages = du_bytes(folder), installed(python)
    (folder / "requirements.txt").write_text(requirements)
    start = time.perf_counter()
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-r", str(folder / "requirements.txt")], check=True)
    seconds = time.perf_counter() - start
    packages = {name: v for name, v in installed(python).items() if name not in empty_packages}
    return {"packages": packages, "bytes": du_bytes(folder) - empty_bytes, "seconds": seconds,
            "how": "fresh venv: `pip install -r`, then `du -sb` less the empty venv's"}


def resolved_only(requirements: str) -> dict:
    # Without the index line, which would only make pip wait on an index that does not answer.
    requirements = "\n".join(line for line in requirements.splitlines() if not line.startswith("--extra-index-url"))
    with tempfile.TemporaryDirectory() as scratch:
        source, report = Path(scratch) / "requirements.txt", Path(scratch) / "report.json"
        source.write_text(requirements + "\n")
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), "-r", str(source)], check=True, capture_output=True)
        installs = json.loads(report.read_text())["install"]
    packages = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in installs}
    total, missing = 0, []
    for name, version in packages.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        total += sum(Path(dist.locate_file(f)).stat().st_size for f in dist.files or []
                     if Path(dist.locate_file(f)).is_file())
    how = ("resolved only (`pip install --dry-run --report`; PyTorch's CPU index did not answer, so pip took "
           "PyPI's CUDA torch); size: the installed files of the same distributions in this interpreter")
    if missing:
        how += f" (not installed here, not counted: {', '.join(missing)})"
    return {"packages": packages, "bytes": total, "seconds": None, "how": how}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtimes", nargs="+", choices=space.RUNTIMES, default=list(space.RUNTIMES))
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    cpu_index = space.cpu_index_answers()
    rows = []
    for runtime in args.runtimes:
        requirements, source = requirements_for(runtime)
        if runtime == "torch" and not cpu_index:
            result = resolved_only(requirements)
        else:
            folder = Path(tempfile.mkdtemp(prefix=f"space-{runtime}-"))
            try:
                result = fresh_install(requirements, folder)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        heavy = sorted(result["packages"], key=str.lower)
        nvidia = [name for name in heavy if name.startswith(("nvidia-", "triton"))]
        rows.append((runtime, source, result, nvidia))
        print(f"{runtime}: {len(result['packages'])} packages, {result['bytes'] / MB:.0f} MB ({result['how']})")

    lines = [f"# benchmarks/space_install.py, {datetime.date.today()}", "",
             f"Command: `python benchmarks/space_install.py` (Python {platform.python_version()}, "
             f"{platform.system()} {platform.machine()}). PyTorch's CPU index "
             + ("answered." if cpu_index else "did not answer from this machine."), "",
             "What each Space installs: its requirements.txt as `deploy --runtime R` stages it, plus the "
             "gradio of its sdk_version, which the Space installs itself.", "",
             "| runtime | requirements.txt from | packages | MB | CUDA wheels | install s | measured as |",
             "|---|---|---|---|---|---|---|"]
    for runtime, source, result, nvidia in rows:
        seconds = f"{result['seconds']:.0f}" if result["seconds"] is not None else "-"
        lines.append(f"| {runtime} | {source} | {len(result['packages'])} | {result['bytes'] / MB:.0f} | "
                     f"{len(nvidia)} | {seconds} | {result['how']} |")
    if not cpu_index and "torch" in args.runtimes:
        lines += ["", "The torch row is PyPI's CUDA build, which a Space would not get from these requirements "
                      "(their `--extra-index-url` asks for the CPU build). For the CPU build's size, "
                      "benchmarks/results/onnx_vs_torch_cpu.md measured torch 2.13.0+cpu, torchvision, numpy and "
                      "pillow in a fresh venv at 980 MB, against 178 MB for onnxruntime, numpy and pillow."]
    lines += ["", "Packages per runtime:", ""]
    for runtime, _, result, _ in rows:
        lines.append(f"- {runtime}: " + ", ".join(f"{name} {version}" for name, version
                                                  in sorted(result["packages"].items())))
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
