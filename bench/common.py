"""Shared set-up of the benchmarks that race nanoseek against transformers in one process.

Both models get the same configuration (a preset with MTP off, since transformers has no MTP training path),
the same weights (ours exported with save_hf and loaded by from_pretrained) and the same batches. Steps
alternate between the contenders so that machine noise hits all alike; the median step is reported. Achieved
model FLOP/s (stats.train_flops_per_token × tokens/s) is divided by this machine's matmul peak in the compute
precision (bf16 or fp32; fp32 where bf16 is emulated: runtime.peak_dtype), measured in the same run with the same
thread count.

`--precision` (default auto: runtime.resolve's choice from the hardware) sets both sides. In bf16 both keep fp32
weights and train in mixed precision: ours through runtime.prepare_for_training (bf16 compute copies of the
weights, bf16 activations), transformers through torch.autocast(bfloat16) — its documented CPU mixed-precision
path — with its defaults sdpa attention and grouped_mm experts. Ours in fp32 runs alongside, for bf16_speedup.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanoseek import Transformer, get_preset  # noqa: E402
from nanoseek.hf import save_hf  # noqa: E402
from nanoseek.runtime import matmul_peak, peak_dtype, resolve  # noqa: E402
from nanoseek.stats import model_stats  # noqa: E402


def parse_args(doc: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10, help="measured steps per model (after 2 warm-up steps)")
    ap.add_argument("--precision", default="auto", help="auto (measured), fp32 or bf16, for both libraries")
    ap.add_argument("--out", default=None, help="write a markdown record here (e.g. docs/results/NAME.md)")
    return ap.parse_args()


def twin_models(preset: str):
    """(ours, theirs, cfg, implementation note) with identical weights; a trained-looking routing bias."""
    from transformers import AutoModelForCausalLM

    cfg = get_preset(preset, n_mtp_layers=0)
    ours = Transformer(cfg)
    with torch.no_grad():
        for m in ours.modules():
            if hasattr(m, "score_func"):
                m.bias.normal_(0, 0.01)
    with tempfile.TemporaryDirectory() as d:
        save_hf(ours, d)
        theirs = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    impl = f"attn={theirs.config._attn_implementation} experts={getattr(theirs.config, '_experts_implementation', None)}"
    ours.train(), theirs.train()
    return ours, theirs, cfg, impl


def batches(cfg, batch: int, seq_len: int, n: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=gen) for _ in range(n)]


@torch.no_grad()
def logit_check(ours, theirs, tokens: torch.Tensor) -> float:
    a, b = ours(tokens), theirs(tokens).logits
    return ((a - b).abs().max() / b.abs().max()).item()


def race(steps: int, data: list[torch.Tensor], step_fns: dict) -> dict[str, list[float]]:
    """Alternate the step functions over the same batches; returns seconds per measured step."""
    times = {name: [] for name in step_fns}
    for step in range(steps + 2):
        seq = data[step % len(data)]
        for name, fn in step_fns.items():
            dt = fn(seq[:, :-1], seq[:, 1:])
            if step >= 2:
                times[name].append(dt)
    return times


def runtime(args, training: bool = False):
    """The precision of this run (runtime.resolve: from the hardware, timing nothing)."""
    return resolve("cpu", args.precision, training=training)


def hf_context(rt):
    """transformers' mixed precision on CPU: autocast to bf16 around the forward (fp32 otherwise)."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if rt.precision == "bf16" else contextlib.nullcontext()


def report(title: str, args, cfg, impl: str, rel: float, times: dict, rt) -> None:
    """Print the table and the key=value headline; write the markdown record if --out.

    times: seconds per step of "ours", "hf" (both in rt's precision) and, in bf16, "ours_fp32"."""
    peak = matmul_peak("cpu", seconds=3.0, dtype=rt.dtype)
    peak_in = "bf16" if peak_dtype("cpu", rt.dtype) == torch.bfloat16 else "fp32"  # fp32 where bf16 is emulated
    n_tok = args.batch * args.seq_len
    flops = model_stats(cfg, args.seq_len)["train_flops_per_token"]
    tps = {k: n_tok / statistics.median(v) for k, v in times.items()}
    fp32_tps = tps.get("ours_fp32", tps["ours"])
    lines = [
        f"config: preset {args.preset} (MTP off), {model_stats(cfg)['active_params'] / 1e6:.2f}M active params, "
        f"batch {args.batch}×{args.seq_len}, {args.threads} threads; transformers {impl}",
        f"precision: {rt.precision} (--precision {args.precision}: {rt.reason}); "
        f"transformers {'autocast bf16' if rt.precision == 'bf16' else 'fp32'}",
        f"logit check before timing (fp32): max rel diff {rel:.1e}",
        f"{peak_in} matmul peak: {peak / 1e9:.1f} GFLOP/s; model FLOPs/token {flops / 1e6:.2f} M",
        "", "| model | median step (ms) | tokens/s | model GFLOP/s | peak fraction |", "|---|---|---|---|---|",
    ]
    labels = {"ours": f"nanoseek {rt.precision}", "hf": f"transformers {rt.precision}", "ours_fp32": "nanoseek fp32"}
    for name, label in labels.items():
        if name in times:
            med = statistics.median(times[name])
            lines.append(f"| {label} | {med * 1e3:.1f} | {tps[name]:.0f} | {tps[name] * flops / 1e9:.1f} | "
                         f"{tps[name] * flops / peak:.3f} |")
    headline = (f"tokens_per_s={tps['ours']:.0f} transformers_tokens_per_s={tps['hf']:.0f} "
                f"ratio={tps['ours'] / tps['hf']:.2f} fp32_tokens_per_s={fp32_tps:.0f} "
                f"bf16_speedup={tps['ours'] / fp32_tps:.2f} peak_fraction={tps['ours'] * flops / peak:.3f}")
    machine = [f"Machine: {platform.machine()}, torch {torch.__version__}, {_cpu_name()}", ""]
    publish(title, lines, headline, args.out, preamble=machine)


def publish(title: str, lines: list[str], headline: str, out: str | None, preamble: list[str] = ()) -> None:
    """Print the result lines and the key=value headline (the last line, for scripts to read); write the markdown
    record with the command that produced it if `out`."""
    print("\n".join(lines))
    print(headline)
    if out:
        rec = [f"# {title} — {datetime.date.today()}", "", f"Command: `python {' '.join(sys.argv)}`", "",
               *preamble, *lines, "", "```", headline, "```", ""]
        Path(out).write_text("\n".join(rec))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
