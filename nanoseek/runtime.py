"""Where and how fast we run: device choice, threads, precision context, measured matmul peak."""

from __future__ import annotations

import contextlib
import os
import time

import torch


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA device is available")
    return torch.device(name)


def set_threads(n: int = 0) -> int:
    """Use n CPU threads (0: all cores this process may use)."""
    n = n or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return n


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 on CPU (no native bf16 speed there, reference cpu-environment §3)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


_PEAK: dict[str, float] = {}


def matmul_peak(device: torch.device | str = "cpu", seconds: float = 1.0) -> float:
    """Best measured FLOP/s of square matmuls (fp32 on CPU, bf16 on CUDA), measured once per process."""
    device = torch.device(device)
    key = f"{device}-{torch.get_num_threads()}"
    if key in _PEAK:
        return _PEAK[key]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    best = 0.0
    for n in ((1024, 2048) if device.type == "cpu" else (4096, 8192)):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        _sync(device)
        t0, reps = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds / 2:
            a @ b
            reps += 1
        _sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    _PEAK[key] = best
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
