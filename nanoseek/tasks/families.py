"""Task families backed by reasoning-gym's generators, each checked by our own bounded verifier.

reasoning-gym supplies the problems (and their gold answers); checking model text never goes through its
scorers, because some of them parse expressions with sympy, which evaluates Python.
"""

from __future__ import annotations

from .base import Problem, Task
from .verify import countdown_ok, integer_equal

# Easy settings by default: the CPU-sized models of the speedrun need a task they can start to solve.
DEFAULTS = {
    "chain_sum": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2),
    "basic_arithmetic": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2),
    "countdown": dict(min_numbers=3, max_numbers=3, min_value=1, max_value=20, min_target=5, max_target=60),
    "gsm_symbolic": {},
    "syllogism": {},
}


class ReasoningGymTask(Task):
    """Problems from `reasoning_gym.create_dataset(name, size, seed, **options)`."""

    def __init__(self, name: str, **options):
        super().__init__(**{**DEFAULTS.get(name, {}), **options})
        self.name = name
        self.generate(0, 1)  # a bad generator option fails here, before a stage starts any work

    def generate(self, seed: int, n: int) -> list[Problem]:
        import reasoning_gym  # ~1 s to import; only needed when problems are generated

        try:
            dataset = reasoning_gym.create_dataset(self.name, size=n, seed=seed, **self.options)
        except TypeError as e:  # an unknown option for this generator
            raise ValueError(f"task {self.name}: {e}") from None
        out = []
        for item in (dataset[i] for i in range(n)):
            meta = {k: v for k, v in item["metadata"].items() if isinstance(v, (int, float, str, list))}
            out.append(Problem(question=item["question"], answer=str(item["answer"]), metadata=meta))
        return out


class NumericTask(ReasoningGymTask):
    """Answers are integers (every gold answer of these generators is one), written as one canonical integer:
    "-12" scores against -12; "0 - 4 - 8", "24/2", "12.0" and "12, -12" score nothing and are not well-formed."""

    answer_form = "integer"

    def check(self, problem: Problem, answer: str) -> float:
        return float(integer_equal(answer, problem.answer))


class ChainSumTask(NumericTask):
    """`a ± b ± …`: the space can be counted exactly (terms and digit counts give disjoint question sets)."""

    def space_size(self) -> int | None:
        o = self.options
        if o.get("allow_negation"):
            return None  # negative operands overlap across digit counts: not a simple product
        values = lambda d: 10 if d == 1 else 9 * 10 ** (d - 1)  # noqa: E731 -- 1 digit includes 0
        return sum(values(d) ** t * 2 ** (t - 1) for t in range(o["min_terms"], o["max_terms"] + 1)
                   for d in range(o["min_digits"], o["max_digits"] + 1))


class CountdownTask(ReasoningGymTask):
    """Any expression that uses each given number once and reaches the target is right (not just the gold one)."""

    answer_form = "expression"

    def check(self, problem: Problem, answer: str) -> float:
        return float(countdown_ok(answer, problem.metadata["numbers"], problem.metadata["target"]))


class YesNoTask(ReasoningGymTask):
    """Logic: the answer is Yes or No (case and a trailing period ignored)."""

    answer_form = "yes/no"

    def check(self, problem: Problem, answer: str) -> float:
        norm = answer.strip().rstrip(".").lower() if isinstance(answer, str) and len(answer) < 20 else ""
        return float(norm in ("yes", "no") and norm == problem.answer.strip().lower())


TASKS = {"chain_sum": ChainSumTask, "basic_arithmetic": NumericTask, "gsm_symbolic": NumericTask,
         "countdown": CountdownTask, "syllogism": YesNoTask}


def get_task(name: str, **options) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name](name, **options)


class StartsWithTask(Task):
    """The sanity ladder's first rung: reward 1 when the completion starts with one of `chars`.

    Nothing to reason about: an RL loop that works drives a behaviour the model shows at some base rate (the
    ladder picks `chars` so that it is ~20%) to ~100% within tens of steps. Not a registered family."""

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

    def generate(self, seed: int, n: int) -> list[Problem]:
        return [Problem(question=self.PROMPT.format(seed + i), answer="") for i in range(n)]

    def prompt(self, problem: Problem) -> str:
        return problem.question

    def check(self, problem: Problem, answer: str) -> float:
        return 0.0

    def score(self, problem: Problem, completion: str) -> dict:
        hit = float(completion[:1] != "" and completion[:1] in self.chars)
        return {"format": 1.0, "accuracy": hit, "partial": 0.0, "answer": completion[:1]}
