"""The task interface and the format rules shared by every family."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..template import r1_prompt

# A completion is what follows the prompt's "<think>": reasoning, "</think>", then exactly one answer block.
_FORMAT = re.compile(r"^(?:(?!<think>|</think>|<answer>|</answer>).)*</think>\s*<answer>"
                     r"((?:(?!<think>|</think>|<answer>|</answer>).)*)</answer>\s*$", re.S)
MAX_COMPLETION_CHARS = 20_000  # longer text is not inspected at all


def format_ok(completion: str) -> bool:
    """`… </think> <answer> … </answer>` with no other tags and nothing after the answer (R1-Zero's format)."""
    return isinstance(completion, str) and len(completion) <= MAX_COMPLETION_CHARS and bool(_FORMAT.match(completion))


def extract_answer(completion: str) -> str | None:
    """The text inside the single <answer> … </answer> of a well-formed completion, else None."""
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        return None
    m = _FORMAT.match(completion)
    return m.group(1).strip() if m else None


@dataclass
class Problem:
    question: str
    answer: str  # the gold answer as text
    metadata: dict = field(default_factory=dict)
    id: str = ""


class Task:
    """A family of verifiable problems. Subclasses implement `generate` and `check`."""

    name = "task"
    heldout_offset = 10**9  # held-out problems come from generator seeds training never uses

    def __init__(self, **options):
        self.options = options

    def generate(self, seed: int, n: int) -> list[Problem]:
        raise NotImplementedError

    def check(self, problem: Problem, answer: str) -> float:
        """Accuracy in [0, 1] of an extracted answer (must never raise)."""
        raise NotImplementedError

    def problems(self, seed: int, n: int, split: str = "train") -> list[Problem]:
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be train or heldout, got {split!r}")
        base = seed + (self.heldout_offset if split == "heldout" else 0)
        out = self.generate(base, n)
        for i, p in enumerate(out):
            p.id = f"{self.name}/{split}/{seed}/{i}"
        return out

    def prompt(self, problem: Problem) -> str:
        return r1_prompt(problem.question)

    def score(self, problem: Problem, completion: str) -> dict:
        """Reward components of one completion: format (0/1), accuracy (0..1), partial (1 if an answer was given)."""
        answer = extract_answer(completion)
        try:
            accuracy = float(self.check(problem, answer)) if answer is not None else 0.0
        except Exception:  # a verifier bug must not crash training: a wrong answer, never an exception
            accuracy = 0.0
        return {"format": float(answer is not None), "accuracy": accuracy,
                "partial": float(answer is not None and answer != ""), "answer": answer}


def combine(scores: dict, w_accuracy: float = 1.0, w_format: float = 0.1, partial_credit: float = 0.0) -> float:
    """Scalar reward: w_acc·accuracy + w_fmt·format, plus TinyZero's partial credit for a wrong but present
    answer (reference r1-grpo §2.3: 0.1 for a parsable wrong answer, 1 for a right one)."""
    reward = w_accuracy * scores["accuracy"] + w_format * scores["format"]
    if partial_credit and scores["accuracy"] == 0:
        reward += partial_credit * scores["partial"]
    return reward
