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
        answers = [s["answer"] for s in scores if s["answer"]]
        if answers:  # majority vote over the extracted answers (ties: the first most common)
            vote = Counter(answers).most_common(1)[0][0]
            cons += float(next(s["accuracy"] for s in scores if s["answer"] == vote))
    n = max(len(problems), 1)
    return {"accuracy": acc / n, "cons_at_k": cons / n, "format": fmt / n, "n": len(problems), "k": k,
            "mean_response_tokens": sum(len(g.tokens) for g in outs) / max(len(outs), 1), "problems": scored}
