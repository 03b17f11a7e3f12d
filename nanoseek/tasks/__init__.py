"""Verifiable tasks: problem generation from a seed, the R1 prompt, answer extraction, rule-based rewards.

One interface serves data generation, RL rewards and evaluation:

    task = get_task("chain_sum", max_terms=2)
    problems = task.problems(seed=0, n=64, split="train")   # the split is decided by the question's content
    prompt = task.prompt(problems[0])                        # the R1 template, ending in "<think>"
    scores = task.score(problems[0], completion)             # {"accuracy", "format", "partial", "answer"}

Families (named as reasoning-gym names them): basic_arithmetic, chain_sum, countdown, gsm_symbolic, syllogism,
one module each, registered in `registry.TASKS` when this package imports its modules (every module in it: adding
a family is adding its file; docs/architecture.md, "Adding a task family", walks through it).
"""

from .base import (HELDOUT_FRACTION, Problem, ProblemStream, Task, Unsolvable, extract_answer, format_ok,
                   is_heldout, problem_key, problem_space, question_from_prompt, split_of)
from .registry import TASKS, get_task, register


def _import_families() -> None:
    """Import every module of this package: a family module registers itself (`@register`), so adding a family is
    adding its file. Modules that register nothing (the shared parents, the test-only StartsWithTask) cost an
    import. The CLI lists the families in the order of their module names."""
    import importlib
    import pkgutil

    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        importlib.import_module(f"{__name__}.{module}")


_import_families()

__all__ = ["HELDOUT_FRACTION", "Problem", "ProblemStream", "Task", "TASKS", "Unsolvable", "get_task", "register",
           "extract_answer", "format_ok", "is_heldout", "problem_key", "problem_space", "question_from_prompt",
           "split_of"]
