"""Correctness soak of the distributed trainer: hundreds of steps of `nanoseek pretrain` (tiny preset, default batch
shape) under torchrun on CPU/gloo, several seeds, 2 and 4 processes, data parallel, expert parallel and DP × EP,
each compared step by step with one process (relative loss difference, bitwise equality, expert loads, final
parameters). Not a timing: run it under the shared CPU lock with one thread per process.

    python bench/dist_soak.py [--steps 300] [--seeds 0 1 2] [--cache soak.json] [--out docs/results/dist-soak.md]

The reference for a run with W processes is one process training on the same W batch chunks as micro-batches
(`--micro-batch 16/W`): the same arithmetic, so the losses must agree to every bit. For context each seed also
runs one process on the whole batch at once, which differs from the micro-batched one in the last bits of the
gradients; the MoE routing amplifies such differences, so that column shows how far two *correct* trainings
drift apart when their arithmetic is not the same.

Last line: runs=… steps=… worst_rel_diff=… bitwise_runs=… (bitwise_runs counts runs equal to their reference at
every step and in every final parameter).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import publish  # noqa: E402

BATCH = 16  # the default --batch-size; the tiny preset trains 64-token sequences
LAYOUTS = [(2, 1, "DP 2"), (2, 2, "EP 2"), (4, 1, "DP 4"), (4, 4, "EP 4"), (4, 2, "DP 2 × EP 2")]


def pretrain(out: Path, steps: int, seed: int, world: int = 1, ep: int = 1, micro: int = 0) -> None:
    """Run one training; raises if it fails or exceeds the time limit."""
    flags = ["--preset", "tiny", "--vocab-size", "300", "--steps", str(steps), "--seed", str(seed), "--threads", "1",
             "--eval-every", "50", "--eval-batches", "2", "--save-every", str(steps), "--dist-timeout", "120",
             "--out", str(out)] + (["--micro-batch", str(micro)] if micro else [])
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
                if world > 1 else [sys.executable])
    cmd = launcher + ["-m", "nanoseek", "pretrain", *flags] + (["--ep", str(ep)] if ep > 1 else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60 + 20 * steps)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")


def compare(ref: Path, run: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    a = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in a] == [r["step"] for r in b], (ref, run)
    rel = [abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b)]
    held = [abs(x["heldout_loss"] - y["heldout_loss"]) / abs(x["heldout_loss"]) for x, y in zip(a, b)
            if "heldout_loss" in x]
    sa, sb = (load_file(str(sorted((p / "checkpoints").iterdir())[-1] / "model.safetensors")) for p in (ref, run))
    param = max((sa[k] - sb[k]).abs().max().item() for k in sa)
    return {"steps": len(a), "worst_rel": max(rel), "worst_heldout_rel": max(held, default=0.0),
            "first_over": next((x["step"] for x, r in zip(a, rel) if r > 1e-5), None),
            "bitwise_steps": sum(x["loss"] == y["loss"] for x, y in zip(a, b)),
            "loads_equal": sum(x["maxvio"] == y["maxvio"] for x, y in zip(a, b)), "param_max_abs": param,
            "final_loss": b[-1]["loss"]}


def soak_seed(seed: int, steps: int, tmp: Path) -> list[dict]:
    """Every layout of one seed against its one-process reference; one result per layout."""
    base = tmp / f"seed{seed}"
    refs = {w: base / f"one-micro{BATCH // w}" for w in (2, 4)}
    for w, path in refs.items():
        pretrain(path, steps, seed, micro=BATCH // w)
    whole = base / "one-whole"
    pretrain(whole, steps, seed)
    out = []
    for world, ep, name in LAYOUTS:
        pretrain(base / f"w{world}-ep{ep}", steps, seed, world, ep)
        r = {"seed": seed, "layout": name, **compare(refs[world], base / f"w{world}-ep{ep}")}
        r["context"] = compare(whole, base / f"w{world}-ep{ep}")
        out.append(r)
        print(json.dumps(r), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cache", default=None, help="JSON file of finished seeds: a seed found there is not rerun "
                                                   "(lets the soak run one seed at a time)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cache = Path(args.cache) if args.cache else None
    done = json.loads(cache.read_text()) if cache and cache.exists() else {}
    for seed in args.seeds:
        key = f"{seed}/{args.steps}"
        if key not in done:
            with tempfile.TemporaryDirectory() as d:
                done[key] = soak_seed(seed, args.steps, Path(d))
            if cache:
                cache.write_text(json.dumps(done, indent=1))
    results = [r for seed in args.seeds for r in done[f"{seed}/{args.steps}"]]
    rows = [f"| {r['seed']} | {r['layout']} | {r['steps']} | {r['bitwise_steps']} | {r['worst_rel']:.1e} | "
            f"{r['worst_heldout_rel']:.1e} | {r['loads_equal']} | {r['param_max_abs']:.1e} | {r['final_loss']:.4f} | "
            f"{r['context']['worst_rel']:.1e} (first > 1e-5: step {r['context']['first_over']}) |" for r in results]
    worst = max(r["worst_rel"] for r in results)
    bitwise = sum(r["bitwise_steps"] == r["steps"] and r["param_max_abs"] == 0 for r in results)
    lines = [f"`nanoseek pretrain --preset tiny --vocab-size 300 --steps {args.steps}` (batch {BATCH} × 64 tokens, "
             "embedded corpus), torchrun on CPU/gloo with one thread per process; each run against one process "
             f"training on the same batch chunks as micro-batches (`--micro-batch {BATCH}/W`).", "",
             "| seed | layout | steps | bit-identical steps | worst relative loss diff | worst held-out diff | "
             "steps with equal expert loads | final parameters max abs diff | final loss | vs one process on the "
             "whole batch (context) |", "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
             f"Criterion: relative loss difference ≤ 1e-5 at every step: {'met' if worst <= 1e-5 else 'NOT met'} "
             f"(worst {worst:.1e}); {bitwise} of {len(results)} runs bit-identical at every step and in every "
             "final parameter."]
    headline = f"runs={len(results)} steps={args.steps} worst_rel_diff={worst:.1e} bitwise_runs={bitwise}"
    publish("bench/dist_soak.py", lines, headline, args.out)


if __name__ == "__main__":
    main()
