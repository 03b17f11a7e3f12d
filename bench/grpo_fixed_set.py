"""GRPO on a fixed handful of training problems: the rung between "a trivially learnable behaviour" and "fresh
problems every step". If the rollout accuracy on the same N problems does not rise, the update is broken; if it
rises here but not on fresh problems, the update works and what it learns does not transfer across problems in
the steps given.

    python bench/grpo_fixed_set.py --init runs/speedrun/coldstart --out runs/fixed --problems 8 --lr 1e-4

Prints the rollout accuracy per 5 steps; every step's metrics are in OUT/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from nanoseek import load  # noqa: E402
from nanoseek.metrics import read_metrics  # noqa: E402
from nanoseek.stages.grpo import GRPOConfig, train  # noqa: E402
from nanoseek.tasks import get_task  # noqa: E402


class FixedStream:
    """A problem stream that hands out the same problems in a cycle (what train() asks of a stream)."""

    def __init__(self, problems):
        self.problems, self.seen, self.repeats, self.exhausted, self.i = problems, set(), 0, False, 0

    def take(self, n):
        out = [self.problems[(self.i + j) % len(self.problems)] for j in range(n)]
        self.i += n
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="example: python bench/grpo_fixed_set.py "
                                 "--init runs/speedrun/coldstart --out runs/fixed --problems 8 --lr 1e-4")
    ap.add_argument("--init", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--task-args", default=json.dumps({"min_terms": 4, "max_terms": 4, "min_digits": 1,
                                                       "max_digits": 1}))
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=112)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    task = get_task("chain_sum", **json.loads(a.task_args))
    problems = task.problems(5, a.problems, split="train")
    task.stream = lambda seed, split, **kw: FixedStream(problems)
    model, tokenizer = load(a.init)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = GRPOConfig(init=a.init, task="chain_sum", out=str(out), steps=a.steps, prompts_per_step=a.problems,
                     group_size=8, max_new_tokens=a.max_new_tokens, lr=a.lr, eval_every=0, save_every=10**6,
                     temperature=a.temperature)
    train(model, tokenizer, task, cfg, out)
    acc = [r["accuracy"] for r in read_metrics(out / "metrics.jsonl") if "accuracy" in r]
    print("rollout accuracy per 5 steps:", [round(sum(acc[i:i + 5]) / len(acc[i:i + 5]), 2)
                                            for i in range(0, len(acc), 5)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
