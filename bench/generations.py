"""DeepSeek V3 vs V3.2 vs V4 at equal training compute, on the CPU-sized presets small, small-v32, small-v4.

Each preset pretrains through the real CLI on the embedded corpus for the same number of training FLOPs
(stats.train_flops_per_token × tokens, MTP included): `small` runs --steps steps, the others as many steps as
that budget buys them. Reported per run: held-out loss (final evaluation), training tokens/s (mean over the
last 20% of steps), wall-clock seconds, and the KV cache per token of a 512-token context — from stats (bf16)
and measured on the trained model's own cache objects in bf16 (V4's includes the open windows' compressor
inputs). The speed numbers only mean something when nothing else runs: use the exclusive lock.

    flock -x /work/cpu.lock python bench/generations.py --steps 60 --runs runs/generations \\
        --out docs/results/generations.md

Last line: v3_heldout=… v32_heldout=… v4_heldout=… v32_speed_ratio=… v4_speed_ratio=… v32_kv_ratio=… v4_kv_ratio=…
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nanoseek  # noqa: E402
from nanoseek import get_preset  # noqa: E402
from nanoseek.checkpoint import step_dirs  # noqa: E402
from nanoseek.report import line_plot, summary  # noqa: E402
from nanoseek.stages.common import read_metrics  # noqa: E402
from nanoseek.stats import kv_cache_bytes, train_flops_per_token  # noqa: E402
from common import publish  # noqa: E402

RUNS = {"V3 (small)": "small", "V3.2 (small-v32)": "small-v32", "V4 (small-v4)": "small-v4"}
SEQ = 512


def train(preset: str, steps: int, args) -> tuple[Path, float]:
    out = Path(args.runs) / preset
    if step_dirs(out) and step_dirs(out)[-1].name == f"step_{steps:06d}":
        return out, float("nan")  # finished earlier: reused, not re-timed
    cmd = [sys.executable, "-m", "nanoseek", "pretrain", "--preset", preset, "--out", str(out), "--steps", str(steps),
           "--batch-size", str(args.batch_size), "--eval-every", str(args.eval_every), "--eval-batches", "8",
           "--save-every", str(steps)]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return out, time.perf_counter() - t0


@torch.no_grad()
def measured_cache_bytes(run: Path) -> float:
    """Bytes per token of the trained model's decoding cache for one 512-token row, in bf16."""
    model, _ = nanoseek.load(run)
    return model.to(torch.bfloat16).cache_bytes_per_token(SEQ)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="steps of `small`; the others match its FLOPs")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--runs", default="runs/generations")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    flops = {p: train_flops_per_token(get_preset(p), SEQ) for p in RUNS.values()}
    budget = args.steps * args.batch_size * SEQ * flops["small"]
    rows, curves = {}, {}
    for label, preset in RUNS.items():
        steps = round(budget / (args.batch_size * SEQ * flops[preset]))
        run, wall = train(preset, steps, args)
        s = summary(run)
        rows[label] = dict(s, preset=preset, steps=steps, wall=wall, flops=flops[preset],
                           kv_stats=kv_cache_bytes(get_preset(preset), SEQ)["kv_cache_bytes_per_token"],
                           kv_measured=measured_cache_bytes(run))
        evals = [r for r in read_metrics(run / "metrics.jsonl") if "heldout_loss" in r]
        curves[label] = ([r["tokens"] * flops[preset] / 1e12 for r in evals], [r["heldout_loss"] for r in evals])
    out = Path(args.out) if args.out else None
    plot = line_plot(curves, (out.with_suffix("") if out else Path(args.runs)) / "heldout.png",
                     "Held-out loss at equal training compute", xlabel="training TFLOP", ylabel="held-out loss")
    base = rows["V3 (small)"]
    lines = [f"Budget: {budget / 1e12:.1f} training TFLOP per run (`small`: {args.steps} steps × {args.batch_size} × "
             f"{SEQ} tokens), fp32, 2 threads, the embedded corpus; V3.2 warms its indexer up with dense attention "
             "for the first 10% of its steps.", "",
             "| run | steps | MFLOP/token | held-out loss | held-out MTP loss | tokens/s | vs V3 | wall s | "
             "KV B/token (stats, bf16) | KV B/token (measured cache, bf16) |", "|---" * 10 + "|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['steps']} | {r['flops'] / 1e6:.1f} | {r['heldout_loss']:.4f} | "
                     f"{r['heldout_mtp_loss']:.4f} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s'] / base['tokens_per_s']:.2f} | {r['wall']:.0f} | {r['kv_stats']:,} | "
                     f"{r['kv_measured']:,.0f} |")
    lines += ["", f"![held-out loss]({plot.relative_to(out.parent) if out else plot})"]
    v32, v4 = rows["V3.2 (small-v32)"], rows["V4 (small-v4)"]
    headline = (f"v3_heldout={base['heldout_loss']:.4f} v32_heldout={v32['heldout_loss']:.4f} "
                f"v4_heldout={v4['heldout_loss']:.4f} v32_speed_ratio={v32['tokens_per_s'] / base['tokens_per_s']:.2f} "
                f"v4_speed_ratio={v4['tokens_per_s'] / base['tokens_per_s']:.2f} "
                f"v32_kv_ratio={v32['kv_measured'] / base['kv_measured']:.2f} "
                f"v4_kv_ratio={v4['kv_measured'] / base['kv_measured']:.2f}")
    publish("bench/generations.py: V3 vs V3.2 vs V4 at equal compute", lines, headline, args.out)


if __name__ == "__main__":
    main()
