"""The project installs: a wheel of `classifier-kit` holds the library and the `classifier` console
command, which runs from the installed copy (not this checkout) and lists every command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from classifier.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_installs_the_library_and_the_console_command(tmp_path):
    # No build isolation: setuptools is already here, and the tests never touch the network. The
    # source is copied first so the build's own files (build/, *.egg-info) stay out of the checkout.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                                                "__pycache__", "assets", ".gpu", ".pytest_cache"))
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
                   check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("classifier_kit-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "-q", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import classifier; print(classifier.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr
    done = subprocess.run([sys.executable, str(site / "bin" / "classifier"), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(f"  {name} " in done.stdout for name in COMMANDS)
    assert not any(name.startswith("tests") for name in os.listdir(site))  # only the library is installed
