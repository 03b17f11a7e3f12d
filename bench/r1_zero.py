"""R1-Zero on a CPU: GRPO vs Dr. GRPO vs DAPO-style settings from the same `small` base model, same wall time.

Each run is the real CLI (`nanoseek grpo --algo …`) for --minutes of RL (a wall-time stop: the warm-up is
--warmup-steps long whatever --steps says), with held-out greedy pass@1 logged every 10 steps; then
`nanoseek eval` (R1 protocol: 4 samples at temperature 0.6, top-p 0.95) on the base and on each final
checkpoint, over --eval-n distinct held-out problems (held out by a hash of the question, so no training
source holds them), plots from metrics.jsonl, and docs/results/r1-zero.md. Finished runs are reused.

    python bench/r1_zero.py --base runs/rlbase --task chain_sum --minutes 10 --out docs/results/r1-zero.md

Last line: base_pass1=… grpo_pass1=… dr_grpo_pass1=… dapo_pass1=…
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanoseek.checkpoint import step_dirs  # noqa: E402
from nanoseek.report import bar_plot, plot_runs, summary  # noqa: E402
from nanoseek.stages.common import read_metrics  # noqa: E402

ALGOS = ("grpo", "dr-grpo", "dapo")


def nanoseek(*args: str, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "nanoseek", *args]
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, check=True, capture_output=capture, text=True)
    return done.stdout if capture else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="runs/rlbase")
    ap.add_argument("--task", default="chain_sum")
    # 2-3 one-digit terms: 4,200 questions, ~400 of them held out (2 one-digit terms had only 200 in all)
    ap.add_argument("--task-args", default=json.dumps({"min_terms": 2, "max_terms": 3, "min_digits": 1,
                                                       "max_digits": 1}))
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--runs", default="runs/r1zero")
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--out", default="docs/results/r1-zero.md")
    ap.add_argument("--extra", default="", help="extra grpo flags for every run, e.g. '--lr 2e-4'")
    args = ap.parse_args()
    task = ["--task", args.task, "--task-args", args.task_args]
    dirs = {}
    for algo in ALGOS:
        out = Path(args.runs) / algo
        if not step_dirs(out):
            nanoseek("grpo", "--init", args.base, "--out", str(out), "--algo", algo, "--steps", "100000",
                     "--max-seconds", str(args.minutes * 60), "--eval-every", "10", *task, *args.extra.split())
        dirs[algo] = out
    evals = {}
    for name, ckpt in [("base", args.base)] + [(a, str(d)) for a, d in dirs.items()]:
        cache = Path(args.runs) / f"eval-{name}.json"
        if not cache.exists():
            cache.write_text(nanoseek("eval", "--ckpt", ckpt, "--n", str(args.eval_n), "--k", "4", "--json", *task,
                                      capture=True))
        evals[name] = json.loads(cache.read_text())
    write_report(args, dirs, evals)


def write_report(args, dirs: dict, evals: dict) -> None:
    out = Path(args.out)
    figs = out.with_suffix("")
    plots = [plot_runs(dirs, "heldout_accuracy", figs / "heldout_accuracy.png", "Held-out greedy pass@1"),
             plot_runs(dirs, "reward", figs / "reward.png", "Reward (rollouts)", window=5),
             plot_runs(dirs, "accuracy", figs / "accuracy.png", "Rollout accuracy", window=5),
             plot_runs(dirs, "response_len", figs / "response_len.png", "Mean response length (tokens)", window=5),
             plot_runs(dirs, "kl", figs / "kl.png", "KL to the initial policy", window=5),
             plot_runs(dirs, "frac_zero_std", figs / "frac_zero_std.png", "Groups with equal rewards", window=5),
             bar_plot({k: v["accuracy"] for k, v in evals.items()}, figs / "pass1.png",
                      "Held-out pass@1 (4 samples, T=0.6)")]
    first = {a: next((r["heldout_accuracy"] for r in read_metrics(d / "metrics.jsonl") if "heldout_accuracy" in r),
                     float("nan")) for a, d in dirs.items()}
    used = {a: json.loads((d / "run.json").read_text()) for a, d in dirs.items()}
    lines = ["# R1-Zero on a CPU: GRPO, Dr. GRPO, DAPO from the `small` base model", "",
             f"Command: `python {' '.join(sys.argv)}`", "",
             f"Base: `{args.base}`; task `{args.task}` {args.task_args}; {args.minutes:g} minutes of RL per run; "
             "held-out problems are chosen by a hash of the question and excluded from every training source. "
             "Settings as used (from each run.json): " + "; ".join(
                 f"{a}: lr {u['lr']} after {u['warmup_steps']} warm-up steps, T {u['temperature']}, "
                 f"{u['prompts_per_step']}×{u['group_size']} samples, β {u['effective']['beta']}"
                 for a, u in used.items()) + ".", "",
             "| run | RL steps | held-out pass@1 (4 samples, T=0.6) | cons@4 | well-formed | response tokens "
             "| greedy pass@1 at step 0 → end | KL to init (end) |", "|---|---|---|---|---|---|---|---|"]
    base = evals["base"]
    lines.append(f"| base | 0 | {base['accuracy']:.1%} | {base['cons_at_k']:.1%} | {base['format']:.0%} | "
                 f"{base['mean_response_tokens']:.0f} | | |")
    for algo, d in dirs.items():
        e, s = evals[algo], summary(d)
        last = next((r["heldout_accuracy"] for r in reversed(read_metrics(d / "metrics.jsonl"))
                     if "heldout_accuracy" in r), float("nan"))
        kl = next((r["kl"] for r in reversed(read_metrics(d / "metrics.jsonl")) if "kl" in r), float("nan"))
        lines.append(f"| {algo} | {s['steps']} | {e['accuracy']:.1%} | {e['cons_at_k']:.1%} | {e['format']:.0%} | "
                     f"{e['mean_response_tokens']:.0f} | {first[algo]:.1%} → {last:.1%} | {kl:.4f} |")
    lines += [""] + [f"![{p.stem}]({p.relative_to(out.parent)})" for p in plots] + [""]
    out.write_text("\n".join(lines))
    print(" ".join([f"base_pass1={base['accuracy']:.3f}"] +
                   [f"{a.replace('-', '_')}_pass1={evals[a]['accuracy']:.3f}" for a in dirs]))


if __name__ == "__main__":
    main()
