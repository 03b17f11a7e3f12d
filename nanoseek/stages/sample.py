"""nanoseek sample: rollouts to JSONL; with --keep correct, rejection sampling (R1 §2.3.3).

k samples per problem from a checkpoint through the engine; each line carries the R1 prompt, the completion
and its provenance (checkpoint, task, problem, seed, reward components). --keep correct keeps only verified-
correct, well-formed completions, deduplicated per problem: the traces that SFT/distillation train on. Only
training-split problems can be rejection-sampled (`--split heldout` needs `--keep all`, for inspection).

    nanoseek sample --ckpt runs/rl --task chain_sum --n 256 --k 4 --keep correct --out runs/traces.jsonl
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .. import checkpoint as ckpt
from ..engine import Engine, SamplingParams, sequence_seed
from ..options import ComputeOptions, check, check_out_file, option
from ..runtime import prepare_inference, resolve, set_threads
from ..tasks import TASKS, get_task, split_of
from ..tasks.base import combine
from ..template import STOP


@dataclass(kw_only=True)
class SampleConfig(ComputeOptions):
    """Rollouts from a checkpoint to a JSONL file; --keep correct is rejection sampling (verified-correct,
    well-formed, deduplicated completions of training-split problems)."""

    ckpt: str = option(help="checkpoint or run directory")
    task: str = option(help=f"task family: {', '.join(TASKS)}")
    out: str = option(help="JSONL file to write")
    task_args: dict = option(default_factory=dict, help="generator options as JSON")
    n: int = option(256, help="problems", min=1)
    k: int = option(4, help="samples per problem", min=1)
    keep: str = option("correct", help="correct (rejection sampling) or all", choices=("correct", "all"))
    split: str = option("train", help="train or heldout problems", choices=("train", "heldout"))
    temperature: float = option(1.0, help="sampling temperature (0: greedy)", min=0)
    top_p: float = option(1.0, help="nucleus sampling mass (1 = off)", above=0, max=1)
    max_new_tokens: int = option(96, help="response length limit", min=1)
    seed: int = option(0, help="problem and sampling seed", min=0)
    batch: int = option(1024, help="sequences per engine call", min=1)
    force: bool = option(False, help="replace --out if it exists")

    def __post_init__(self):
        check(self)


def run(cfg: SampleConfig) -> dict:
    """Write the JSONL (atomically) and return counts."""
    if cfg.split == "heldout" and cfg.keep == "correct":  # rejection sampling makes training data
        raise ValueError("--split heldout with --keep correct would turn held-out problems into training traces; "
                         "rejection-sample --split train, or use --keep all to inspect held-out rollouts")
    check_out_file(cfg.out, "--out", force=cfg.force)
    task = get_task(cfg.task, **cfg.task_args)
    set_threads(cfg.threads)
    model, tokenizer = ckpt.load(cfg.ckpt, require_tokenizer=True)
    rt = resolve(cfg.device, cfg.precision, rows=min(cfg.batch, cfg.n * cfg.k),  # rows decoded at once
                 recorded=ckpt.recorded_precision(cfg.ckpt))
    engine = Engine(prepare_inference(model, rt).eval(), tokenizer)
    problems = task.problems(cfg.seed, cfg.n, split=cfg.split)
    assert all(split_of(p.question) == cfg.split for p in problems)  # the split is the question's own property
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            seed=cfg.seed, stop=list(STOP))
    jobs = [(p, j) for p in problems for j in range(cfg.k)]
    rows, seen, counts = [], set(), {"generated": 0, "correct": 0, "kept": 0}
    source = str(ckpt.resolve(cfg.ckpt))
    for start in tqdm(range(0, len(jobs), cfg.batch), desc=f"sample {cfg.task}", unit="batch"):
        chunk = jobs[start:start + cfg.batch]
        prompts = [task.prompt(p) for p, _ in chunk]
        gens = engine.generate(prompts, params, seeds=[sequence_seed(cfg.seed, start + i) for i in range(len(chunk))])
        for (problem, j), prompt, g in zip(chunk, prompts, gens):
            scores = task.score(problem, g.text)
            counts["generated"] += 1
            good = scores["accuracy"] == 1.0 and scores["format"] == 1.0
            counts["correct"] += good
            if (cfg.keep == "correct" and not good) or (problem.id, g.text) in seen:
                continue
            seen.add((problem.id, g.text))
            rows.append({"prompt": prompt, "completion": g.text, "task": cfg.task, "problem_id": problem.id,
                         "split": cfg.split,
                         "question": problem.question, "gold": problem.answer, "answer": scores["answer"],
                         "reward": combine(scores), "accuracy": scores["accuracy"], "format": scores["format"],
                         "tokens": len(g.tokens), "checkpoint": source, "seed": cfg.seed, "sample": j})
    counts["kept"] = len(rows)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out)
    return counts
