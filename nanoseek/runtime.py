"""Where and how fast we run: device choice, threads, the precision policy, measured matmul peak.

`resolve(device, precision)` is the one place a stage decides both: every command that runs a model takes
`--device auto|cpu|cuda` and `--precision auto|fp32|bf16` and passes them here. `auto` precision is a policy decided
from what the hardware is, never from a stopwatch, so one kind of host always makes the same choice: bf16 on a CUDA
GPU with bf16 support; on a CPU, bf16 only where it multiplies bf16 natively (AMX or AVX512-BF16, as torch reports)
and the stage trains or decodes at least DECODE_BF16_ROWS rows together; fp32 elsewhere (on AVX2-only CPUs bf16 is
emulated, 20-100× slower). The choice and its reason are recorded in run.json and in every checkpoint, and a
stage that scores or trains a checkpoint (eval, sample, sft, grpo, distill) passes the precision the checkpoint
recorded (`recorded=`): under `auto` it computes in that precision wherever this hardware runs it natively, so
every evaluation of one run is computed one way. The interactive commands (generate, chat, serve) keep the
throughput rule: a one-row chat on an AMX Xeon runs ~6× slower in bf16, and nothing is scored there.

bf16 is mixed precision (Micikevicius et al. 2018, arXiv 1710.03740; DeepSeek-V3 report §3.3): the parameters,
their gradients and the optimizer state stay fp32 ("master weights"); `prepare_for_training` gives a forward
that runs on bf16 copies of the matmul weights, so activations, matmuls and their backward run in bf16, while
the model keeps fp32 where precision matters (RMSNorm statistics, softmax statistics, router scores and the
selection bias, cross-entropy; see model.py and losses.py). `prepare_inference` casts a model for the engine.
Both apply the policy to the model from outside, as torchtitan's converters do: which modules keep fp32 weights
(FP32_MODULES) and what the norms round to (`set_compute_dtype`); model.py holds only the math and the plain
attributes set here, and nanoseek/kernels.py the kernel choices that follow from a tensor's device and dtype.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .fp8 import FP8Experts, FP8Linear
from .model import Gate, RMSNorm
from .model_v4 import HyperConnection, HyperHead
from .options import DEVICES, PRECISIONS  # declared once, with the flags

# On a CPU with native bf16, decoding gains from bf16 only when each matmul multiplies enough rows: a bf16 call has a
# fixed cost (~40-50 µs per F.linear on an AMX Xeon) that dominates few-row steps. Recorded measurements: on the AMX
# Xeon bf16/fp32 GEMM throughput at the `small` shapes was 0.16× at 1 row, 1.0× at 32, 2.4× at 128 and 4.5× at 800
# (docs/precision.md); on the Zen 4 EPYC (AVX512-BF16, no AMX) an evaluation decoded at parity at 32 rows and
# 1.21-1.32× faster in bf16 from 128 to 800 rows (docs/results/eval_precision.md). 128 is the fewest rows at which
# both hosts gain. A training step multiplies thousands of rows and gains on both (Zen 4: a 1.5-1.7× faster step,
# docs/results/precision.md; AMX more), so training takes bf16 on any CPU with native bf16. These replace the
# probe margins (2× to decode, 1.5× to train) that a stopwatch compared against: near them, runs on one host probed
# 1.95× and 2.03× and evaluated the same checkpoints in different precisions.
DECODE_BF16_ROWS = 128
NATIVE_BF16 = ("AMX", "AVX512-BF16")  # what `cpu_isa` names for CPUs whose bf16 matmuls oneDNN runs natively


@dataclass(frozen=True)
class Runtime:
    """The device and compute precision a stage runs with, and why (recorded in run.json and in checkpoints)."""

    device: torch.device
    precision: str  # "fp32" or "bf16"
    reason: str = ""  # "requested", or the hardware rule `auto` applied (resolve)
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
        return {"device": str(self.device), "precision": self.precision, "requested": self.requested or self.precision,
                "reason": self.reason}

    def checkpoint_meta(self) -> dict:
        """What a checkpoint's meta.json records of the precision it was trained in."""
        return {"precision": self.precision, "precision_reason": self.reason}


def resolve(device: str = "auto", precision: str = "auto", rows: int = 1024, training: bool = False,
            recorded: str | None = None) -> Runtime:
    """The Runtime for `--device` and `--precision` (ValueError naming the flag for a bad value). Times nothing.

    rows: the rows (tokens) each matmul multiplies: 1024 stands for prefill; a decoding stage passes the sequences it
    decodes together (`eval`: n × k, `sample`: its batch, `generate`: the prompts, `chat`: 1, `serve`: --max-batch).
    training: the stage trains (pretrain, SFT, GRPO), whose matmuls multiply thousands of rows whatever `rows` says.
    recorded: the precision the loaded checkpoint was trained in (checkpoint.recorded_precision); under `auto` it
    wins over `rows` and `training`, except that bf16 falls back to fp32 where this hardware would emulate it.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dev = pick_device(device)
    if dev.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        if precision == "bf16" and not ok:
            raise ValueError("--precision bf16: this GPU has no bf16 support; use --precision fp32")
        if precision != "auto":
            return Runtime(dev, precision, "requested", precision)
        if recorded == "fp32" or (recorded == "bf16" and ok):
            return Runtime(dev, recorded, f"recorded by the checkpoint ({recorded})", precision)
        return Runtime(dev, "bf16", "CUDA GPU with bf16", precision) if ok else \
            Runtime(dev, "fp32", "CUDA GPU without bf16: fp32", precision)
    native, isa = native_bf16(), cpu_isa()
    if precision == "auto" and recorded in ("fp32", "bf16"):
        if recorded == "bf16" and not native:
            return Runtime(dev, "fp32", f"the checkpoint recorded bf16; CPU without native bf16 ({isa}): fp32",
                           precision)
        return Runtime(dev, recorded, f"recorded by the checkpoint ({recorded})", precision)
    if precision == "bf16" and not native:
        _warn_once(f"--precision bf16: this CPU has no native bf16 matmuls ({isa}), so bf16 is emulated and much "
                   f"slower than fp32; --precision auto would choose fp32")
        return Runtime(dev, "bf16", f"requested; emulated on this CPU ({isa})", precision)
    if precision != "auto":
        return Runtime(dev, precision, "requested", precision)
    if not native:
        return Runtime(dev, "fp32", f"CPU without native bf16 ({isa}): fp32", precision)
    cpu = f"CPU with {isa if isa in NATIVE_BF16 else 'native bf16'}"
    if training:
        return Runtime(dev, "bf16", f"{cpu}: training in bf16", precision)
    if rows >= DECODE_BF16_ROWS:
        return Runtime(dev, "bf16", f"{cpu}: {rows} rows per matmul, bf16 from {DECODE_BF16_ROWS}", precision)
    return Runtime(dev, "fp32", f"{cpu}: {rows} rows per matmul, fp32 below {DECODE_BF16_ROWS}", precision)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:  # a cache of what was said, not a mode: one line per process, not one per stage call
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def cpu_isa() -> str:
    """This CPU's best matmul instructions as torch reports them: "AMX", "AVX512-BF16" (both native bf16, which
    oneDNN uses), else torch's vector capability ("AVX2", "AVX512", "DEFAULT", ...)."""
    for name, check in zip(NATIVE_BF16, ("_is_amx_tile_supported", "_is_avx512_bf16_supported")):
        if getattr(torch.cpu, check, lambda: False)():
            return name
    return torch.backends.cpu.get_cpu_capability()


def native_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (AMX-BF16 or AVX512-BF16); without them bf16 is emulated."""
    return cpu_isa() in NATIVE_BF16


# ----------------------------------------------------------------------------- measuring (bench/, not decisions)


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
    A measurement for bench/eval_precision.py to print beside `auto`'s choice; `resolve` never calls it (on an
    AVX2 CPU it takes minutes at training sizes, and near a threshold it flipped the choice from run to run).

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


def _sig(x: float) -> float:
    return float(f"{x:.3g}")


def _seconds_per_matmul(M: int, K: int, N: int, dtype: torch.dtype, budget: float) -> float:
    """The fastest of the calls that fit the budget: other work on the machine only ever adds time (a mean once
    let one hiccup send an 800-row evaluation to fp32, back when this probe decided `auto`)."""
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


# The modules whose own weights stay fp32 in every precision, each for a numerical reason; under bf16 every other
# weight computes as a bf16 copy (the output head too: its logits feed an fp32 softmax, losses.py).
FP32_MODULES = (
    nn.Embedding,  # its rows start the fp32 residual stream (Transformer.embed_tokens); its gradient sums many rows
    RMSNorm,  # a weight whose gradient sums over every token; the statistics are fp32 anyway
    Gate,  # routing scores and the expert selection must not move with rounding (GateV4 too)
    HyperConnection, HyperHead,  # V4's mHC: coefficients and Sinkhorn's projection in fp32, from unrounded weights
    FP8Linear, FP8Experts,  # quantised from the fp32 master, not from a bf16 copy
)


def keeps_fp32(module: nn.Module) -> bool:
    """Whether a module's own weights stay fp32 in every precision (FP32_MODULES)."""
    return isinstance(module, FP32_MODULES)


def fp32_params(model: nn.Module) -> set[int]:
    """ids of the parameters that stay fp32 in every precision (those of `keeps_fp32` modules)."""
    return {id(p) for m in model.modules() if keeps_fp32(m) for p in m.parameters(recurse=False)}


def set_compute_dtype(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Make `model` compute in `dtype` around an fp32 residual stream, or (None) undo it: every RMSNorm rounds its
    fp32 result to `dtype` (RMSNorm.out_dtype), so the norm reading the stream hands `dtype` to the matmuls after
    it, while the embedding rows (the table stays fp32) and the blocks' outputs added to them stay fp32. With None
    a norm returns its input's dtype: an fp32 model, or one cast to a single dtype by hand."""
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.out_dtype = dtype


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
        self.norms = [m for m in model.modules() if isinstance(m, RMSNorm)]

    def compute_weights(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {n: params[n].to(self.dtype) for n in self.names}

    def __call__(self, *args, **kwargs):
        # The norms round to bf16 for this call only (set_compute_dtype's setting, undone after it): the same model
        # also runs as itself in fp32 (a GRPO run's fp32 rollouts). The backward, which runs after, never reads it.
        before = [m.out_dtype for m in self.norms]
        for m in self.norms:
            m.out_dtype = self.dtype
        try:
            return torch.func.functional_call(self.model, self.compute_weights(), args, kwargs, strict=False)
        finally:
            for m, dtype in zip(self.norms, before):
                m.out_dtype = dtype


def prepare_for_training(model: nn.Module, rt: Runtime):
    """The forward a training step calls: the model itself in fp32, a MixedPrecision view of it in bf16. A model
    sharded by FSDP2 (dist.parallelize) is returned as it is, its norms set to round to rt's dtype: FSDP makes its
    bf16 compute copies itself, so each of its forwards is a mixed-precision one.

    The model's parameters stay fp32 either way (build the optimizer on `model`, save `model`)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        set_compute_dtype(model, rt.dtype if rt.precision != "fp32" else None)
        return model
    return model if rt.precision == "fp32" else MixedPrecision(model, rt.dtype)


def prepare_inference(model: nn.Module, rt: Runtime) -> nn.Module:
    """Cast a model in place for inference in `rt`'s precision and move it to `rt.device`.

    bf16: every weight except those of FP32_MODULES (router, norms, embedding table, ...), and the norms round
    to bf16 (`set_compute_dtype`), so inference computes exactly what the MixedPrecision training forward
    computes, fp32 residual stream included. Buffers are not cast: the routing bias stays fp32, and the RoPE table
    is kept as fp32 bits in any case. The engine then allocates its latent cache in bf16 (the head's dtype)."""
    model.to(rt.device)
    keep = fp32_params(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(torch.float32 if id(p) in keep else rt.dtype)
    set_compute_dtype(model, rt.dtype if rt.precision != "fp32" else None)
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


def peak_dtype(device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype whose matmul peak MFU is measured against: the compute dtype (default: bf16 on CUDA, fp32 on a
    CPU), except bf16 on a CPU without native bf16, where it is fp32. Emulated bf16 is no peak worth dividing by:
    its square matmuls run ~50-100× slower than fp32's on an AVX2 host, timing them took over two minutes per
    process, and fp32 is the fastest that CPU multiplies at all."""
    if torch.device(device).type == "cuda":
        return dtype or torch.bfloat16
    return torch.bfloat16 if dtype == torch.bfloat16 and native_bf16() else torch.float32


def matmul_peak(device: torch.device | str = "cpu", seconds: float = 1.0, dtype: torch.dtype | None = None) -> float:
    """Best measured FLOP/s of square matmuls in `peak_dtype(device, dtype)`, once per process."""
    device = torch.device(device)
    dtype = peak_dtype(device, dtype)
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
