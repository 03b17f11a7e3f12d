"""nanoseek eval: held-out pass@1 (mean over k samples), cons@k (majority vote) and response length on a task.

R1's protocol: k samples per problem at temperature 0.6 and top-p 0.95, accuracy averaged over the samples;
--temperature 0 gives greedy decoding. Only held-out problems are scored (chosen by content, see tasks/base.py);
--json prints the numbers and the problems scored. Several checkpoints are scored on the same problems in one
process (one line each; with --json one JSON object per line, in the order given).

    nanoseek eval --ckpt runs/rl --task chain_sum --n 200 --k 4 --json
    nanoseek eval --ckpt runs/coldstart runs/rl --task chain_sum --n 200 --k 4
"""

from __future__ import annotations

import inspect
import json
import sys
from dataclasses import dataclass

from .. import checkpoint as ckpt
from ..engine import Engine
from ..evaluation import evaluate
from ..options import ComputeOptions, check, option
from ..runtime import Runtime, prepare_inference, resolve, set_threads
from ..tasks import TASKS, get_task
from .common import load_checkpoint


_DEFAULTS = {name: p.default for name, p in inspect.signature(evaluate).parameters.items()}  # the library's


@dataclass(kw_only=True)
class EvalConfig(ComputeOptions):
    """Sample k responses per held-out problem and score them with the task's rule-based verifier."""

    ckpt: list[str] = option(help="checkpoint or run directory; several: each scored on the same problems, at one "
                             "precision")
    task: str = option(help="task family", choices=tuple(TASKS))
    task_args: dict = option(default_factory=dict, help='generator options as JSON, e.g. {"max_terms": 2}')
    n: int = option(100, help="held-out problems", min=1)
    k: int = option(1, help="samples per problem", min=1)
    temperature: float = option(_DEFAULTS["temperature"], help="sampling temperature (R1: 0.6); 0 = greedy", min=0)
    top_p: float = option(_DEFAULTS["top_p"], help="nucleus sampling mass (R1: 0.95)", above=0, max=1)
    max_new_tokens: int = option(_DEFAULTS["max_new_tokens"], help="response length limit", min=1)
    seed: int = option(0, help="problem and sampling seed", min=0)
    json: bool = option(False, help="print one JSON object: the numbers and every problem scored")

    def __post_init__(self):
        check(self)


def run(cfg: EvalConfig) -> list[dict]:
    """Score every --ckpt, in order; returns their results."""
    for path in cfg.ckpt:  # a bad path fails before any model is scored
        ckpt.resolve(path)
    task = get_task(cfg.task, **cfg.task_args)
    set_threads(cfg.threads)
    problems = task.problems(cfg.seed, cfg.n, split="heldout")
    # One precision for all of them, decided once from the hardware and the rows decoded together, so that scores
    # compared side by side are computed the same way (when a timing probe decided, one process once scored a
    # speedrun's teacher in fp32 at 1.95x and its students in bf16 at 2.03x).
    rt = resolve(cfg.device, cfg.precision, rows=cfg.n * cfg.k)  # all n × k decoded together
    return [_score(path, task, problems, cfg, rt) for path in cfg.ckpt]


def _score(path: str, task, problems: list, cfg: EvalConfig, rt: Runtime) -> dict:
    model, tokenizer = load_checkpoint(path)
    model = prepare_inference(model, rt)
    r = evaluate(Engine(model, tokenizer), task, problems, k=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p,
                 max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    if cfg.json:
        print(json.dumps({"task": cfg.task, "task_args": cfg.task_args, "precision": rt.precision,
                          "runtime": rt.describe(), "ckpt": path, **r}),
              flush=True)
    else:
        print(f"{path + ': ' if len(cfg.ckpt) > 1 else ''}{cfg.task}: pass@1 {r['accuracy']:.1%} (mean of {r['k']} "
              f"samples over {r['n']} held-out problems), cons@{r['k']} {r['cons_at_k']:.1%}, well-formed "
              f"{r['format']:.1%}, {r['mean_response_tokens']:.1f} tokens per response", file=sys.stdout, flush=True)
    return r
