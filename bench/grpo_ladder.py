"""The GRPO sanity ladder on a CPU: a trivially learnable behaviour first, then a real task's held-out accuracy.

1. base: a `small` model pretrained for --base-steps on worked solutions of the task's TRAINING split only
   (`corpus` worked-solution writer; held-out questions excluded by content), then --sft-minutes of cold-start
   SFT on other worked solutions of that split, with the real CLI.
2. rung 1: reward "the completion starts with one of these characters", chosen so the base does it ~20% of
   the time; GRPO must reach ≥ 95% within tens of steps. Logged: steps to 90% / 95%.
3. rung 2: `nanoseek grpo` on the task for --rl-minutes per run: fp32 rollouts, then bf16 rollouts without a
   correction, with routing replay and with truncated importance sampling (the rollout-vs-update mismatch
   measured both ways). Held-out pass@1 (k = 4, T = 0.6, top-p 0.95, --eval-n problems of the held-out split)
   of the base and of every final checkpoint via `nanoseek eval`; the lr, temperature and problem ids used
   are in each run's metrics.jsonl.

    python bench/grpo_ladder.py --runs runs/ladder --out docs/results/grpo-ladder.md [--threads 1]

Finished stages are reused. Last line: base_pass1=… fp32_pass1=… bf16_pass1=… replay_pass1=… tis_pass1=…
rung1_steps_to_95=…
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from nanoseek import corpus  # noqa: E402
from nanoseek.checkpoint import step_dirs  # noqa: E402
from nanoseek.stages.common import read_metrics  # noqa: E402

VARIANTS = {  # rung 2: name -> extra grpo flags
    "fp32": [],
    "bf16": ["--precision", "fp32", "--rollout-dtype", "bf16"],
    "replay": ["--precision", "fp32", "--rollout-dtype", "bf16", "--routing-replay"],
    "tis": ["--precision", "fp32", "--rollout-dtype", "bf16", "--tis-cap", "2"],
}


def nanoseek(*args: str, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "nanoseek", *args]
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, check=True, capture_output=capture, text=True)
    return done.stdout if capture else ""


def make_base(args, root: Path) -> Path:
    """Pretrain on worked solutions, then a short cold-start SFT on them (loss on the completion only, as R1's
    cold start does): the pretraining budget a CPU run affords mostly learns the ~60-token preamble."""
    base, cold = root / "base", root / "cold-start"
    options = json.loads(args.task_args)
    if not step_dirs(base):
        docs = corpus._family_docs(args.task, 0, args.base_docs, "train", corpus._NoBar(), **options)
        (root / "data.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        nanoseek("pretrain", "--preset", "small", "--data", str(root / "data.jsonl"), "--out", str(base), "--steps",
                 str(args.base_steps), "--batch-size", "16", "--seq-len", "256", "--vocab-size", "1024",
                 "--eval-every", "0", "--save-every", str(args.base_steps), "--threads", str(args.threads))
    if not args.sft_minutes:
        return base
    if not step_dirs(cold):
        docs = corpus._family_docs(args.task, corpus._STRIDE, args.base_docs, "train", corpus._NoBar(), **options)
        rows = [dict(zip(("prompt", "completion"), d.split("Assistant: <think>", 1))) for d in docs]
        (root / "sft.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"] + "Assistant: <think>",
                                                            "completion": r["completion"]}) + "\n" for r in rows))
        nanoseek("sft", "--init", str(base), "--data", str(root / "sft.jsonl"), "--out", str(cold), "--epochs", "1",
                 "--batch-size", "8", "--lr", "1e-3", "--max-seconds", str(args.sft_minutes * 60),
                 "--threads", str(args.threads))
    return cold


def rung1(args, base: Path, root: Path, fresh: bool) -> dict:
    """The starts-with behaviour, in process (it is not a CLI task): on the base, and (fresh=True) on a freshly
    initialised `small` model with the base's tokenizer, whose first-token distribution is broad enough to
    pick characters at ~20% (a trained base may put most of its mass on one leading character)."""
    from nanoseek import Transformer, load
    from nanoseek.stages.grpo import GRPOConfig, train
    from nanoseek.tasks.families import StartsWithTask

    out = root / ("rung1-fresh" if fresh else "rung1")
    if not (out / "metrics.jsonl").exists():
        torch.set_num_threads(args.threads)
        model, tok = load(base)
        if fresh:
            torch.manual_seed(0)
            model = Transformer(model.cfg)
        task = StartsWithTask.at_rate(model, tok, 0.2)
        cfg = GRPOConfig(init=str(base), task="starts_with", out=str(out), steps=args.rung1_steps, prompts_per_step=8,
                         group_size=8, max_new_tokens=1, lr=args.rung1_lr, eval_every=0, save_every=10**9,
                         algo="grpo")
        train(model, tok, task, cfg, out)
        (out / "chars.json").write_text(json.dumps({"chars": task.chars, "base_rate": task.base_rate}) + "\n")
    acc = [r["accuracy"] for r in read_metrics(out / "metrics.jsonl")]
    first = lambda level: next((i + 1 for i in range(len(acc)) if sum(acc[i:i + 3]) / 3 >= level), None)  # noqa
    return {"acc": acc, "to_90": first(0.9), "to_95": first(0.95), **json.loads((out / "chars.json").read_text())}


def rung2(args, base: Path, root: Path) -> dict:
    task = ["--task", args.task, "--task-args", args.task_args]
    runs = {}
    for name, flags in VARIANTS.items():
        if name not in args.variants.split(","):
            continue
        out = root / f"rl-{name}"
        if not step_dirs(out):
            minutes = args.rl_minutes if name == "fp32" else args.correction_minutes
            nanoseek("grpo", "--init", str(base), "--out", str(out), "--steps", "100000", "--max-seconds",
                     str(minutes * 60), "--eval-every", str(args.eval_every), "--eval-n", "64",
                     "--temperature", str(args.temperature), "--lr", str(args.lr), "--warmup-steps", "5",
                     "--threads", str(args.threads), *task, *flags, *args.extra.split())
        runs[name] = out
    evals = {}
    for name, ckpt in [("base", base)] + list(runs.items()):
        cache = root / f"eval-{name}.json"
        if not cache.exists():
            cache.write_text(nanoseek("eval", "--ckpt", str(ckpt), "--n", str(args.eval_n), "--k", "4", "--json",
                                      *task, capture=True))
        evals[name] = json.loads(cache.read_text())
    return {"runs": runs, "evals": evals}


def _mean(records: list[dict], key: str, last: int | None = None) -> float:
    vals = [r[key] for r in records if r.get(key) is not None]
    vals = vals[-last:] if last else vals
    return sum(vals) / len(vals) if vals else float("nan")


def report(args, r1: dict, r2: dict) -> None:
    lines = ["# The GRPO sanity ladder (CPU)", "", f"Command: `python {' '.join(sys.argv)}`", "",
             f"Base: `small` pretrained {args.base_steps} steps on {args.base_docs} worked `{args.task}` "
             f"{args.task_args} solutions of the training split only, then {args.sft_minutes:g} minutes of "
             "cold-start SFT on other worked solutions of that split.", "",
             "## Rung 1: a rewarded first character", "",
             "| model | rewarded characters | base rate | 90% (3-step mean) at step | 95% at step | steps run |",
             "|---|---|---|---|---|---|"]
    for name, r in r1.items():
        label = "the base" if name == "base" else "a fresh `small` (random init)"
        chars = repr(r["chars"]) if len(r["chars"]) <= 12 else f"{len(r['chars'])} characters"
        lines.append(f"| {label} | {chars} | {r['base_rate']:.1%} | {r['to_90']} | {r['to_95']} | {len(r['acc'])} |")
    lines += ["",
             "## Rung 2: held-out accuracy on the task",
             f"{args.rl_minutes:g} minutes of `nanoseek grpo` for fp32, {args.correction_minutes:g} for each bf16 run; "
             f"T = {args.temperature}, lr {args.lr} after 5 "
             "warm-up steps. pass@1: k = 4 samples at T = 0.6, top-p 0.95, over "
             f"{args.eval_n} held-out problems.", "",
             "| run | steps | pass@1 | cons@4 | greedy held-out (64) step 0 → end | reward first 5 → last 5 | "
             "logp gap (abs mean) | routing mismatch | KL to init (last) |", "|---|---|---|---|---|---|---|---|---|"]
    base = r2["evals"]["base"]
    lines.append(f"| base | 0 | {base['accuracy']:.1%} | {base['cons_at_k']:.1%} | | | | | |")
    for name, out in r2["runs"].items():
        every = read_metrics(out / "metrics.jsonl")
        recs = [r for r in every if r["step"] > 0 and "reward" in r]
        held = [r["heldout_accuracy"] for r in every if "heldout_accuracy" in r]
        e = r2["evals"][name]
        lines.append(f"| {name} | {len(recs)} | {e['accuracy']:.1%} | {e['cons_at_k']:.1%} | "
                     f"{held[0]:.1%} → {held[-1]:.1%} | "
                     f"{_mean(recs[:5], 'reward'):.2f} → {_mean(recs, 'reward', 5):.2f} | "
                     f"{_mean(recs, 'logp_gap_abs_mean'):.2e} | {_mean(recs, 'routing_mismatch'):.2%} | "
                     f"{recs[-1].get('kl', float('nan')):.4f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(" ".join([f"base_pass1={base['accuracy']:.3f}"] +
                   [f"{n}_pass1={r2['evals'][n]['accuracy']:.3f}" for n in r2["runs"]] +
                   [f"rung1_steps_to_95={r1['fresh']['to_95']}"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="runs/ladder")
    ap.add_argument("--out", default="docs/results/grpo-ladder.md")
    ap.add_argument("--task", default="chain_sum")
    ap.add_argument("--task-args", default=json.dumps({"min_terms": 2, "max_terms": 3, "min_digits": 1,
                                                       "max_digits": 1}))
    ap.add_argument("--base-steps", type=int, default=120)
    ap.add_argument("--base-docs", type=int, default=12000)
    ap.add_argument("--sft-minutes", type=float, default=5.0, help="cold-start SFT wall time (0: none)")
    ap.add_argument("--rung1-steps", type=int, default=40)
    ap.add_argument("--rung1-lr", type=float, default=1e-3)
    ap.add_argument("--rl-minutes", type=float, default=5.0, help="wall time of the fp32 run")
    ap.add_argument("--correction-minutes", type=float, default=3.0, help="wall time of each bf16 run")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--extra", default="", help="extra grpo flags for every run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stage", default="all", help="base, rung1, rung2 or all")
    args = ap.parse_args()
    root = Path(args.runs)
    root.mkdir(parents=True, exist_ok=True)
    base = make_base(args, root)
    if args.stage == "base":
        return
    r1 = {"base": rung1(args, base, root, fresh=False), "fresh": rung1(args, base, root, fresh=True)}
    if args.stage == "rung1":
        print(r1)
        return
    report(args, r1, rung2(args, base, root))


if __name__ == "__main__":
    main()
