"""Where and how the work runs: the device, mixed precision, memory layout and CPU threads.

Training, evaluation and prediction all ask these questions; the answers live here once.
"""

from __future__ import annotations

import os

import torch

from classifier import distributed


def pick_device(requested: str | torch.device = "auto") -> torch.device:
    """The device a run asked for; "auto": this process's GPU under torchrun, else Apple's, else the CPU."""
    if str(requested) != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", distributed.local_rank())
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The dtype to autocast to for --amp `amp` on `device`, or None for full precision."""
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp in ("auto", "bf16") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16" or (amp == "auto" and device.type == "mps"):
        return torch.float16
    return None  # CPU "auto": fp32, which is what most CPUs do fastest for training


def bf16_is_fast(device: str | torch.device) -> bool:
    """bf16 pays on CUDA GPUs that have it and on CPUs with bf16 instructions (AVX512-BF16, AMX)."""
    kind = pick_device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    if kind != "cpu":
        return False  # MPS and others: "auto" mixed precision (fp16) is what they do fast
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def channels_last_pays(device: torch.device) -> bool:
    """Whether convolutions run faster NHWC (channels_last) here: with oneDNN on the CPU (1.0-2.2x
    the training images/s of NCHW on a 2-core CPU, benchmarks/step_speed.py) and cuDNN on CUDA."""
    return device.type in ("cpu", "cuda")


def use_every_core(device: torch.device) -> None:
    """One process on the CPU uses every core, unless OMP_NUM_THREADS says otherwise (to share the
    machine with another job, say). Under torchrun each process keeps torch's own share."""
    if device.type == "cpu" and distributed.world_size() == 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
