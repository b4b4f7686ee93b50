#!/usr/bin/env python
"""Pinned requirements for the Space and CI, resolved the same way each time.

    .venv/bin/python tools/lock.py                  every target
    .venv/bin/python tools/lock.py space-onnx       one (or several) of them

Targets, each written to locks/TARGET.txt:
- space-onnx: the Space's requirements for `deploy --runtime onnx` (classifier.space.serving_requirements);
- space-torch: the same for `deploy --runtime torch`, torch's CPU build. Only where PyPI's CPU index
  (classifier.space.CPU_TORCH_INDEX) answers: without it pip would lock PyPI's CUDA torch and its
  nvidia-* wheels into a Space that has no GPU, so the target is skipped, saying why;
- ci: requirements-dev.txt, what `./run test` (and so .ci/run) installs; torch's CPU build where the
  index answers, as ./run does. Not used by ./run: see docs/deploy.md ("Locks").

How: `pip install --dry-run --ignore-installed --report` of the target's requirements resolves every
distribution a fresh install into this interpreter would get (dependencies of dependencies too)
and installs nothing; each becomes a `name==version` line. The Space targets resolve beside this
environment's gradio (the Space's sdk_version, which deploy writes into its README) and leave gradio
itself out: the Space installs it. A lock holds for this Python and platform (a Space's are Linux
x86_64 and the python_version deploy writes: this interpreter's). `deploy` uses a Space lock only
while the digest it records matches the requirements it would write (classifier.space.space_requirements).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from classifier import space  # noqa: E402

TARGETS = ("space-onnx", "space-torch", "ci")
DEV_REQUIREMENTS = ROOT / "requirements-dev.txt"


def resolve(requirements: str, cwd: Path) -> list[tuple[str, str]]:
    """(name, version) of every distribution pip would install for `requirements`, sorted by name."""
    with tempfile.TemporaryDirectory() as scratch:
        source, report = Path(scratch) / "requirements.txt", Path(scratch) / "report.json"
        source.write_text(requirements)
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), "-r", str(source)], cwd=cwd, check=True)
        installs = json.loads(report.read_text())["install"]
    return sorted(((item["metadata"]["name"], item["metadata"]["version"]) for item in installs),
                  key=lambda pair: pair[0].lower())


def gradio_version() -> str:
    import gradio

    return gradio.__version__


def lock(target: str, cpu_index: bool) -> str | None:
    """The lock's text, or None (saying why on stderr) where it cannot be made here."""
    made = (f"made by `python tools/lock.py {target}` on {datetime.date.today()}, "
            f"Python {platform.python_version()} {platform.system()} {platform.machine()}")
    if target == "ci":
        ranges = DEV_REQUIREMENTS.read_text() + (ROOT / space.REQUIREMENTS_FILE).read_text()  # it includes it
        index = [f"--extra-index-url {space.CPU_TORCH_INDEX}"] if cpu_index else []
        header = [f"# The test environment (requirements-dev.txt), every package pinned: {made}.",
                  "# torch: " + ("its CPU build" if cpu_index else "PyPI's default build (PyTorch's CPU index did "
                                                                    "not answer), as ./run installs then"),
                  f"# from requirements sha256 {space.requirements_digest(ranges)}"]
        # Included by path, not copied: its own `-r requirements.txt` is relative to its folder.
        pins = resolve("\n".join(index + [f"-r {DEV_REQUIREMENTS}"]) + "\n", ROOT)
        return "\n".join(header + index + [f"{name}=={version}" for name, version in pins]) + "\n"
    runtime = target.removeprefix("space-")
    if runtime == "torch" and not cpu_index:
        print(f"{target}: skipped: {space.CPU_TORCH_INDEX} does not answer from here, and PyPI's torch would "
              "lock CUDA libraries into a CPU Space", file=sys.stderr)
        return None
    ranges = space.serving_requirements(runtime=runtime)
    gradio = gradio_version()
    pins = [(name, version) for name, version in resolve(ranges + f"gradio=={gradio}\n", ROOT) if name.lower() != "gradio"]
    index = [line for line in ranges.splitlines() if line.startswith("--")]
    header = [f"# Serving the demo app only, every package pinned: {made}, beside gradio {gradio}.",
              f"# from requirements sha256 {space.requirements_digest(ranges)}",
              "# gradio is not here: the Space installs the sdk_version of README.md."]
    return "\n".join(header + index + [f"{name}=={version}" for name, version in pins]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", choices=[[], *TARGETS], default=list(TARGETS), metavar="TARGET",
                        help=f"one or more of {', '.join(TARGETS)} (default: all)")
    args = parser.parse_args(argv)
    cpu_index = space.cpu_index_answers()
    (ROOT / space.LOCK_DIR).mkdir(exist_ok=True)
    for target in args.targets or TARGETS:
        text = lock(target, cpu_index)
        if text is None:
            continue
        path = ROOT / space.LOCK_DIR / f"{target}.txt"
        path.write_text(text)
        count = sum(1 for line in text.splitlines() if "==" in line)
        print(f"wrote {path.relative_to(ROOT)} ({count} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
