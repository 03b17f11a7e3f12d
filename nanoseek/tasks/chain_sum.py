"""chain_sum: sums and differences of integers ("State the final answer to the following arithmetic problem:
4 - 1 + 3 ="), reasoning-gym's generator.

The model family to copy: everything nanoseek knows about chain_sum is declared here, and `@register` makes it
a task of get_task, the CLI, the held-out split and the corpus.
"""

from __future__ import annotations

import re

from ..template import END_THINK
from .arithmetic import EXPR, expression_key, judge_lines, solution, solve_expression
from .base import Problem, Unsolvable
from .families import NumericTask
from .registry import register

_PHRASING = re.compile(rf"state the final answer to the following arithmetic problem: ({EXPR})=")
_INTRO = "Add and subtract from left to right."


@register
class ChainSumTask(NumericTask):
    """`a ± b ± …`: the space can be counted exactly (terms and digit counts give disjoint question sets)."""

    name = "chain_sum"
    # Easy by default: the CPU-sized models of the speedrun need a task they can start to solve. Difficulty
    # grows with the terms and digits (the generator's own defaults, which the corpus uses, reach 6 terms of 4 digits).
    knobs = dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2)

    @staticmethod
    def content_key(text: str) -> str | None:
        """Its terms in any order: a reordering of a held-out sum is held out (and basic_arithmetic's wording of
        the same sum has the same key)."""
        m = _PHRASING.fullmatch(text)
        return expression_key(m.group(1)) if m else None

    def solve(self, problem: Problem) -> tuple[str, str]:
        return solve_expression(_INTRO, problem)

    def step_rewards(self, problem: Problem, completion: str) -> list[tuple[int, float]]:
        """One step per line of the reasoning, worth 1 if `arithmetic.judge_lines` finds it a right step from the
        line before, else 0 (each line ends after its newline), then the answer block worth the outcome."""
        think, closed, _ = completion.partition(END_THINK)
        lines = think.split("\n")
        steps, end = [], 0
        for line, ok in zip(lines, judge_lines(_INTRO, problem.metadata["expression"], lines)):
            end = min(end + len(line) + 1, len(think))
            steps.append((end, float(ok)))
        if closed:
            steps.append((len(completion), self.score(problem, completion)["accuracy"]))
        return steps

    def space_size(self) -> int | None:
        o = self.options
        if o.get("allow_negation"):
            return None  # negative operands overlap across digit counts: not a simple product
        values = lambda d: 10 if d == 1 else 9 * 10 ** (d - 1)  # noqa: E731 -- 1 digit includes 0
        return sum(values(d) ** t * 2 ** (t - 1) for t in range(o["min_terms"], o["max_terms"] + 1)
                   for d in range(o["min_digits"], o["max_digits"] + 1))


def worked_solution(question: str) -> tuple[str, str]:
    """(worked reasoning, answer) the generator's solver writes for a chain_sum question ("... problem: 4 - 1 - 7 ="),
    whoever asked it; ValueError if the question is not one."""
    m = re.fullmatch(r".*problem: ([\d\s+\-]+) =\s*", question.strip(), re.S)
    if m is None:
        raise ValueError(f"not a chain_sum question: {question[:80]!r}")
    try:
        text, value = solution(_INTRO, m.group(1))
    except Unsolvable:
        raise ValueError(f"no worked solution for {question[:80]!r}") from None
    return text, str(value)
