"""Pretraining evidence on the `small` preset: balancing ablation, MTP on/off, and the base model's curve.

Four runs of the same budget (steps × batch × sequence length), each through the real CLI:
  aux-free (V3: bias update γ + sequence-wise loss α=1e-4, MTP on) — also the speedrun-budget base model
  aux-loss (a batch-level auxiliary loss only, α=0.01), none (no balancing), and aux-free with MTP off.
Then plots from their metrics.jsonl and a markdown summary. Finished runs are reused; unfinished ones resume.

    python bench/pretrain_ablation.py --steps 160 --runs runs/evidence --out docs/results/pretrain.md

Last line: aux_free_maxvio=… aux_loss_maxvio=… none_maxvio=… aux_free_heldout=… mtp_off_heldout=…
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

RUNS = {
    "aux-free": [],
    "aux-loss": ["--balance", "aux-loss"],
    "none": ["--balance", "none"],
    "mtp-off": ["--model-overrides", json.dumps({"n_mtp_layers": 0})],
    "aux-free-fast": ["--bias-update-speed", "0.01"],  # γ sized for a 160-step run rather than 14.8T tokens
}


def train(name: str, extra: list[str], args) -> Path:
    out = Path(args.runs) / name
    if step_dirs(out) and step_dirs(out)[-1].name == f"step_{args.steps:06d}":
        return out
    cmd = [sys.executable, "-m", "nanoseek", "pretrain", "--preset", "small", "--out", str(out),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--eval-every", str(args.eval_every),
           "--eval-batches", "8", "--save-every", str(args.save_every), *extra]
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
    ap.add_argument("--runs", default="runs/evidence")
    ap.add_argument("--out", default="docs/results/pretrain.md")
    args = ap.parse_args()
    dirs = {name: train(name, extra, args) for name, extra in RUNS.items()}
    figs = Path(args.out).with_suffix("")
    balance = {"aux-free (γ=0.001)": dirs["aux-free"], "aux-free (γ=0.01)": dirs["aux-free-fast"],
               "aux-loss (α=0.01)": dirs["aux-loss"], "none": dirs["none"]}
    plots = [
        plot_runs(balance, "maxvio", figs / "maxvio.png", "Expert-load MaxVio per batch (mean over MoE layers)", 10),
        plot_runs(balance, "heldout_loss", figs / "balance_heldout.png", "Held-out loss by balancing strategy"),
        plot_runs({"MTP on": dirs["aux-free"], "MTP off": dirs["mtp-off"]}, "heldout_loss",
                  figs / "mtp_heldout.png", "Held-out next-token loss, MTP on vs off"),
        plot_runs({"loss": dirs["aux-free"]}, "loss", figs / "base_loss.png", "small base model: training loss", 5),
    ]
    rows = {name: summary(d) for name, d in dirs.items()}
    write_markdown(args, rows, plots)
    r = rows
    print(f"aux_free_maxvio={r['aux-free']['maxvio_tail']:.3f} aux_loss_maxvio={r['aux-loss']['maxvio_tail']:.3f} "
          f"none_maxvio={r['none']['maxvio_tail']:.3f} aux_free_heldout={r['aux-free']['heldout_loss']:.4f} "
          f"mtp_off_heldout={r['mtp-off']['heldout_loss']:.4f}")


def write_markdown(args, rows: dict, plots: list[Path]) -> None:
    out = Path(args.out)
    lines = [
        "# Pretraining evidence (`small` preset)", "",
        f"Command: `python {' '.join(sys.argv)}`", "",
        f"Budget per run: {args.steps} steps × {args.batch_size} sequences × 512 tokens "
        f"= {rows['aux-free'].get('tokens', 0):,} tokens, fp32 on 2 CPU threads, the embedded corpus.", "",
        "| run | held-out loss | held-out MTP loss | MaxVio, last 20% of steps | held-out MaxVio |",
        "|---|---|---|---|---|",
    ]
    for name, s in rows.items():
        lines.append(f"| {name} | {s['heldout_loss']:.4f} | {s['heldout_mtp_loss']:.4f} | {s['maxvio_tail']:.3f} | "
                     f"{s['heldout_maxvio']:.3f} |")
    lines += ["", "Throughput is not reported here: other work shared the 2 cores during these runs (losses are "
              "unaffected; speed is measured by bench/train_step.py).", ""]
    lines += [f"![{p.stem}]({p.relative_to(out.parent)})" for p in plots] + [""]
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
