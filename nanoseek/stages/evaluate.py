"""nanoseek eval: held-out pass@1 (mean over k samples), cons@k (majority vote) and response length on a task.

R1's protocol: k samples per problem at temperature 0.6 and top-p 0.95, accuracy averaged over the samples;
--temperature 0 gives greedy decoding. Without --task/--task-args a checkpoint is scored on the task its run
recorded in run.json (grpo's --task/--task-args; an SFT run's is its --init's), saying so on stderr; a flag that
differs from the record says that it overrides it. Only held-out problems are scored (chosen by content, see
tasks/base.py); --json prints the numbers and the problems scored. Several checkpoints are scored on the same problems in one
process (one line each; with --json one JSON object per line, in the order given).

    nanoseek eval --ckpt runs/rl --n 200 --k 4 --json      # the task runs/rl/run.json recorded
    nanoseek eval --ckpt runs/rl --task chain_sum --task-args '{"min_terms": 5, "max_terms": 5}' --n 200
    nanoseek eval --ckpt runs/coldstart runs/rl --task-args '{"min_terms": 4, "max_terms": 4}' --n 200 --k 4
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
from dataclasses import MISSING, dataclass, fields

from .. import checkpoint as ckpt
from ..engine import Engine
from ..evaluation import Recorded, evaluate, recorded_seed, recorded_task
from ..options import ComputeOptions, check, option
from ..runtime import Runtime, prepare_inference, resolve, set_threads
from ..tasks import TASKS, get_task


_DEFAULTS = {name: p.default for name, p in inspect.signature(evaluate).parameters.items()}  # the library's


@dataclass(kw_only=True)
class EvalConfig(ComputeOptions):
    """Sample k responses per held-out problem and score them with the task's rule-based verifier."""

    ckpt: list[str] = option(help="checkpoint or run directory; several: each scored on the same problems, at one "
                             "precision")
    task: str = option("", help="task family (default: the one the checkpoint's run recorded in run.json)",
                       choices=("",) + tuple(TASKS))
    task_args: dict = option(default_factory=dict, help='generator options as JSON, e.g. {"max_terms": 2} '
                             "(default: the run's recorded ones for its task, else the family's)")
    n: int = option(100, help="held-out problems", min=1)
    k: int = option(4, help="samples per problem (pass@1 is their mean: R1 estimates it from several samples)",
                    min=1)
    temperature: float = option(_DEFAULTS["temperature"], help="sampling temperature (R1: 0.6); 0 = greedy", min=0)
    top_p: float = option(_DEFAULTS["top_p"], help="nucleus sampling mass (R1: 0.95)", above=0, max=1)
    max_new_tokens: int = option(_DEFAULTS["max_new_tokens"], help="response length limit", min=1)
    seed: int = option(0, help="problem and sampling seed (default: the seed the checkpoint's run recorded, so a "
                       "speedrun's models are scored on its own held-out problems; else 0)", min=0)
    json: bool = option(False, help="print one JSON object: the numbers and every problem scored")
    # Which fields the user set (None: those that differ from their defaults, for a library caller): a --task-args
    # given as {} means the family's defaults, while an absent one means the run's recorded options.
    given: tuple | None = option(None, help="fields given on the command line", cli=False)

    def __post_init__(self):
        check(self)
        if self.given is None:
            self.given = tuple(f.name for f in fields(self) if f.name != "given" and getattr(self, f.name) != (
                f.default_factory() if f.default_factory is not MISSING else f.default))

    @classmethod
    def from_cli(cls, given: dict) -> "EvalConfig":
        return cls(**given, given=tuple(given))


def run(cfg: EvalConfig) -> list[dict]:
    """Score every --ckpt, in order; returns their results."""
    for path in cfg.ckpt:  # a bad path fails before any model is scored
        ckpt.resolve(path)
    name, args = choose_task(cfg)
    cfg = dataclasses.replace(cfg, seed=choose_seed(cfg))
    task = get_task(name, **args)
    set_threads(cfg.threads)
    problems = task.problems(cfg.seed, cfg.n, split="heldout")
    # One precision for all of them, so that scores compared side by side are computed the same way (when a timing
    # probe decided, one process once scored a speedrun's teacher in fp32 at 1.95x and its students in bf16 at
    # 2.03x): the one their checkpoints recorded, when they agree; else the hardware's, for the n × k rows decoded
    # together
    recorded = {ckpt.recorded_precision(path) for path in cfg.ckpt}
    rt = resolve(cfg.device, cfg.precision, rows=cfg.n * cfg.k,
                 recorded=recorded.pop() if len(recorded) == 1 else None)
    return [_score(path, task, args, problems, cfg, rt) for path in cfg.ckpt]


def _key(task: str, args: dict) -> str:
    return f"{task} {json.dumps(args, sort_keys=True)}"


def choose_task(cfg: EvalConfig) -> tuple[str, dict]:
    """(task, generator options): the flags given, else what the checkpoints' runs recorded (all of them must
    agree, since every checkpoint is scored on the same problems). One stderr line says which source won."""
    records = {path: r for path in cfg.ckpt if (r := recorded_task(path)) is not None}
    task = cfg.task if "task" in cfg.given else None
    if task is None and "task_args" in cfg.given and len({r.task for r in records.values()}) == 1:
        task = next(iter(records.values())).task  # --task-args alone: for the task the runs recorded
    if task is None and not records:
        raise ValueError(f"--task: {', '.join(cfg.ckpt)}: no run.json records the task trained on; give --task")
    if "task_args" in cfg.given and task is not None:
        _note_override(f"--task {task} --task-args {json.dumps(cfg.task_args)}", _key(task, cfg.task_args),
                       records)
        return task, dict(cfg.task_args)
    same = {p: r for p, r in records.items() if task is None or r.task == task}
    if not same:  # --task names a family none of the runs recorded: its default options
        _note_override(f"--task {task}", None, records)
        return task, {}
    if len({_key(r.task, r.task_args) for r in same.values()}) > 1:
        what = "; ".join(f"{p}: {r.describe()}" for p, r in same.items())
        flags = "--task-args" if len({r.task for r in same.values()}) == 1 else "--task and --task-args"
        raise ValueError(f"--ckpt: the runs recorded different tasks ({what}); give {flags} to score them all on "
                         "one")
    r = next(iter(same.values()))
    sources = ", ".join(dict.fromkeys(str(x.source) for x in same.values()))
    print(f"eval: task {r.describe()} from {sources}", file=sys.stderr)
    return r.task, dict(r.task_args)


def choose_seed(cfg: EvalConfig) -> int:
    """--seed if given, else the seed the checkpoints' runs recorded when they agree (saying so), else 0."""
    if "seed" in cfg.given:
        return cfg.seed
    seeds = {recorded_seed(path) for path in cfg.ckpt}
    if len(seeds) == 1 and (seed := seeds.pop()) is not None:
        if seed != cfg.seed:
            print(f"eval: seed {seed} from the run's run.json (its held-out problems and sampling)", file=sys.stderr)
        return seed
    return cfg.seed


def _note_override(flags: str, key: str | None, records: dict[str, Recorded]) -> None:
    """One stderr line when the flags given differ from what a run recorded (nothing when they agree)."""
    differ = {str(r.source): r.describe() for r in records.values() if _key(r.task, r.task_args) != key}
    if differ:
        recorded = "; ".join(f"{d} in {s}" for s, d in differ.items())
        whose = "the run" if len(differ) == 1 else "the runs"
        print(f"eval: {flags} overrides what {whose} recorded ({recorded})", file=sys.stderr)


def _score(path: str, task, args: dict, problems: list, cfg: EvalConfig, rt: Runtime) -> dict:
    model, tokenizer = ckpt.load(path, require_tokenizer=True)
    model = prepare_inference(model, rt)
    r = evaluate(Engine(model, tokenizer), task, problems, k=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p,
                 max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    if cfg.json:
        print(json.dumps({"task": task.name, "task_args": args, "seed": cfg.seed, "precision": rt.precision,
                          "runtime": rt.describe(), "ckpt": path, **r}),
              flush=True)
    else:
        print(f"{path + ': ' if len(cfg.ckpt) > 1 else ''}{task.name}: pass@1 {r['accuracy']:.1%} (mean of {r['k']} "
              f"samples over {r['n']} held-out problems), cons@{r['k']} {r['cons_at_k']:.1%}, well-formed "
              f"{r['format']:.1%}, {r['mean_response_tokens']:.1f} tokens per response", file=sys.stdout, flush=True)
    return r
