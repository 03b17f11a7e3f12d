"""Task evaluation through the engine: pass@1 averaged over k samples, majority-vote cons@k, response length.

R1's protocol (DeepSeek-R1, arXiv 2501.12948, §3: evaluation setup): sample k responses at temperature 0.6 and top-p 0.95 and average their
accuracy; greedy decoding (temperature 0) is available for cheap, deterministic progress checks.
"""

from __future__ import annotations

from collections import Counter

from .engine import Engine, SamplingParams, sequence_seed
from .tasks import Problem, Task
from .template import STOP


def evaluate(engine: Engine, task: Task, problems: list[Problem], k: int = 1, temperature: float = 0.6,
             top_p: float = 0.95, max_new_tokens: int = 128, seed: int = 0, batch: int = 1024) -> dict:
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
