"""Loss parity of bf16 mixed precision: the 160-step `small` pretraining run in fp32 and in bf16, same data and seed.

The run is bench/pretrain_ablation.py's aux-free base model (V3 balancing, MTP on, 160 steps × 16 × 512 tokens on
the embedded corpus), trained twice through the real CLI with --precision fp32 and --precision bf16. Parity
means the final train loss and the final held-out loss agree within 0.5% (relative). Finished runs are reused;
unfinished ones resume.

    python bench/precision_parity.py --runs runs/precision --out docs/results/precision-parity.md

Last line: fp32_loss=… bf16_loss=… loss_diff=… fp32_heldout=… bf16_heldout=… heldout_diff=… bf16_speedup=…
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanoseek.checkpoint import step_dirs  # noqa: E402
from nanoseek.report import plot_runs, summary  # noqa: E402
from nanoseek.stages.common import read_metrics  # noqa: E402

TOLERANCE = 0.005


def train(precision: str, args) -> Path:
    out = Path(args.runs) / precision
    if step_dirs(out) and step_dirs(out)[-1].name == f"step_{args.steps:06d}":
        return out
    cmd = [sys.executable, "-m", "nanoseek", "pretrain", "--preset", "small", "--out", str(out),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--eval-every", str(args.eval_every),
           "--eval-batches", "8", "--save-every", str(args.save_every), "--threads", str(args.threads),
           "--precision", precision]
    if step_dirs(out):
        cmd = [sys.executable, "-m", "nanoseek", "pretrain", "--out", str(out), "--resume"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--save-every", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", default="runs/precision")
    ap.add_argument("--out", default="docs/results/precision-parity.md")
    args = ap.parse_args()
    dirs = {p: train(p, args) for p in ("fp32", "bf16")}
    rows = {p: {**summary(d), "final_loss": read_metrics(d / "metrics.jsonl")[-1]["loss"]} for p, d in dirs.items()}
    diff = {k: rows["bf16"][k] / rows["fp32"][k] - 1 for k in ("final_loss", "loss_tail", "heldout_loss")}
    speedup = rows["bf16"]["tokens_per_s"] / rows["fp32"]["tokens_per_s"]
    figs = Path(args.out).with_suffix("")
    labels = {"fp32": dirs["fp32"], "bf16 mixed precision": dirs["bf16"]}
    plots = [plot_runs(labels, "loss", figs / "train_loss.png", "small, 160 steps: training loss", 5),
             plot_runs(labels, "heldout_loss", figs / "heldout_loss.png", "small, 160 steps: held-out loss")]
    write_markdown(args, rows, diff, speedup, plots)
    print(f"fp32_loss={rows['fp32']['final_loss']:.4f} bf16_loss={rows['bf16']['final_loss']:.4f} "
          f"loss_diff={diff['final_loss']:+.4f} fp32_heldout={rows['fp32']['heldout_loss']:.4f} "
          f"bf16_heldout={rows['bf16']['heldout_loss']:.4f} heldout_diff={diff['heldout_loss']:+.4f} "
          f"bf16_speedup={speedup:.2f}")


def write_markdown(args, rows: dict, diff: dict, speedup: float, plots: list[Path]) -> None:
    out = Path(args.out)
    ok = all(abs(diff[k]) <= TOLERANCE for k in ("final_loss", "heldout_loss"))
    lines = [
        "# bf16 mixed precision: loss parity with fp32 (`small` preset)", "",
        f"Command: `python {' '.join(sys.argv)}`", "",
        f"Two runs of {args.steps} steps × {args.batch_size} sequences × 512 tokens "
        f"({rows['fp32'].get('tokens', 0):,} tokens) on the embedded corpus, same seed and data order, "
        f"{args.threads} CPU threads: the aux-free base model of docs/results/pretrain.md in fp32 and in bf16 "
        "(fp32 master weights, gradients and AdamW state; bf16 compute copies of the weights and bf16 activations).",
        "",
        "| precision | final train loss | train loss, last 20% of steps | held-out loss | held-out MTP loss | "
        "tokens/s (mean) |", "|---|---|---|---|---|---|",
    ]
    for p, s in rows.items():
        lines.append(f"| {p} | {s['final_loss']:.4f} | {s['loss_tail']:.4f} | {s['heldout_loss']:.4f} | "
                     f"{s['heldout_mtp_loss']:.4f} | {s['tokens_per_s']:.0f} |")
    lines += [
        f"| bf16 / fp32 − 1 | {diff['final_loss']:+.2%} | {diff['loss_tail']:+.2%} | {diff['heldout_loss']:+.2%} | "
        f"| {speedup:.2f}× |", "",
        f"Parity (|final train loss and held-out loss difference| ≤ {TOLERANCE:.1%}): {'met' if ok else 'NOT met'}.",
        "",
    ]
    lines += [f"![{p.stem}]({p.relative_to(out.parent)})" for p in plots] + [""]
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
