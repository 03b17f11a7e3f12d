"""The task interface, the format rules shared by every family, and the held-out split by content.

A problem's split is a property of its question text, not of the seed that generated it: the question is
normalised to a canonical key (`problem_key`) and hashed; a fixed HELDOUT_FRACTION of the hash space is held
out. Every source of training text (the corpus's worked problems, GRPO prompts, rejection sampling, SFT traces)
asks `is_heldout(question)` and leaves those questions out, so a held-out question cannot reach training by
any path, whatever seeds or generator settings produced it. The family whose phrasing a question is computes
its key (`Task.content_key`, found through the registry), and the key merges rewordings of one problem:
arithmetic questions reduce to their expression ("Calculate 3 + 4." and "…arithmetic problem: 3 + 4 =" are
one problem), and a sum of integers to the multiset of its signed terms (`signed_terms`: "4 - 1 + 3" and
"3 + 4 - 1" are one problem, so a reordering of a held-out sum is held out too); countdown questions reduce to
their multiset of numbers and target (its three phrasings and any number order are one problem).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from ..template import r1_prompt
from .registry import family_key
from .verify import answer_in_form

# A completion is what follows the prompt's "<think>": reasoning, "</think>", then exactly one answer block.
_FORMAT = re.compile(r"^(?:(?!<think>|</think>|<answer>|</answer>).)*</think>\s*<answer>"
                     r"((?:(?!<think>|</think>|<answer>|</answer>).)*)</answer>\s*$", re.S)
MAX_COMPLETION_CHARS = 20_000  # longer text is not inspected at all

HELDOUT_FRACTION = 0.1  # share of the key-hash space reserved for evaluation (one constant: every stage agrees)
_SPLIT_SALT = "nanoseek-heldout-v1\0"  # unchanged: only the keys of sums changed (v2 of the split)


def format_ok(completion: str) -> bool:
    """`… </think> <answer> … </answer>` with no other tags and nothing after the answer (R1-Zero's format)."""
    return isinstance(completion, str) and len(completion) <= MAX_COMPLETION_CHARS and bool(_FORMAT.match(completion))


def extract_answer(completion: str) -> str | None:
    """The text inside the single <answer> … </answer> of a well-formed completion, else None."""
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        return None
    m = _FORMAT.match(completion)
    return m.group(1).strip() if m else None


# ----------------------------------------------------------------------------- the split by content


def problem_key(question: str) -> str:
    """The canonical form of a question: what decides its split and its id.

    NFKC, lower case, whitespace collapsed; then the key of the family whose phrasing it is (an arithmetic
    question becomes "sum:" + its signed terms or "arith:" + its expression without spaces, a countdown question
    "countdown:" + its sorted numbers + "=" + target), or the normalised text when no family claims it."""
    text = " ".join(unicodedata.normalize("NFKC", question).lower().split())
    key = family_key(text)
    return text if key is None else key


def signed_terms(expression: str) -> list[int] | None:
    """The sorted multiset of signed terms of an expression made only of integers, + and - (brackets and unary
    minus allowed, their signs distributed): "4 - 1 + 3", "3 + 4 - 1" and "( 4 + -1 ) + 3" all give [-1, 3, 4].
    None for anything with * or /, whose terms do not commute freely. A zero is a zero whatever its sign, so
    "4 - 0" and "4 + 0" are one problem. This is the split key of chain_sum: reorderings and regroupings of one
    sum cannot fall on both sides of the split."""
    tokens = re.findall(r"\d+|[-+()]|\S", expression)
    if not tokens or len(tokens) > 400:
        return None
    terms, signs, sign, expect_operand = [], [1], 1, True
    for tok in tokens:
        if tok.isdigit() and expect_operand:
            terms.append(signs[-1] * sign * int(tok))
            sign, expect_operand = 1, False
        elif tok in "+-" and expect_operand:  # unary sign
            sign *= -1 if tok == "-" else 1
        elif tok in "+-":
            sign, expect_operand = (-1 if tok == "-" else 1), True
        elif tok == "(" and expect_operand:
            signs.append(signs[-1] * sign)
            sign = 1
        elif tok == ")" and not expect_operand and len(signs) > 1:
            signs.pop()
        else:
            return None
    if expect_operand or len(signs) != 1:
        return None
    return sorted(abs(t) if t == 0 else t for t in terms)


def _digest(key: str) -> bytes:
    return hashlib.sha256((_SPLIT_SALT + key).encode()).digest()


def is_heldout_key(key: str) -> bool:
    return int.from_bytes(_digest(key)[:8], "big") < HELDOUT_FRACTION * 2**64


def is_heldout(question: str) -> bool:
    """True if the question belongs to the held-out split (HELDOUT_FRACTION of the key-hash space)."""
    return is_heldout_key(problem_key(question))


def split_of(question: str) -> str:
    return "heldout" if is_heldout(question) else "train"


def question_from_prompt(prompt: str) -> str | None:
    """The last user question of an R1-template prompt (`…\\nUser: QUESTION\\nAssistant: <think>`), or None."""
    head, sep, _ = ("\n" + prompt).rpartition("\nAssistant:")  # a prompt may start with its first "User: "
    if not sep or "\nUser: " not in head:
        return None
    return head.rpartition("\nUser: ")[2].strip()


# ----------------------------------------------------------------------------- problems and tasks


@dataclass
class Problem:
    question: str
    answer: str  # the gold answer as text
    metadata: dict = field(default_factory=dict)
    id: str = ""  # "<task>/<hash of the problem key>": the same question has the same id in every run


class ProblemStream:
    """The problems of one split from a run's generator stream, each question at most once while unseen ones
    can still be found.

    Raw item j of stream `seed` comes from generator seed seed·2^40 + j (reasoning-gym seeds item i of a
    dataset with Random(dataset_seed + i)), so two streams never share a generator state and consecutive
    `take` calls never overlap. A split's space is treated as exhausted after `patience` consecutive questions
    of that split that were all seen before; `take` then repeats questions in generator order (counted in
    `repeats`) or, with allow_repeats=False, raises."""

    CHUNK = 256

    def __init__(self, task: "Task", seed: int, split: str, patience: int = 2000):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be train or heldout, got {split!r}")
        if seed < 0:
            raise ValueError(f"problem seed must be >= 0, got {seed}")
        self.task, self.seed, self.split, self.patience = task, seed, split, patience
        self.seen: set[str] = set()
        self.repeats = 0  # questions handed out again because the split's space ran out
        self.draws = 0  # raw generator items consumed
        self.exhausted = False
        self._buffer: list[Problem] = []

    def _raw(self) -> Problem:
        if not self._buffer:
            start = self.seed * 2**40 + self.draws
            self._buffer = self.task.generate(start, self.CHUNK)[::-1]
        self.draws += 1
        return self._buffer.pop()

    def take(self, n: int, allow_repeats: bool = True) -> list[Problem]:
        out = []
        while len(out) < n:
            p, key = self._next_unseen(n, allow_repeats)
            self.seen.add(key)
            p.id = f"{self.task.name}/{_digest(key).hex()[:12]}"
            out.append(p)
        return out

    def _next_unseen(self, n: int, allow_repeats: bool) -> tuple[Problem, str]:
        misses = other = 0
        while True:
            p = self._raw()
            key = problem_key(p.question)
            if ("heldout" if is_heldout_key(key) else "train") != self.split:
                other += 1  # the other split's questions are never candidates; only a split with none ends here
                if other < 100 * self.patience:
                    continue
                raise ValueError(f"task {self.task.name} {self.task.options}: no {self.split} problem in "
                                 f"{other} draws; use larger task settings")
            if key not in self.seen:
                return p, key
            if self.exhausted:  # known to be exhausted: repeats come in generator order, no search
                self.repeats += 1
                return p, key
            misses += 1
            if misses >= self.patience:
                if not allow_repeats:
                    raise ValueError(
                        f"task {self.task.name} {self.task.options}: only {len(self.seen)} distinct {self.split} "
                        f"problems found in {self.draws} draws, fewer than the {n} asked for; use larger task "
                        "settings (nanoseek.tasks.problem_space measures a setting's space)")
                self.exhausted = True
                self.repeats += 1
                return p, key


class Unsolvable(Exception):
    """This problem has no exact worked solution (e.g. an inexact division, or a gold answer its own solution
    contradicts): the corpus and the cold start leave it out."""


class Task:
    """A family of verifiable problems. A family module declares, as class attributes and methods:

    - `name`: its name in get_task, problem ids and the CLI;
    - `knobs`: the generator options that set difficulty, at the values `get_task` starts from (the first rung of
      a curriculum; the CPU speedrun's models need easy ones); options not named keep the generator's defaults,
      which are what the class gives when built directly (the corpus's worked problems span that whole range);
    - `iterate`: the raw problems (either split) of a generator seed, one at a time;
    - `answer_form` (verify.ANSWER_FORMS) and `check`: an answer not in the form is not well-formed and scores
      0; one in it scores `check`'s accuracy;
    - `content_key`: the split key of its questions, merging rewordings of one problem;
    - `solve` (optional): the exact worked solution the corpus and the cold start train on;
    - `space_size` (optional): the exact size of a setting's problem space, where it can be counted.
    `registry.register` makes it a family; tasks/chain_sum.py is the model to copy."""

    name = "task"
    answer_form = "integer"
    knobs: dict = {}  # read only: get_task copies it

    def __init__(self, **options):
        self.options = options

    def iterate(self, seed: int, n: int) -> Iterator[Problem]:
        """The n raw problems (either split) of generator seed `seed`, built one at a time (a consumer that stops
        early, as the corpus does, pays only for what it took)."""
        raise NotImplementedError

    def generate(self, seed: int, n: int) -> list[Problem]:
        """n raw problems (either split) from generator seed `seed`."""
        return list(self.iterate(seed, n))

    def check(self, problem: Problem, answer: str) -> float:
        """Accuracy in [0, 1] of an extracted answer (must never raise)."""
        raise NotImplementedError

    @staticmethod
    def content_key(text: str) -> str | None:
        """The split key of `text` (a question normalised by `problem_key`: NFKC, lower case, single spaces) if it
        is in one of this family's phrasings, else None. Every rewording of one problem must give one key, or a
        reworded held-out question could be trained on. None everywhere (the default) keys questions by text.
        Phrasings of different families must be disjoint: the first family that claims a text keys it."""
        return None

    def solve(self, problem: Problem) -> tuple[str, str]:
        """(worked reasoning, answer) of a problem: exact steps that reach the gold answer, the text pretraining
        documents and cold-start examples hold. Raise Unsolvable for a problem without one."""
        raise Unsolvable(f"task {self.name} writes no worked solutions")

    def step_rewards(self, problem: Problem, completion: str) -> list[tuple[int, float]] | None:
        """Process rewards: (end offset in `completion`, reward) of each reasoning step in order, the last step the
        answer block with the outcome's accuracy, for GRPO with process supervision (DeepSeekMath §4.1.3). None
        (the default): the family judges outcomes only."""
        return None

    def space_size(self) -> int | None:
        """The exact number of distinct problem keys the settings can produce, where it can be counted."""
        return None

    def stream(self, seed: int, split: str = "train", patience: int = 2000) -> ProblemStream:
        return ProblemStream(self, seed, split, patience)

    def problems(self, seed: int, n: int, split: str = "train") -> list[Problem]:
        """n distinct problems of `split` (ValueError if the split's space holds fewer)."""
        return self.stream(seed, split).take(n, allow_repeats=False)

    def prompt(self, problem: Problem) -> str:
        return r1_prompt(problem.question)

    def score(self, problem: Problem, completion: str) -> dict:
        """Reward components of one completion: format (0/1: the R1 tags and an answer in the task's form),
        accuracy (0..1), partial (1 if a well-formed answer was given). Reward, rejection sampling and evaluation
        all score through here, so they share one checker."""
        answer = extract_answer(completion)
        try:
            formed = answer is not None and answer_in_form(answer, self.answer_form)
            accuracy = float(self.check(problem, answer)) if formed else 0.0
        except Exception:  # a verifier bug must not crash training: a wrong answer, never an exception
            formed, accuracy = False, 0.0
        return {"format": float(formed), "accuracy": accuracy, "partial": float(formed), "answer": answer}


def combine(scores: dict, w_accuracy: float = 1.0, w_format: float = 0.0, partial_credit: float = 0.0) -> float:
    """Scalar reward: w_acc·accuracy + w_fmt·format, plus TinyZero's partial credit for a wrong but present
    answer (0.1 for a parsable wrong answer, 1 for a right one).

    The default is accuracy alone: a malformed completion has no extractable answer, so the format is already
    a precondition of any reward. A separate format reward is constant once the format is learned and, under
    per-group std scaling, turns format-only differences into full-size advantages (SimpleRL-Zoo, arXiv
    2503.18892: the format reward must not dominate)."""
    reward = w_accuracy * scores["accuracy"] + w_format * scores["format"]
    if partial_credit and scores["accuracy"] == 0:
        reward += partial_credit * scores["partial"]
    return reward


def problem_space(task: Task, draws: int = 20_000, train_draws: int = 0, seed: int = 0) -> dict:
    """How large the task's problem space is, and how much of its training split `train_draws` draws cover.

    From `draws` raw generator draws: `distinct` keys seen; `effective_size` = 1 / P(two draws coincide)
    (= the size for a uniform generator; None when no two draws coincided, then `effective_size_lower_bound`
    gives the 95% bound C(draws, 2)/3); `exact_size` where the family can count it. With train_draws, a fresh
    training stream takes that many problems (repeats allowed, as GRPO does) and reports how many distinct
    questions training would see."""
    stream = task.stream(seed, "train")
    keys = Counter(problem_key(stream._raw().question) for _ in range(draws))
    pairs = sum(c * (c - 1) // 2 for c in keys.values())
    all_pairs = draws * (draws - 1) // 2
    out = {"task": task.name, "options": dict(task.options), "draws": draws, "distinct": len(keys),
           "distinct_heldout": sum(is_heldout_key(k) for k in keys), "heldout_fraction": HELDOUT_FRACTION,
           "exact_size": task.space_size(), "effective_size": all_pairs / pairs if pairs else None,
           "effective_size_lower_bound": None if pairs else all_pairs / 3}
    if train_draws:
        train = task.stream(seed + 1, "train")
        train.take(train_draws)
        out.update(train_draws=train_draws, train_distinct=len(train.seen), train_repeats=train.repeats)
    return out
