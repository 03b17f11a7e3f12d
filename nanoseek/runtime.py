"""Where and how fast we run: device choice, threads, the precision policy, measured matmul peak.

`resolve(device, precision)` is the one place a stage decides both: every command that runs a model takes
`--device auto|cpu|cuda` and `--precision auto|fp32|bf16` and passes them here. `auto` precision is bf16 on
CUDA; on a CPU it is bf16 only where a short probe at the model's own matmul sizes finds bf16 faster than fp32 by
a margin (AMX / AVX512-BF16 machines): 1.5× for training and for decoding 512 rows or more, 2× for decoding fewer;
fp32 elsewhere (on AVX2-only CPUs bf16 is emulated and ~20× slower).

bf16 is mixed precision (Micikevicius et al. 2018, arXiv 1710.03740; DeepSeek-V3 report §3.3): the parameters,
their gradients and the optimizer state stay fp32 ("master weights"); `prepare_for_training` gives a forward
that runs on bf16 copies of the matmul weights, so activations, matmuls and their backward run in bf16, while
the model keeps fp32 where precision matters (RMSNorm statistics, softmax statistics, router scores and the
selection bias, cross-entropy; see model.py and losses.py). `prepare_inference` casts a model for the engine.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .options import DEVICES, PRECISIONS  # declared once, with the flags

# How much faster bf16 matmuls must be than fp32 in the probe for `auto` to pick bf16 on a CPU. Decoding needs a
# wide margin: a bf16 call has a fixed cost (~40-50 µs per F.linear on an AMX Xeon), which dominates few-row steps.
# A training step multiplies thousands of rows and gains whenever its matmuls do: on an AMD EPYC (Zen 4, no AMX)
# a 2.02× probe went with a 1.71× faster bf16 step (docs/results/precision.md), so 2.0 sat on the edge there.
MIN_SPEEDUP = 2.0
MIN_SPEEDUP_TRAINING = 1.5
# Decoding needs the wider margin only while that fixed cost matters. From LARGE_ROWS rows decoded together (an
# evaluation's n × k, a sampling batch) its matmuls are training-sized and the training margin applies: on the
# Zen 4 host an evaluation decoded 1.21-1.32× faster in bf16 from 128 to 800 rows at probes of 2.03-2.2×, while
# probes of 1.95× had sent the speedrun's evaluations to fp32 (docs/results/eval_precision.md). On the AMX Xeon
# such row counts probe at 4× and more, so nothing changes there.
LARGE_ROWS = 512


@dataclass(frozen=True)
class Runtime:
    """The device and compute precision a stage runs with, and the probe figures behind the choice."""

    device: torch.device
    precision: str  # "fp32" or "bf16"
    probe: dict = field(default_factory=dict)
    requested: str = ""  # what was asked for ("auto", "fp32", "bf16")

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def autocast(self):
        """bf16 autocast for code that runs an unprepared fp32 model (training uses `prepare_for_training`)."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def describe(self) -> dict:
        """JSON-able record for run.json and metrics."""
        out = {"device": str(self.device), "precision": self.precision, "requested": self.requested or self.precision}
        return {**out, **({"probe": self.probe} if self.probe else {})}


def resolve(device: str = "auto", precision: str = "auto", dims=None, probe=None, rows: int = 1024,
            training: bool = False) -> Runtime:
    """The Runtime for `--device` and `--precision` (ValueError naming the flag for a bad value).

    dims: a ModelConfig (or a list of (M, K, N) matmul shapes) the CPU probe measures; default: `small`'s.
    rows: the rows (tokens) each matmul multiplies: 1024 for training and prefill; a decoding stage passes the
    sequences it decodes together, because on a CPU bf16 GEMMs of a few rows are slower than fp32 ones
    (measured on an AMX Xeon: 0.16× at 1 row, 1.0× at 32, 2.4× at 128, 4.5× at 800).
    probe: a function shapes -> probe dict replacing `bf16_probe` (tests inject one instead of patching).
    training: the stage trains (pretrain, SFT, GRPO): `auto` then needs MIN_SPEEDUP_TRAINING, and so does decoding
    of LARGE_ROWS rows or more; decoding fewer needs MIN_SPEEDUP.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dev = pick_device(device)
    if dev.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        if precision == "bf16" and not ok:
            raise ValueError("--precision bf16: this GPU has no bf16 support; use --precision fp32")
        return Runtime(dev, "fp32" if precision == "fp32" or not ok else "bf16", requested=precision)
    if precision == "fp32":
        return Runtime(dev, "fp32", requested=precision)
    figures = (probe or bf16_probe)(probe_shapes(dims, max(1, rows)))
    if precision == "bf16":
        if figures["speedup"] < 1.0 and not figures.get("native_bf16"):
            _warn_once(f"--precision bf16: this CPU has no native bf16 matmuls; the probe measured bf16 "
                       f"{1 / figures['speedup']:.3g}× slower than fp32 ({figures['bf16_gflops']} vs "
                       f"{figures['fp32_gflops']} GFLOP/s); --precision auto would choose fp32")
        return Runtime(dev, "bf16", figures, precision)
    needed = MIN_SPEEDUP_TRAINING if training or rows >= LARGE_ROWS else MIN_SPEEDUP
    return Runtime(dev, "bf16" if figures["speedup"] >= needed else "fp32", figures, precision)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:  # a cache of what was said, not a mode: the figures are cached per process too
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def probe_shapes(dims=None, tokens: int = 1024) -> tuple[tuple[int, int, int], ...]:
    """(M, K, N) of the matmuls that dominate a model: dense FFN, routed expert, query up-projection."""
    if dims is None:
        from .config import get_preset

        dims = get_preset("small")
    if not hasattr(dims, "dim"):
        return tuple(tuple(s) for s in dims)
    q_in = dims.q_lora_rank or dims.dim
    shapes = {(tokens, dims.dim, dims.inter_dim), (tokens, q_in, dims.n_heads * dims.qk_head_dim)}
    if dims.n_routed_experts:
        shapes.add((tokens, dims.dim, dims.moe_inter_dim))
    return tuple(sorted(shapes))


_PROBE: dict[tuple, dict] = {}


def bf16_probe(shapes=None, seconds: float = 0.15) -> dict:
    """fp32 vs bf16 matmul GFLOP/s on this CPU at the threads in use, summed over `shapes` (cached per process).

    Each (shape, dtype) runs for ~seconds / (2·len(shapes)) after one warm-up call (oneDNN builds its kernel on
    first use) and counts its fastest call; the speedup is the fp32 time over the bf16 time for the same work."""
    shapes = probe_shapes() if shapes is None else tuple(tuple(s) for s in shapes)
    key = (torch.get_num_threads(), shapes)
    if key not in _PROBE:
        t = {torch.float32: 0.0, torch.bfloat16: 0.0}
        flops = 0.0
        for M, K, N in shapes:
            flops += 2.0 * M * K * N
            for dtype in t:
                t[dtype] += _seconds_per_matmul(M, K, N, dtype, seconds / (2 * len(shapes)))
        f32, b16 = flops / t[torch.float32] / 1e9, flops / t[torch.bfloat16] / 1e9
        _PROBE[key] = {"fp32_gflops": _sig(f32), "bf16_gflops": _sig(b16), "speedup": _sig(b16 / f32),
                       "shapes": [list(s) for s in shapes], "threads": key[0], "native_bf16": native_bf16()}
    return _PROBE[key]


def native_bf16() -> bool:
    """Whether this x86 CPU has bf16 matmul instructions (AMX-BF16 or AVX512-BF16), which oneDNN uses."""
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_amx_tile_supported",
                                                                        "_is_avx512_bf16_supported"))


def _sig(x: float) -> float:
    return float(f"{x:.3g}")


def _seconds_per_matmul(M: int, K: int, N: int, dtype: torch.dtype, budget: float) -> float:
    """The fastest of the calls that fit the budget: other work on the machine only ever adds time, and a mean
    let one hiccup flip `auto` (an evaluation of the speedrun once ran in fp32 at 800 rows, where bf16 is ~4×)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(M, K, generator=gen).to(dtype), torch.randn(K, N, generator=gen).to(dtype)
    a @ b  # warm-up
    start, best = time.perf_counter(), float("inf")
    while best == float("inf") or time.perf_counter() - start < budget:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


# ----------------------------------------------------------------------------- models in a precision


def keeps_fp32(module: nn.Module) -> bool:
    """Whether a module's own weights stay fp32 in every precision: modules marking `keep_fp32_weights` (the
    router, whose scores and selection must not move with rounding; norms; FP8 layers, which quantise from the
    fp32 master) and the embedding (its rows start the fp32 residual stream; its sparse gradient sums many rows)."""
    return getattr(module, "keep_fp32_weights", False) or isinstance(module, nn.Embedding)


def fp32_params(model: nn.Module) -> set[int]:
    """ids of the parameters that stay fp32 in every precision (those of `keeps_fp32` modules)."""
    return {id(p) for m in model.modules() if keeps_fp32(m) for p in m.parameters(recurse=False)}


class MixedPrecision:
    """A callable with the model's forward signature that runs it on `dtype` copies of the weights.

    The copies are made inside the autograd graph (`p.to(dtype)`), so gradients flow back into the fp32
    parameters: `.grad` accumulates in fp32 over micro-batches, and clipping, the optimizer, checkpoints and
    the state dict see only fp32 masters. Casting all weights costs one pass over the parameters per forward
    (~9M values in `small`), far less than autocast's per-op casts of activations."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.model, self.dtype = model, dtype
        keep = fp32_params(model)
        self.names = [n for n, p in model.named_parameters() if id(p) not in keep and p.is_floating_point()]

    def compute_weights(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {n: params[n].to(self.dtype) for n in self.names}

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.model, self.compute_weights(), args, kwargs, strict=False)


def prepare_for_training(model: nn.Module, rt: Runtime):
    """The forward a training step calls: the model itself in fp32, a MixedPrecision view of it in bf16. A model
    sharded by FSDP2 (dist.parallelize) is returned as it is: FSDP makes its bf16 compute copies itself.

    The model's parameters stay fp32 either way (build the optimizer on `model`, save `model`)."""
    from torch.distributed.fsdp import FSDPModule

    return model if rt.precision == "fp32" or isinstance(model, FSDPModule) else MixedPrecision(model, rt.dtype)


def prepare_inference(model: nn.Module, rt: Runtime) -> nn.Module:
    """Cast a model in place for inference in `rt`'s precision and move it to `rt.device`.

    bf16: every weight except the router's, the norms' and the embedding table (see `fp32_params`), so
    inference computes exactly what the MixedPrecision training forward computes, fp32 residual stream included
    (Transformer.mixed_precision); the routing bias and the RoPE table stay fp32 (Gate._apply,
    Transformer._apply). The engine then allocates its latent cache in bf16 (the head's dtype)."""
    model.to(rt.device)
    keep = fp32_params(model)
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in keep and p.is_floating_point():
                p.data = p.data.to(rt.dtype)
    return model


# ----------------------------------------------------------------------------- devices, threads, peak


def pick_device(name: str = "auto") -> torch.device:
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ValueError(f"--device must be one of {', '.join(DEVICES)} (or cuda:N), got {name!r}")
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


_PEAK: dict[str, float] = {}


def matmul_peak(device: torch.device | str = "cpu", seconds: float = 1.0, dtype: torch.dtype | None = None) -> float:
    """Best measured FLOP/s of square matmuls in `dtype` (default: fp32 on CPU, bf16 on CUDA), once per process."""
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    key = f"{device}-{dtype}-{torch.get_num_threads()}"
    if key in _PEAK:
        return _PEAK[key]
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
