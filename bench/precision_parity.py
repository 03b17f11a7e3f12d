"""Loss parity of bf16 mixed precision: the 160-step `small` pretraining run in fp32 and in bf16, same data and seed.

The run is bench/pretrain_ablation.py's aux-free base model (V3 balancing, MTP on, 160 steps × 16 × 512 tokens on
the embedded corpus), trained twice through the real CLI with --precision fp32 and --precision bf16. Parity
means the final train loss and the final held-out loss agree within 0.5% (relative). With several `--seeds`
each seed trains both precisions, and the spread between the fp32 runs of different seeds shows how far two
correct trainings differ anyway. Finished runs are reused; unfinished ones resume.

    python bench/precision_parity.py --runs runs/precision --out docs/results/precision-parity.md [--seeds 0 1]
    python bench/precision_parity.py --preset small-v4 --runs runs/precision-v4 --out docs/results/precision-parity-v4.md

Last line (means over the seeds): fp32_loss=… bf16_loss=… loss_diff=… fp32_heldout=… bf16_heldout=…
heldout_diff=… bf16_speedup=… [fp32_seed_spread=…]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanoseek.checkpoint import step_dirs  # noqa: E402
from nanoseek.report import plot_runs, summary  # noqa: E402
from nanoseek.stages.common import read_metrics  # noqa: E402

TOLERANCE = 0.005


def train(precision: str, seed: int, args) -> Path:
    out = Path(args.runs) / (precision if seed == 0 else f"{precision}-seed{seed}")
    if step_dirs(out) and step_dirs(out)[-1].name == f"step_{args.steps:06d}":
        return out
    cmd = [sys.executable, "-m", "nanoseek", "pretrain", "--preset", args.preset, "--out", str(out),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--eval-every", str(args.eval_every),
           "--eval-batches", "8", "--save-every", str(args.save_every), "--threads", str(args.threads),
           "--precision", precision, "--seed", str(seed)]
    if step_dirs(out):
        cmd = [sys.executable, "-m", "nanoseek", "pretrain", "--out", str(out), "--resume"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", help="model preset (small-v4: V4's hyper-connection streams)")
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--save-every", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", default="runs/precision")
    ap.add_argument("--out", default="docs/results/precision-parity.md")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="model-initialisation seeds (--seed)")
    args = ap.parse_args()
    dirs = {(p, seed): train(p, seed, args) for seed in args.seeds for p in ("fp32", "bf16")}
    rows = {key: {**summary(d), "final_loss": read_metrics(d / "metrics.jsonl")[-1]["loss"],
                  "threads": json.loads((d / "run.json").read_text())["threads"]} for key, d in dirs.items()}
    keys = ("final_loss", "loss_tail", "heldout_loss")
    diffs = {seed: {k: rows["bf16", seed][k] / rows["fp32", seed][k] - 1 for k in keys} for seed in args.seeds}
    mean = {k: sum(d[k] for d in diffs.values()) / len(diffs) for k in keys}
    ratios = [rows["bf16", s]["tokens_per_s"] / rows["fp32", s]["tokens_per_s"] for s in args.seeds]  # same threads
    speedup = sum(ratios) / len(ratios)
    fp32 = [rows["fp32", s] for s in args.seeds]  # how far two correct fp32 trainings differ by seed alone
    spread = {k: max(r[k] for r in fp32) / min(r[k] for r in fp32) - 1 for k in keys} if len(fp32) > 1 else None
    figs = Path(args.out).with_suffix("")
    labels = {f"{'fp32' if p == 'fp32' else 'bf16 mixed precision'}, seed {s}": d for (p, s), d in dirs.items()}
    plots = [plot_runs(labels, "loss", figs / "train_loss.png", f"{args.preset}, {args.steps} steps: training loss", 5),
             plot_runs(labels, "heldout_loss", figs / "heldout_loss.png", f"{args.preset}, {args.steps} steps: held-out loss")]
    write_markdown(args, rows, diffs, mean, spread, speedup, plots)
    avg = {(p, k): sum(rows[p, s][k] for s in args.seeds) / len(args.seeds) for p in ("fp32", "bf16") for k in keys}
    print(f"fp32_loss={avg['fp32', 'final_loss']:.4f} bf16_loss={avg['bf16', 'final_loss']:.4f} "
          f"loss_diff={mean['final_loss']:+.4f} fp32_heldout={avg['fp32', 'heldout_loss']:.4f} "
          f"bf16_heldout={avg['bf16', 'heldout_loss']:.4f} heldout_diff={mean['heldout_loss']:+.4f} "
          f"bf16_speedup={speedup:.2f}" + (f" fp32_seed_spread={spread['heldout_loss']:.4f}" if spread else ""))


def write_markdown(args, rows: dict, diffs: dict, mean: dict, spread: dict | None, speedup: float,
                   plots: list[Path]) -> None:
    out = Path(args.out)
    ok = all(abs(d[k]) <= TOLERANCE for d in diffs.values() for k in ("final_loss", "heldout_loss"))
    first = rows["fp32", args.seeds[0]]
    lines = [
        f"# bf16 mixed precision: loss parity with fp32 (`{args.preset}` preset)", "",
        f"Command: `python {' '.join(sys.argv)}`", "",
        f"Runs of {args.steps} steps × {args.batch_size} sequences × 512 tokens ({first.get('tokens', 0):,} tokens) "
        f"on the embedded corpus, for each seed ({', '.join(map(str, args.seeds))}) one "
        "fp32 and one bf16 run with the same initialisation and data order: the aux-free base model of "
        "docs/results/pretrain.md (bf16: fp32 master weights, gradients, AdamW state and residual stream; bf16 "
        "compute copies of the weights and bf16 matmul inputs).", "",
        "| seed | precision | final train loss | train loss, last 20% of steps | held-out loss | held-out MTP loss | "
        "threads | tokens/s (mean) |", "|---|---|---|---|---|---|---|---|",
    ]
    for seed in args.seeds:
        for p in ("fp32", "bf16"):
            s = rows[p, seed]
            lines.append(f"| {seed} | {p} | {s['final_loss']:.4f} | {s['loss_tail']:.4f} | {s['heldout_loss']:.4f} | "
                         f"{s['heldout_mtp_loss']:.4f} | {s['threads']} | {s['tokens_per_s']:.0f} |")
        d = diffs[seed]
        lines.append(f"| {seed} | bf16 / fp32 − 1 | {d['final_loss']:+.2%} | {d['loss_tail']:+.2%} | "
                     f"{d['heldout_loss']:+.2%} | | | |")
    if len(args.seeds) > 1:
        lines.append(f"| mean | bf16 / fp32 − 1 | {mean['final_loss']:+.2%} | {mean['loss_tail']:+.2%} | "
                     f"{mean['heldout_loss']:+.2%} | | | {speedup:.2f}× |")
        lines.append(f"| spread | fp32 seed vs seed (max / min − 1) | {spread['final_loss']:.2%} | "
                     f"{spread['loss_tail']:.2%} | {spread['heldout_loss']:.2%} | | | |")
    lines += ["", f"Parity (|final train loss and held-out loss difference| ≤ {TOLERANCE:.1%} for every seed): "
              f"{'met' if ok else 'NOT met'}. bf16 tokens/s over fp32 (mean of each seed's ratio): {speedup:.2f}×.", ""]
    lines += [f"![{p.stem}]({p.relative_to(out.parent)})" for p in plots] + [""]
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
