"""Keep glibc from handing freed tensor memory back to the kernel between steps on the CPU.

A CPU training step (or forward pass) allocates and frees the same large buffers every time.
glibc serves blocks above its mmap threshold (at most 32 MiB, adjusted on the fly) with fresh
mmap() calls and trims the heap's free top above its trim threshold, so every step faults its
buffers back in page by page: ~300,000 minor page faults a step for tf_efficientnet_lite0 at 160 px,
batch 32, a quarter of the CPU spent in the kernel. Raising both thresholds keeps that memory in
the process: 1.6x the images/s of a training epoch there, 1.75x of batched inference, for 6-15% more
peak memory (`benchmarks/cpu_allocator.py` measures it side by side).

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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# mallopt() parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Above the large activations of a CPU fine-tune (lite0 at 160 px, batch 32: 32 x 96 x 80 x 80 floats,
# 79 MB), so those are reused rather than mapped afresh.
MMAP_THRESHOLD = 256 << 20
# How much free memory at the top of the heap the process may keep instead of returning it.
TRIM_THRESHOLD = 1 << 30


def configured_elsewhere() -> bool:
    """True when the environment already chose the allocator or its thresholds: theirs wins."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return ("glibc.malloc." in tunables or "MALLOC_MMAP_THRESHOLD_" in os.environ
            or "MALLOC_TRIM_THRESHOLD_" in os.environ or "malloc" in os.environ.get("LD_PRELOAD", ""))


def keep_freed_memory(device: torch.device | None = None) -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); True if they are now raised.

    `device`: where the work runs; nothing is done for a GPU (None: the caller cannot tell yet, as
    the app before its models load). A no-op (False) too where the C library is not glibc (macOS,
    Windows, musl) or the environment set the allocator up itself. It changes where memory comes
    from, never what is computed.
    """
    if device is not None and device.type != "cpu":
        return False
    return _raise_thresholds()


@functools.cache  # process-wide, so once is enough
def _raise_thresholds() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or configured_elsewhere():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already has loaded
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; setting either threshold also stops glibc adjusting it itself.
    applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if applied:
        log.debug("glibc malloc: mmap threshold %d MiB, trim threshold %d MiB", MMAP_THRESHOLD >> 20,
                  TRIM_THRESHOLD >> 20)
    return applied
