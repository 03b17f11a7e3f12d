"""syllogism: is a conclusion valid given two premises? ("Consider these statements: 1. All cats are animals
..."), reasoning-gym's generator; the answer is Yes or No. No worked solutions."""

from __future__ import annotations

from .base import Problem
from .families import ReasoningGymTask
from .registry import register


@register
class SyllogismTask(ReasoningGymTask):
    """Keyed by its text. Logic: the answer is Yes or No (case and a trailing period ignored)."""

    name = "syllogism"
    answer_form = "yes/no"
    knobs = {}  # the generator's own defaults (all four quantifiers, 30% invalid conclusions)

    def check(self, problem: Problem, answer: str) -> float:
        norm = answer.strip().rstrip(".").lower() if isinstance(answer, str) and len(answer) < 20 else ""
        return float(norm in ("yes", "no") and norm == problem.answer.strip().lower())
