"""Where and how fast we run: device choice, threads, the precision policy, measured matmul peak.

`resolve(device, precision)` is the one place a stage decides both: every command that runs a model takes
`--device auto|cpu|cuda` and `--precision auto|fp32|bf16` and passes them here. `auto` precision is bf16 on
CUDA; on a CPU it is bf16 only where a short probe finds bf16 matmuls clearly faster than fp32 (AMX / AVX512-BF16
machines), fp32 elsewhere (on AVX2-only CPUs bf16 is emulated and many times slower).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import torch

PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Runtime:
    """The device and compute precision a stage runs with, and the probe figures behind an `auto` choice."""

    device: torch.device
    precision: str  # "fp32" or "bf16"
    probe: dict = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def autocast(self):
        """The context in which a training forward runs its matmuls in the compute precision."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def describe(self) -> dict:
        """JSON-able record for run.json and metrics."""
        return {"device": str(self.device), "precision": self.precision, **({"probe": self.probe} if self.probe else {})}


def resolve(device: str = "auto", precision: str = "auto") -> Runtime:
    """The Runtime for `--device` and `--precision` (ValueError naming the flag for a bad value)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dev = pick_device(device)
    if precision != "auto":
        return Runtime(dev, precision)
    if dev.type == "cuda":
        return Runtime(dev, "bf16")
    probe = bf16_probe()
    return Runtime(dev, "bf16" if probe["speedup"] >= 2.0 else "fp32", probe)


_PROBE: dict[int, dict] = {}


def bf16_probe(n: int = 512, seconds: float = 0.1) -> dict:
    """fp32 vs bf16 matmul GFLOP/s on this CPU at threads in use (cached per process; ~0.2 s)."""
    key = torch.get_num_threads()
    if key not in _PROBE:
        rates = {}
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            a @ b  # warm-up (oneDNN builds its kernel on first use)
            t0, reps = time.perf_counter(), 0
            while time.perf_counter() - t0 < seconds / 2:
                a @ b
                reps += 1
            rates[dtype] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
        f32, b16 = rates[torch.float32], rates[torch.bfloat16]
        _PROBE[key] = {"fp32_gflops": round(f32, 1), "bf16_gflops": round(b16, 1), "speedup": round(b16 / f32, 2)}
    return _PROBE[key]


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
    """bf16 autocast on CUDA; plain fp32 on CPU. Kept for the pretraining stage until it takes a Runtime."""
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
