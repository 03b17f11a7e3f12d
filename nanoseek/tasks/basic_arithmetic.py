"""basic_arithmetic: expressions with + - * / and brackets ("Calculate -( 4 * 3 ) + 7 / 7."), reasoning-gym's
generator; the gold answer reads / as Python's //, so only exact divisions get a worked solution."""

from __future__ import annotations

import re

from .arithmetic import EXPR, expression_key, solve_expression
from .base import Problem
from .families import NumericTask
from .registry import register

# "Calculate E." (format_style="simple") and the four "natural" templates, after problem_key's normalisation.
_PHRASINGS = [re.compile(p) for p in (rf"calculate ({EXPR})\.", rf"what is ({EXPR})\?", rf"solve ({EXPR})\.",
                                      rf"compute ({EXPR})\.", rf"evaluate: ({EXPR})\.")]
_INTRO = "Brackets first, then * and / before + and -, each from left to right."


@register
class BasicArithmeticTask(NumericTask):
    name = "basic_arithmetic"
    knobs = dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2)  # easy; operators, brackets add more

    @staticmethod
    def content_key(text: str) -> str | None:
        """Its expression; a sum by its signed terms, the same key as chain_sum's wording of that sum."""
        for phrasing in _PHRASINGS:
            m = phrasing.fullmatch(text)
            if m:
                return expression_key(m.group(1))
        return None

    def solve(self, problem: Problem) -> tuple[str, str]:
        return solve_expression(_INTRO, problem)
