"""Keep glibc from handing freed tensor memory back to the kernel between steps on the CPU.

A CPU training step (or forward pass) allocates and frees the same large buffers every time.
glibc serves blocks above its mmap threshold (at most 32 MiB, adjusted on the fly) with fresh
mmap() calls and trims the heap's free top above its trim threshold, so every step faults its
buffers back in page by page: ~300,000 minor page faults a step for tf_efficientnet_lite0 at 160 px,
batch 32, a quarter of the CPU spent in the kernel. Raising both thresholds keeps that memory in
the process: 1.6x the images/s of a training epoch there, 1.75x of batched inference, for 6-15% more
peak memory (`benchmarks/cpu_allocator.py` measures it side by side).

The app needs a bound as well as the speed: Gradio answers requests from a pool of up to 40
threads, glibc gives each thread an arena of its own (up to 8 per core), and with a 1 GiB trim
threshold each arena kept what decoding a large upload had used. After three floods of 40 uploads
of 24 MP the app grew from 0.74 GB to 2.1 GB (2.9x its resting size; 1.6-2.2x even with glibc's
defaults, whose peak was 3.9 GB). `keep_freed_memory(serving=True)` caps the arenas at 2 (the
app's concurrent predictions), keeps at most 64 MiB free at the top of each heap, serves blocks up
to 32 MiB (glibc's own dynamic maximum, above a prediction's buffers) from the heap, and hands the
free memory back (malloc_trim) whenever malloc holds more than 128 MiB of it, which a prediction's
reused buffers never make it hold. After the same floods the app is back at its resting size
(0.73-0.75 GB, a 1.65 GB peak), with no page faults per prediction: 1.48x the images/s of glibc's
defaults on the app's TTA pair (benchmarks/app_memory.py, benchmarks/cpu_allocator.py; results in
benchmarks/results/).

The same can be had without code from the environment (GLIBC_TUNABLES=glibc.malloc.mmap_threshold=
...:glibc.malloc.trim_threshold=..., or LD_PRELOAD of tcmalloc); a process started that way keeps
what it was given.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# mallopt() parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

# Above the large activations of a CPU fine-tune (lite0 at 160 px, batch 32: 32 x 96 x 80 x 80 floats,
# 79 MB), so those are reused rather than mapped afresh.
MMAP_THRESHOLD = 256 << 20
# How much free memory at the top of the heap the process may keep instead of returning it.
TRIM_THRESHOLD = 1 << 30
# Serving (the app): bounded, see the module's docstring.
SERVING_MMAP_THRESHOLD = 32 << 20
SERVING_TRIM_THRESHOLD = 64 << 20
SERVING_ARENA_MAX = 2
SERVING_TRIM_HELD = 128 << 20  # free memory (bytes) malloc may hold before it is handed back
SERVING_TRIM_EVERY_S = 1.0


def configured_elsewhere() -> bool:
    """True when the environment already chose the allocator or its thresholds: theirs wins."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return ("glibc.malloc." in tunables or "MALLOC_MMAP_THRESHOLD_" in os.environ
            or "MALLOC_TRIM_THRESHOLD_" in os.environ or "malloc" in os.environ.get("LD_PRELOAD", ""))


def keep_freed_memory(device: torch.device | None = None, serving: bool = False) -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); True if they are now raised.

    `device`: where the work runs; nothing is done for a GPU (None: the caller cannot tell yet, as
    the app before its models load). `serving`: the bounded setting of a server answering from many
    threads (the app), called before its threads start. A no-op (False) too where the C library is
    not glibc (macOS, Windows, musl) or the environment set the allocator up itself. It changes
    where memory comes from, never what is computed.
    """
    if device is not None and device.type != "cpu":
        return False
    if serving:
        applied = _raise_thresholds(SERVING_MMAP_THRESHOLD, SERVING_TRIM_THRESHOLD, SERVING_ARENA_MAX)
        if applied:
            _start_trimming(SERVING_TRIM_HELD, SERVING_TRIM_EVERY_S)
        return applied
    return _raise_thresholds(MMAP_THRESHOLD, TRIM_THRESHOLD)


class _MallInfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (2.33 and later), summed over every arena."""

    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache  # one thread per process
def _start_trimming(held: int, every: float) -> bool:
    """A thread that hands free memory back to the system (malloc_trim) whenever malloc holds more
    than `held` bytes free, looking every `every` seconds: after large uploads, not between
    predictions, whose buffers come and go at the same size. A trim costs milliseconds. False where
    glibc is older than 2.33 (no mallinfo2): the thresholds alone then bound the arenas."""
    libc = ctypes.CDLL(None)
    try:
        mallinfo2, malloc_trim = libc.mallinfo2, libc.malloc_trim
    except AttributeError:
        return False
    mallinfo2.restype = _MallInfo2
    malloc_trim.argtypes, malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int

    def trim() -> None:
        while True:
            time.sleep(every)
            if mallinfo2().fordblks > held:
                malloc_trim(0)

    threading.Thread(target=trim, name="classifier-malloc-trim", daemon=True).start()
    return True


@functools.cache  # process-wide, so once is enough
def _raise_thresholds(mmap_threshold: int, trim_threshold: int, arena_max: int | None = None) -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or configured_elsewhere():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already has loaded
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; setting either threshold also stops glibc adjusting it itself.
    applied = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
    if arena_max is not None:
        applied = applied and bool(mallopt(M_ARENA_MAX, arena_max))
    if applied:
        log.debug("glibc malloc: mmap threshold %d MiB, trim threshold %d MiB, arenas %s", mmap_threshold >> 20,
                  trim_threshold >> 20, arena_max or "glibc's")
    return applied
