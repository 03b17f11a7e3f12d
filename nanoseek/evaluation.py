"""Task evaluation through the engine: pass@1 averaged over k samples, majority-vote cons@k, response length;
R1_SAMPLING, the one sampling default for a trained model; and what a checkpoint was trained on (its run.json),
which eval, chat and the server's page default to.

R1's protocol (DeepSeek-R1, arXiv 2501.12948, §3: evaluation setup): sample k responses at temperature 0.6 and top-p 0.95 and average their
accuracy; greedy decoding (temperature 0) is available for cheap, deterministic progress checks.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from .engine import Engine, SamplingParams, sequence_seed
from .tasks import TASKS, Problem, Task, get_task
from .template import R1_SAMPLING, STOP




def evaluate(engine: Engine, task: Task, problems: list[Problem], k: int = 1,
             temperature: float = R1_SAMPLING.temperature, top_p: float = R1_SAMPLING.top_p,
             max_new_tokens: int = 128, seed: int = 0, batch: int = 1024) -> dict:
    """{"accuracy", "cons_at_k", "format", "mean_response_tokens", "n", "k", "problems"} over `problems`;
    "problems" lists what was scored: [{"id", "question", "answer", "correct": [bool per sample]}]."""
    prompts = [task.prompt(p) for p in problems for _ in range(k)]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                            stop=list(STOP))
    outs = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        outs += engine.generate(chunk, params, seeds=[sequence_seed(seed, start + i) for i in range(len(chunk))])
    acc = fmt = cons = 0.0
    scored = []
    for i, problem in enumerate(problems):
        group = outs[i * k:(i + 1) * k]
        scores = [task.score(problem, g.text) for g in group]
        scored.append({"id": problem.id, "question": problem.question, "answer": problem.answer,
                       "correct": [s["accuracy"] == 1.0 for s in scores]})
        acc += sum(s["accuracy"] for s in scores) / k
        fmt += sum(s["format"] for s in scores) / k
        answers = [s["answer"] for s in scores if s["format"]]  # only answers in the task's form take part
        if answers:  # majority vote over the extracted answers (ties: the first most common)
            vote = Counter(answers).most_common(1)[0][0]
            cons += float(next(s["accuracy"] for s in scores if s["answer"] == vote))
    n = max(len(problems), 1)
    return {"accuracy": acc / n, "cons_at_k": cons / n, "format": fmt / n, "n": len(problems), "k": k,
            "mean_response_tokens": sum(len(g.tokens) for g in outs) / max(len(outs), 1), "problems": scored}


# ----------------------------------------------------------------------------- what a checkpoint was trained on


class Recorded(NamedTuple):
    task: str
    task_args: dict
    source: Path  # the run.json that recorded it (the run's own, or one up its `init` chain)

    def describe(self) -> str:
        return f"{self.task} {json.dumps(self.task_args)}"


def _run_json(path) -> tuple[Path, dict] | None:
    """(run.json, its record) of a run directory or of a checkpoint inside one (RUN/checkpoints/step_N)."""
    p = Path(path)
    for run_dir in (p, p.parent.parent if p.parent.name == "checkpoints" else None):
        if run_dir is None or not (run_dir / "run.json").is_file():
            continue
        try:
            record = json.loads((run_dir / "run.json").read_text())
        except (OSError, ValueError):
            return None
        return (run_dir / "run.json", record) if isinstance(record, dict) else None
    return None


def recorded_seed(path) -> int | None:
    """The --seed of the checkpoint's own run (run.json), or None. A speedrun passes its seed to every stage and
    draws its held-out problems with it, so eval defaulting to it scores the problems the run's report scored."""
    found = _run_json(path)
    seed = found[1].get("seed") if found is not None else None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 else None


def _init_dir(run_json: Path, record: dict) -> Path | None:
    """The run's recorded --init as a path. A relative one was relative to where the run was started, which is
    the run directory minus its recorded --out (runs/speedrun/rl records init runs/speedrun/coldstart)."""
    init, out = record.get("init"), record.get("out")
    if not isinstance(init, str) or not init:
        return None
    if isinstance(out, str) and out and not Path(init).is_absolute() and not Path(out).is_absolute():
        parts, here = Path(os.path.normpath(out)).parts, run_json.parent.resolve().parts
        if here[len(here) - len(parts):] == parts:
            candidate = Path(*here[:len(here) - len(parts)]) / init
            if candidate.exists():
                return _short(candidate)
    return Path(init) if Path(init).exists() else None


def _short(path: Path) -> Path:
    """The path relative to the working directory when it lies below it (what the messages show)."""
    try:
        return path.relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def _task_of(record: dict) -> tuple[str, dict] | None:
    """The task a run's own record names: grpo and distill record --task/--task-args; a pretraining run on the
    embedded corpus counts only when its extra worked chain_sum problems (--easy-problems) outnumber the mixed
    reasoning documents (--n-problems), so the task is unambiguous."""
    task, args = record.get("task"), record.get("task_args")
    if isinstance(task, str) and task in TASKS:
        return task, dict(args) if isinstance(args, dict) else {}
    if record.get("command") == "pretrain" and not record.get("data"):
        from .corpus import EASY

        easy, mixed, args = record.get("easy_problems") or 0, record.get("n_problems") or 0, record.get("easy_args")
        if isinstance(easy, int) and isinstance(mixed, int) and easy > mixed:
            return EASY[0], dict(args) if isinstance(args, dict) else dict(EASY[1])
    return None


def recorded_task(path, max_depth: int = 8) -> Recorded | None:
    """The task (and generator options) a checkpoint was trained on, from its run's run.json, following the
    `init` chain through runs that record none (an SFT run records only its data files); None when no run
    on the chain says."""
    found, seen = _run_json(path), set()
    while found is not None and len(seen) < max_depth:
        file, record = found
        if file.resolve() in seen:  # a cycle of inits: nothing more to learn
            return None
        seen.add(file.resolve())
        task = _task_of(record)
        if task is not None:
            return Recorded(task[0], task[1], file)
        init = _init_dir(file, record)
        found = _run_json(init) if init is not None else None
    return None


EXAMPLE_SEED = 0  # the example question is the same every time a checkpoint is opened


def example_question(task: str, task_args: dict) -> str | None:
    """One held-out question of the task in its own format (what the model was trained to answer), or None when
    the recorded options no longer make a generator."""
    try:
        return get_task(task, **task_args).problems(EXAMPLE_SEED, 1, split="heldout")[0].question
    except ValueError:
        return None


def trained_on(path) -> dict | None:
    """{"task", "task_args", "source", "example"} for chat and the server's page, or None (nothing recorded)."""
    r = recorded_task(path)
    if r is None:
        return None
    return {"task": r.task, "task_args": r.task_args, "source": str(r.source),
            "example": example_question(r.task, r.task_args)}


# ----------------------------------------------------------------------------- error bars

Z95 = 1.959964  # two-sided 95% normal quantile: with >= 100 problems the t quantile differs by < 1.5%


def problem_means(problems: list[dict]) -> list[float]:
    """Per-problem accuracy (the mean over its k samples) of an evaluation's `problems` list."""
    return [sum(p["correct"]) / len(p["correct"]) for p in problems]


def pass1_se(problems: list[dict]) -> float:
    """Standard error of pass@1 clustered by problem: the k samples of one problem are not independent (most
    problems get k identical answers), so the unit is the problem, and SE = sd(per-problem means) / √n. The naive
    binomial √(p(1-p)/(n·k)) understates it by up to √k."""
    means = problem_means(problems)
    n = len(means)
    if n < 2:
        return float("nan")
    mu = sum(means) / n
    return (sum((m - mu) ** 2 for m in means) / (n - 1) / n) ** 0.5


def paired_difference(a: list[dict], b: list[dict], name_a: str = "a", name_b: str = "b") -> dict:
    """pass@1(a) − pass@1(b) on the same problems, with a 95% CI from the per-problem differences (paired: the
    problems' difficulty cancels). {"a", "b", "a_pass1", "b_pass1", "diff", "se", "ci_low", "ci_high", "n"}; ValueError if the two
    evaluations did not score the same problems in the same order."""
    if [p["id"] for p in a] != [p["id"] for p in b]:
        raise ValueError(f"{name_a} and {name_b} were scored on different problems: no paired comparison")
    d = [x - y for x, y in zip(problem_means(a), problem_means(b))]
    n = len(d)
    diff = sum(d) / n if n else float("nan")
    se = (sum((x - diff) ** 2 for x in d) / (n - 1) / n) ** 0.5 if n > 1 else float("nan")
    pa, pb = (sum(problem_means(x)) / n if n else float("nan") for x in (a, b))
    return {"a": name_a, "b": name_b, "a_pass1": pa, "b_pass1": pb, "diff": diff, "se": se,
            "ci_low": diff - Z95 * se, "ci_high": diff + Z95 * se, "n": n}
