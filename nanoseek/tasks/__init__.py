"""Verifiable tasks: problem generation from a seed, the R1 prompt, answer extraction, rule-based rewards.

One interface serves data generation, RL rewards and evaluation:

    task = get_task("chain_sum", max_terms=2)
    problems = task.problems(seed=0, n=64, split="train")   # the split is decided by the question's content
    prompt = task.prompt(problems[0])                        # the R1 template, ending in "<think>"
    scores = task.score(problems[0], completion)             # {"accuracy", "format", "partial", "answer"}

Families (named as reasoning-gym names them): chain_sum, basic_arithmetic, gsm_symbolic, countdown, syllogism,
one module each, registered in `registry.TASKS` when imported below (docs/architecture.md, "Adding a task
family", walks through adding one).
"""

from .base import (HELDOUT_FRACTION, Problem, ProblemStream, Task, Unsolvable, extract_answer, format_ok,
                   is_heldout, problem_key, problem_space, question_from_prompt, split_of)
from .registry import TASKS, get_task, register

# Importing a family module registers it: this line lists the families that ship, in the order the CLI shows.
from . import chain_sum, basic_arithmetic, gsm_symbolic, countdown, syllogism  # noqa: F401  isort: skip

__all__ = ["HELDOUT_FRACTION", "Problem", "ProblemStream", "Task", "TASKS", "Unsolvable", "get_task", "register",
           "extract_answer", "format_ok", "is_heldout", "problem_key", "problem_space", "question_from_prompt",
           "split_of"]
