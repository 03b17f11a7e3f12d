"""FP8 loss parity on the `small` preset: fp32 vs DeepSeek's blockwise FP8 vs tensorwise FP8, same data/seed/steps.

The fp32 run is the aux-free run of bench/pretrain_ablation.py (same flags), reused when present. The FP8 runs
add --fp8 [--fp8-recipe tensorwise]; with --bf16-moments a fourth run adds --optim-moments bf16 to blockwise
FP8 (V3's full low-precision recipe). Reported: relative difference of the smoothed final training loss (mean
of the last 20% of steps) and of the final held-out loss against fp32.

    python bench/fp8_parity.py --steps 160 --runs runs/evidence --out docs/results/fp8.md

Last line: blockwise_rel_train=… blockwise_rel_heldout=… tensorwise_rel_train=… tensorwise_rel_heldout=…
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_ablation import train  # noqa: E402

from nanoseek.report import plot_runs, summary  # noqa: E402

RUNS = {
    "aux-free": [],  # fp32: shared with the balancing ablation
    "fp8-blockwise": ["--fp8"],
    "fp8-tensorwise": ["--fp8", "--fp8-recipe", "tensorwise"],
}
BF16_MOMENTS = {"fp8-blockwise-bf16-moments": ["--fp8", "--optim-moments", "bf16"]}
LABELS = {"aux-free": "fp32", "fp8-blockwise": "FP8 blockwise (1×128, 128×128)",
          "fp8-tensorwise": "FP8 tensorwise", "fp8-blockwise-bf16-moments": "FP8 blockwise + BF16 moments"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--save-every", type=int, default=40)
    ap.add_argument("--runs", default="runs/evidence")
    ap.add_argument("--out", default="docs/results/fp8.md")
    ap.add_argument("--bf16-moments", action="store_true", help="also run blockwise FP8 with BF16 AdamW moments")
    args = ap.parse_args()
    runs = {**RUNS, **(BF16_MOMENTS if args.bf16_moments else {})}
    dirs = {name: train(name, extra, args) for name, extra in runs.items()}
    rows = {name: summary(d) for name, d in dirs.items()}
    base = rows["aux-free"]

    def rel(name, key):
        return (rows[name][key] - base[key]) / base[key]

    figs = Path(args.out).with_suffix("")
    labelled = {LABELS[k]: v for k, v in dirs.items()}
    plots = [plot_runs(labelled, "loss", figs / "train_loss.png", "Training loss (smoothed over 10 steps)", 10),
             plot_runs(labelled, "heldout_loss", figs / "heldout_loss.png", "Held-out loss")]
    lines = ["# FP8 training vs fp32 (`small` preset)", "", f"Command: `python {' '.join(sys.argv)}`", "",
             f"Each run: {args.steps} steps × {args.batch_size} × 512 tokens, same data order and seed; FP8 GEMMs "
             "emulated exactly on the CPU (quantise, FP8 operands, fp32 accumulation per 128-element block).", "",
             "| run | train loss (last 20%) | rel. to fp32 | held-out loss | rel. to fp32 |", "|---|---|---|---|---|"]
    for name, s in rows.items():
        lines.append(f"| {LABELS[name]} | {s['loss_tail']:.4f} | {rel(name, 'loss_tail'):+.3%} | "
                     f"{s['heldout_loss']:.4f} | {rel(name, 'heldout_loss'):+.3%} |")
    lines += [""] + [f"![{p.stem}]({p.relative_to(Path(args.out).parent)})" for p in plots] + [""]
    Path(args.out).write_text("\n".join(lines))
    print(f"blockwise_rel_train={rel('fp8-blockwise', 'loss_tail'):.5f} "
          f"blockwise_rel_heldout={rel('fp8-blockwise', 'heldout_loss'):.5f} "
          f"tensorwise_rel_train={rel('fp8-tensorwise', 'loss_tail'):.5f} "
          f"tensorwise_rel_heldout={rel('fp8-tensorwise', 'heldout_loss'):.5f}")


if __name__ == "__main__":
    main()
