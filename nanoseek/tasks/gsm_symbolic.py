"""gsm_symbolic: grade-school word problems from GSM8K templates with fresh names and numbers (reasoning-gym's
GSM-Symbolic generator); its own step-by-step solutions are the worked solutions."""

from __future__ import annotations

from fractions import Fraction

from .base import Problem, Unsolvable
from .families import NumericTask
from .registry import register


@register
class GsmSymbolicTask(NumericTask):
    """Keyed by its text: the templates vary names and numbers, which no other wording of the problem keeps."""

    name = "gsm_symbolic"
    knobs = {}  # the generator's one knob, difficulty, supports only its default (1.0)

    def solve(self, problem: Problem) -> tuple[str, str]:
        steps, sep, final = problem.metadata["answer_cot"].rpartition("####")
        # A few templates yield nonsense (e.g. an age of -1); the gold answer must match the solution's own result.
        try:
            agrees = Fraction(final.strip()) == Fraction(problem.answer)
        except ValueError:
            agrees = False
        if not sep or not agrees or problem.answer.startswith("-"):
            raise Unsolvable(problem.question)
        return steps.strip(), problem.answer
