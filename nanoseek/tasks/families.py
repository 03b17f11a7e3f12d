"""What the families backed by reasoning-gym share: their generator and the integer-answer check.

reasoning-gym supplies the problems (and their gold answers); checking model text never goes through its
scorers, because some of them parse expressions with sympy, which evaluates Python. Each family is a module of
its own (chain_sum.py, basic_arithmetic.py, gsm_symbolic.py, countdown.py, syllogism.py) that subclasses these.
"""

from __future__ import annotations

from typing import Iterator

from .base import Problem, Task
from .starts_with import StartsWithTask  # noqa: F401 -- its former home: the RL ladder imports it from here
from .verify import integer_equal

__all__ = ["NumericTask", "ReasoningGymTask", "StartsWithTask"]


class ReasoningGymTask(Task):
    """Problems from `reasoning_gym.create_dataset(name, size, seed, **options)`."""

    def __init__(self, **options):
        super().__init__(**options)
        self.generate(0, 1)  # a bad generator option fails here, before a stage starts any work

    def iterate(self, seed: int, n: int) -> Iterator[Problem]:
        import reasoning_gym  # ~1 s to import; only needed when problems are generated

        try:
            dataset = reasoning_gym.create_dataset(self.name, size=n, seed=seed, **self.options)
        except TypeError as e:  # an unknown option for this generator
            raise ValueError(f"task {self.name}: {e}") from None
        for i in range(n):  # items are built on access: only those taken are paid for
            item = dataset[i]
            meta = {k: v for k, v in item["metadata"].items() if isinstance(v, (int, float, str, list))}
            yield Problem(question=item["question"], answer=str(item["answer"]), metadata=meta)


class NumericTask(ReasoningGymTask):
    """Answers are integers (every gold answer of these generators is one), written as one canonical integer:
    "-12" scores against -12; "0 - 4 - 8", "24/2", "12.0" and "12, -12" score nothing and are not well-formed."""

    answer_form = "integer"

    def check(self, problem: Problem, answer: str) -> float:
        return float(integer_equal(answer, problem.answer))
