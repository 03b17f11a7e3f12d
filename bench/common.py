"""Shared set-up of the benchmarks that race nanoseek against transformers in one process.

Both models get the same configuration (a preset with MTP off, since transformers has no MTP training path),
the same weights (ours exported with save_hf and loaded by from_pretrained) and the same batches. Steps
alternate between the two so that machine noise hits both alike; the median step is reported. Achieved
model FLOP/s (stats.train_flops_per_token × tokens/s) is divided by this machine's matmul peak, measured in
the same run with the same thread count.
"""

from __future__ import annotations

import argparse
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
from nanoseek.runtime import matmul_peak  # noqa: E402
from nanoseek.stats import model_stats  # noqa: E402


def parse_args(doc: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10, help="measured steps per model (after 2 warm-up steps)")
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


def report(title: str, args, cfg, impl: str, rel: float, times: dict, headline_keys: tuple) -> None:
    """Print the table and the key=value headline; write the markdown record if --out."""
    peak = matmul_peak("cpu", seconds=3.0)
    n_tok = args.batch * args.seq_len
    flops = model_stats(cfg, args.seq_len)["train_flops_per_token"]
    tps = {k: n_tok / statistics.median(v) for k, v in times.items()}
    lines = [
        f"config: preset {args.preset} (MTP off), {model_stats(cfg)['active_params'] / 1e6:.2f}M active params, "
        f"batch {args.batch}×{args.seq_len}, fp32, {args.threads} threads; transformers {impl}",
        f"logit check before timing: max rel diff {rel:.1e}",
        f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s; model FLOPs/token {flops / 1e6:.2f} M",
        "", "| model | median step (ms) | tokens/s | model GFLOP/s | peak fraction |", "|---|---|---|---|---|",
    ]
    for name, label in (("ours", "nanoseek"), ("hf", "transformers")):
        med = statistics.median(times[name])
        lines.append(f"| {label} | {med * 1e3:.1f} | {tps[name]:.0f} | {tps[name] * flops / 1e9:.1f} | "
                     f"{tps[name] * flops / peak:.3f} |")
    values = {"tokens_per_s": f"{tps['ours']:.0f}", "transformers_tokens_per_s": f"{tps['hf']:.0f}",
              "ratio": f"{tps['ours'] / tps['hf']:.2f}", "peak_fraction": f"{tps['ours'] * flops / peak:.3f}"}
    headline = " ".join(f"{k}={values[k]}" for k in headline_keys)
    machine = [f"Machine: {platform.machine()}, torch {torch.__version__}, {_cpu_name()}", ""]
    publish(title, lines, headline, args.out, preamble=machine)


def publish(title: str, lines: list[str], headline: str, out: str | None, preamble: list[str] = ()) -> None:
    """Print the result lines and the key=value headline (the last line, DESIGN.md §5); write the markdown
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
