"""countdown: reach a target with given numbers, each used once ("Using all the numbers 3, 5, 7, create an
expression that equals 15."), reasoning-gym's generator. Any expression that does it is right, not only the
gold one. The generator searches with sympy (~10 ms an item), so the corpus keeps it a small share."""

from __future__ import annotations

import re

from .arithmetic import work
from .base import Problem, Unsolvable
from .families import ReasoningGymTask
from .registry import register
from .verify import countdown_ok

# The generator's three phrasings, after problem_key's normalisation; the numbers come first in one of them.
_NUMBERS_FIRST = re.compile(r"using all the numbers ([\d, ]+), create an expression that equals (\d+)\.")
_TARGET_FIRST = re.compile(r"(?:find a way to make|calculate) (\d+) using all of these numbers: ([\d, ]+)\.")


@register
class CountdownTask(ReasoningGymTask):
    name = "countdown"
    answer_form = "expression"
    knobs = dict(min_numbers=3, max_numbers=3, min_value=1, max_value=20, min_target=5, max_target=60)

    @staticmethod
    def content_key(text: str) -> str | None:
        """Its multiset of numbers and its target: any phrasing, any number order is one problem."""
        for pattern in (_NUMBERS_FIRST, _TARGET_FIRST):
            m = pattern.search(text)
            if m:
                target, numbers = m.groups() if pattern is _TARGET_FIRST else m.groups()[::-1]
                return f"countdown:{','.join(sorted(n.strip() for n in numbers.split(',')))}={target}"
        return None

    def check(self, problem: Problem, answer: str) -> float:
        return float(countdown_ok(answer, problem.metadata["numbers"], problem.metadata["target"]))

    def solve(self, problem: Problem) -> tuple[str, str]:
        """The gold expression, evaluated step by step (the generator's gold is one solution of possibly many)."""
        expr, numbers, target = problem.answer, problem.metadata["numbers"], problem.metadata["target"]
        lines, value = work(expr)
        if value != target or sorted(map(int, re.findall(r"\d+", expr))) != sorted(numbers):
            raise Unsolvable(problem.question)
        intro = f"The numbers are {', '.join(map(str, numbers))} and the target is {target}. Try {expr}."
        outro = f"That gives {target} and uses each number once, so {expr} works."
        return "\n".join([intro, *lines, outro]), expr
