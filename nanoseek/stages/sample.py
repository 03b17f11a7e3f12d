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
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .. import checkpoint as ckpt
from ..engine import Engine, SamplingParams, sequence_seed
from ..tasks import get_task, split_of
from ..tasks.base import combine
from ..template import STOP
from .common import load_checkpoint


@dataclass
class SampleConfig:
    ckpt: str = field(metadata={"help": "checkpoint or run directory"})
    task: str = field(metadata={"help": "task family"})
    out: str = field(metadata={"help": "JSONL file to write"})
    task_args: dict = field(default_factory=dict, metadata={"help": "generator options as JSON"})
    n: int = field(default=256, metadata={"help": "problems"})
    k: int = field(default=4, metadata={"help": "samples per problem"})
    keep: str = field(default="correct", metadata={"help": "correct (rejection sampling) or all"})
    split: str = field(default="train", metadata={"help": "train or heldout problems"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    max_new_tokens: int = field(default=96, metadata={"help": "response length limit"})
    seed: int = field(default=0, metadata={"help": "problem and sampling seed"})
    batch: int = field(default=64, metadata={"help": "sequences per engine call"})


def run(cfg: SampleConfig) -> dict:
    """Write the JSONL (atomically) and return counts."""
    if cfg.keep not in ("correct", "all"):
        raise ValueError(f"--keep must be correct or all, got {cfg.keep!r}")
    if cfg.n <= 0 or cfg.k <= 0:
        raise ValueError("--n and --k must be positive")
    if cfg.split == "heldout" and cfg.keep == "correct":  # rejection sampling makes training data
        raise ValueError("--split heldout with --keep correct would turn held-out problems into training traces; "
                         "rejection-sample --split train, or use --keep all to inspect held-out rollouts")
    task = get_task(cfg.task, **cfg.task_args)
    model, tokenizer = load_checkpoint(cfg.ckpt)
    engine = Engine(model, tokenizer)
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
