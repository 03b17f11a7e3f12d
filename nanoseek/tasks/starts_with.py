"""StartsWithTask: the RL sanity ladder's first rung, a task whose reward needs no reasoning at all.

Not a registered family: its problems have no answer to check, no worked solution and no split key worth the
name, so it is not offered to `nanoseek eval`, `sample` or the corpus. Its constructor takes its own parameter
(`chars`), which `registry.get_task` handles if a user registers it (tests/test_tasks.py does).
"""

from __future__ import annotations

from typing import Iterator

from .base import Problem, Task


class StartsWithTask(Task):
    """The sanity ladder's first rung: reward 1 when the completion starts with one of `chars`.

    Nothing to reason about: an RL loop that works drives a behaviour the model shows at some base rate (the
    ladder picks `chars` so that it is ~20%) to ~100% within tens of steps."""

    name = "starts_with"

    def __init__(self, chars: str):
        super().__init__(chars=chars)
        self.chars = chars

    @classmethod
    def at_rate(cls, model, tokenizer, rate: float = 0.2) -> "StartsWithTask":
        """The task whose characters hold about `rate` of the model's first-token probability (on a sample
        prompt); the measured rate is in `.base_rate`."""
        import torch

        with torch.no_grad():
            probs = model(torch.tensor([tokenizer.encode(cls.PROMPT.format(0))]))[0, -1].float().softmax(-1)
        mass: dict[str, float] = {}
        for t, p in enumerate(probs.tolist()):
            text = tokenizer.decode([t])
            if text and t not in (tokenizer.eos_id, tokenizer.pad_id):
                mass[text[0]] = mass.get(text[0], 0.0) + p
        chars, total = "", 0.0
        for ch, p in sorted(mass.items(), key=lambda kv: -kv[1]):  # largest first, skipping any that overshoot
            if total + p <= 1.2 * rate:
                chars, total = chars + ch, total + p
            if total >= 0.9 * rate:
                break
        task = cls(chars)
        task.base_rate = total
        return task

    PROMPT = "Say anything ({})."

    def iterate(self, seed: int, n: int) -> Iterator[Problem]:
        return (Problem(question=self.PROMPT.format(seed + i), answer="") for i in range(n))

    def prompt(self, problem: Problem) -> str:
        return problem.question

    def check(self, problem: Problem, answer: str) -> float:
        return 0.0

    def score(self, problem: Problem, completion: str) -> dict:
        hit = float(completion[:1] != "" and completion[:1] in self.chars)
        return {"format": 1.0, "accuracy": hit, "partial": 0.0, "answer": completion[:1]}
