"""classifier.allocator: glibc's malloc thresholds, raised once, and left alone where the environment chose."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from classifier import allocator

ROOT = Path(__file__).resolve().parents[1]  # the child imports classifier from the checkout
MALLOC_ENV = ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.fixture
def fresh(monkeypatch):
    """The module as if this process had not called keep_freed_memory() yet."""
    raise_thresholds = allocator._raise_thresholds  # the cached original, should a test replace it
    raise_thresholds.cache_clear()
    for name in MALLOC_ENV:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    raise_thresholds.cache_clear()  # a later call asks glibc again, not this test's answer


@pytest.mark.parametrize("name, value", [("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0"),
                                         ("MALLOC_MMAP_THRESHOLD_", "65536"),
                                         ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")])
def test_the_environment_s_choice_wins(fresh, name, value):
    fresh.setenv(name, value)
    assert allocator.configured_elsewhere()
    assert allocator.keep_freed_memory() is False


def test_unrelated_tunables_do_not_count(fresh):
    fresh.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX512F")
    assert not allocator.configured_elsewhere()


def test_a_gpu_s_work_leaves_the_allocator_alone(fresh):
    fresh.setattr(allocator, "_raise_thresholds", lambda: pytest.fail("the thresholds were raised for a GPU"))
    assert allocator.keep_freed_memory(torch.device("cuda")) is False


def test_not_glibc_is_a_no_op(fresh):
    fresh.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.keep_freed_memory() is False


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; elsewhere keep_freed_memory is a no-op (tested above)")
def test_applies_once_and_stops_the_page_faults():
    # A child process, so that this one keeps its allocator: a 64 MB buffer allocated and freed
    # again and again is mapped afresh (16,384 faults) each time by default, and reused once the
    # thresholds are raised (the heap may grow for it once more, not every time).
    code = """
import resource, sys, torch
from classifier.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() is True and keep_freed_memory() is True
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(1 << 24)
before = faults()
for _ in range(10):
    torch.ones(1 << 24)  # 64 MB, freed at once
print(faults() - before)
"""
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}  # glibc's defaults in the child
    faults = {mode: int(subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                                       check=True, cwd=ROOT, env=env).stdout) for mode in ("default", "keep")}
    assert faults["default"] >= 10 * 16_000
    assert faults["keep"] <= 2 * 16_384


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; elsewhere keep_freed_memory is a no-op (tested above)")
def test_serving_keeps_a_prediction_s_buffers_and_returns_an_upload_s():
    """The app's setting (benchmarks/app_memory.py measures it under floods of uploads): buffers the
    size of a prediction's (16 MB here) are reused, a decoded 24 MP photo's (64 MB) handed back at
    once rather than kept for the next upload."""
    code = """
import resource, sys, torch
from classifier.allocator import keep_freed_memory
assert keep_freed_memory(serving=True) is True
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def rss_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])
torch.ones(1 << 22)
before = faults()
for _ in range(10):
    torch.ones(1 << 22)  # 16 MB, freed at once
small = faults() - before
resting = rss_kb()
big = torch.ones(1 << 24)  # 64 MB
del big
print(small, rss_kb() - resting)
"""
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    small_faults, kept_kb = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                    check=True, cwd=ROOT, env=env).stdout.split())
    assert small_faults <= 2 * 4_096  # 16 MB is 4,096 pages: faulted in once at most, not ten times
    assert kept_kb < 8 * 1024  # the 64 MB went back to the system
