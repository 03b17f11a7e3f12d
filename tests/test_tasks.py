"""Tasks and verifiers: right answers score 1, wrong or malformed ones 0, and adversarial text never raises or
takes more than 50 ms."""

import contextlib
import signal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoseek.tasks import (HELDOUT_FRACTION, TASKS, Problem, Task, Unsolvable, extract_answer, format_ok, get_task,
                            is_heldout, problem_key, problem_space, question_from_prompt, register)
from nanoseek.tasks.base import combine, is_heldout_key
from nanoseek.tasks.starts_with import StartsWithTask
from nanoseek.tasks.verify import countdown_ok, parse_expression, parse_number
from nanoseek.template import r1_prompt

GOOD = " let me add. </think> <answer> {} </answer>"


@pytest.fixture(scope="module")
def problems():
    return {name: get_task(name).problems(seed=3, n=5) for name in TASKS}


# a wrong answer written in each declared form: well formed, so format 1 and accuracy 0
WRONG_IN_FORM = {"integer": lambda a: "12345678", "expression": lambda a: "1 + 1",
                 "yes/no": lambda a: "No" if a.strip().rstrip(".").lower() == "yes" else "Yes"}


@pytest.mark.parametrize("name", list(TASKS))
def test_gold_answers_score_one_and_wrong_ones_zero(name, problems):
    task = get_task(name)
    for p in problems[name]:
        assert task.score(p, GOOD.format(p.answer)) == {"format": 1.0, "accuracy": 1.0, "partial": 1.0,
                                                         "answer": p.answer}
        wrong = task.score(p, GOOD.format(WRONG_IN_FORM[task.answer_form](p.answer)))
        assert wrong["accuracy"] == 0.0 and wrong["format"] == 1.0  # well formed, wrong
        assert task.score(p, f"no tags {p.answer}")["accuracy"] == 0.0  # right number, wrong format: no credit


SMALL = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)  # 200 questions: the old speedrun task


@pytest.mark.parametrize("name", list(TASKS))
def test_the_split_is_decided_by_content(name):
    task = get_task(name)
    n = 3 if name == "countdown" else 40
    train = [p for seed in (0, 1) for p in task.problems(seed, n)]
    held = [p for seed in (0, 1) for p in task.problems(seed, n, split="heldout")]
    assert not any(is_heldout(p.question) for p in train) and all(is_heldout(p.question) for p in held)
    assert not {problem_key(p.question) for p in train} & {problem_key(p.question) for p in held}
    ids = {}
    for p in train + held:  # ids name the content: one question, one id
        assert p.id.startswith(f"{name}/") and ids.setdefault(problem_key(p.question), p.id) == p.id
    assert len({p.id for p in held[:n]}) == n  # distinct within a call


def test_ids_and_splits_do_not_depend_on_the_seed():
    task = get_task("chain_sum", **SMALL)
    a, b = task.stream(0, "train"), task.stream(7, "train")
    first = {problem_key(p.question): p.id for p in a.take(100)}
    second = {problem_key(p.question): p.id for p in b.take(100)}
    shared = first.keys() & second.keys()
    assert len(shared) > 20 and all(first[k] == second[k] for k in shared)


def test_heldout_fraction_of_a_large_space():
    keys = [f"question number {i}" for i in range(20_000)]
    share = sum(map(is_heldout, keys)) / len(keys)
    assert abs(share - HELDOUT_FRACTION) < 0.01


def test_rewordings_of_one_problem_share_a_key():
    chain = "State the final answer to the following arithmetic problem: 3 + 4 ="
    assert problem_key(chain) == problem_key("Calculate 3 + 4.") == problem_key("What is 3+4?") == "sum:+3,+4"
    assert problem_key(chain) != problem_key("Calculate 3 + 4 - 1.")
    assert problem_key("Calculate 3 * 4.") == "arith:3*4"  # products do not commute with their neighbours' signs
    fmt = "\n\nFinal answer format instructions:\n1. Provide your solution as a arithmetic expression."
    a = "Using all the numbers 3, 5, 7, create an expression that equals 15.\nYou can only use each number once."
    b = "Find a way to make 15 using all of these numbers: 7, 3, 5.\nEach number can only be used once."
    c = "Calculate 15 using all of these numbers: 5, 7, 3.\nEach number may be used at most once."
    assert problem_key(a + fmt) == problem_key(b + fmt) == problem_key(c) == "countdown:3,5,7=15"
    assert problem_key("  Is   THIS a cat? ") == problem_key("is this a cat?")


def test_streams_hand_out_fresh_problems_until_the_space_runs_out():
    task = get_task("chain_sum", **SMALL)
    assert task.space_size() == 200
    stream = task.stream(0, "train", patience=500)
    batches = [stream.take(8) for _ in range(40)]
    keys = [problem_key(p.question) for batch in batches for p in batch]
    space = {problem_key(f"Calculate {a} {op} {b}.") for a in range(10) for b in range(10) for op in "+-"}
    n_train = sum(not is_heldout_key(k) for k in space)  # distinct problems: a + b and b + a are one
    assert len(set(keys[:n_train])) == n_train  # no repeats before the space is exhausted
    assert stream.repeats == len(keys) - n_train > 0 and stream.exhausted
    with pytest.raises(ValueError, match="too small|fewer than"):
        task.problems(0, 100, split="heldout")  # only ~20 of the 200 questions are held out


def test_problem_space_report():
    r = problem_space(get_task("chain_sum", **SMALL), draws=4000, train_draws=300)
    assert r["exact_size"] == 200 and r["distinct"] == 145 and 100 < r["effective_size"] < 200
    assert r["train_distinct"] == r["distinct"] - r["distinct_heldout"] and r["train_repeats"] == 300 - r["train_distinct"]
    big = problem_space(get_task("gsm_symbolic"), draws=500)
    assert big["distinct"] > 490 and big["exact_size"] is None


def test_question_from_prompt():
    q = "Find a way to make 15 using all of these numbers: 7, 3, 5.\nEach number can only be used once."
    assert question_from_prompt(r1_prompt(q)) == q
    assert question_from_prompt("no template here") is None


def test_format_rules():
    assert format_ok(" x </think> <answer> 4 </answer>")
    assert format_ok("</think><answer>4</answer>\n")
    assert not format_ok(" x </think> <answer> 4 </answer> extra")
    assert not format_ok(" x </think> <answer> 4 </answer><answer> 5 </answer>")  # two answers
    assert not format_ok(" <think> x </think> <answer> 4 </answer>")  # a nested think
    assert not format_ok(" x <answer> 4 </answer>")
    assert extract_answer(" a </think> <answer>  7 </answer>") == "7"
    assert extract_answer("</think> <answer> </answer>") == ""


def test_numbers_and_expressions():
    assert parse_number("1,234") == 1234 and parse_number("$7.50") == parse_number("7.5")
    assert parse_number("\\frac{7}{2}") == parse_number("3.5") == parse_number("7/2")
    assert parse_number("9^9^9^9") is None and parse_number("1/0") is None and parse_number("1e400") is None
    assert parse_number("9" * 13) is None  # over 12 digits: refused, not computed
    assert parse_expression("(" * 17 + "1" + ")" * 17) is None  # nesting limit
    assert countdown_ok("(10 - 4) * 5 + 3", [10, 4, 5, 3], 33)
    assert not countdown_ok("10 * 5 - 4", [10, 4, 5, 3], 46)  # must use every number
    assert not countdown_ok("10 * 5 - 4 - 4", [10, 4, 5], 42)  # and each once
    assert not countdown_ok("10 ** 5", [10, 5], 100000)


def test_partial_credit_and_weights():
    s = {"format": 1.0, "accuracy": 0.0, "partial": 1.0}
    assert combine(s) == 0.0  # the default reward is accuracy alone
    assert combine(s, 1.0, 0.1) == pytest.approx(0.1)
    assert combine(s, 1.0, 0.0, partial_credit=0.1) == pytest.approx(0.1)
    assert combine({"format": 1.0, "accuracy": 1.0, "partial": 1.0}, 1.0, 0.1, 0.1) == pytest.approx(1.1)


ADVERSARIAL = st.one_of(
    st.text(max_size=300),
    st.text(alphabet="0123456789+-*/()^.{}\\frac e", max_size=300),
    st.builds(lambda a, b: f"{a}</think> <answer>{b}</answer>", st.text(max_size=200), st.text(max_size=200)),
    st.builds(lambda n: "(" * n + "1" + ")" * n, st.integers(0, 500)),
    st.builds(lambda n: "9" * n, st.integers(1, 5000)),
    st.builds(lambda n: "9^" * n + "9", st.integers(1, 200)),
    st.builds(lambda n: "<answer>" * n, st.integers(1, 3000)),
)


@pytest.fixture(scope="module")
def warm_tasks(problems):
    return {name: (get_task(name), problems[name][0]) for name in TASKS}


class _Runaway(Exception):
    pass


@contextlib.contextmanager
def cpu_budget(seconds: float):
    """Raise _Runaway once this process has used `seconds` of CPU time inside the block (ITIMER_PROF counts
    this process's CPU time, not the wall clock, so a loaded machine does not trip it; a verifier that expands
    9^9^9 or a 5,000-digit power would)."""
    def stop(signum, frame):
        raise _Runaway

    old = signal.signal(signal.SIGPROF, stop)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=ADVERSARIAL)
def test_verifiers_never_raise_and_stay_bounded(text, warm_tasks):
    for name, (task, problem) in warm_tasks.items():
        for completion in (text, GOOD.format(text)):
            try:
                with cpu_budget(2.0):  # ~1,000x what a bounded verifier needs here
                    scores = task.score(problem, completion)
            except _Runaway:
                pytest.fail(f"{name}: the verifier ran away on {completion[:80]!r}")
            assert scores["accuracy"] in (0.0, 1.0) and scores["format"] in (0.0, 1.0)


CHAIN = "State the final answer to the following arithmetic problem: {} ="


def test_reorderings_of_a_sum_share_its_split():
    """The split key of a sum is the multiset of its signed terms: a reordered or regrouped held-out question is
    held out too (a split by text put 387 of 409 held-out 3-term sums next to a training reordering)."""
    import itertools
    import random

    from nanoseek.tasks.base import signed_terms

    assert signed_terms("4 - 1 + 3") == signed_terms("3 + 4 - 1") == signed_terms("( 4 + -1 ) + 3") == [-1, 3, 4]
    assert signed_terms("4 - 0") == signed_terms("4 + 0") == [0, 4]
    assert signed_terms("4 - ( 3 - 2 )") == [-3, 2, 4] and signed_terms("3 * 4") is None
    assert signed_terms("4 -") is None and signed_terms("( 4") is None and signed_terms("4 )") is None
    held = [p for p in get_task("chain_sum", min_terms=4, max_terms=4, min_digits=1, max_digits=1).problems(
        0, 30, split="heldout")]
    rng = random.Random(0)
    for p in held:
        terms = p.metadata["expression"].replace("- ", "-").replace("+ ", "").split()
        for order in itertools.islice(itertools.permutations(terms), 24):
            if order[0].startswith("-"):
                continue  # chain_sum's first term is never negative; every other order is a question it can ask
            text = " ".join(order[:1] + tuple(f"- {t[1:]}" if t.startswith("-") else f"+ {t}" for t in order[1:]))
            assert is_heldout(CHAIN.format(text)), (p.question, text)
            assert is_heldout(f"Calculate {text}.")  # and in basic_arithmetic's wording
        shuffled = list(terms)
        rng.shuffle(shuffled)
        grouped = f"( {shuffled[0]} + {shuffled[1]} )" + "".join(f" + {t}" for t in shuffled[2:])
        assert is_heldout(f"Calculate {grouped.replace('+ -', '- ')}.")


@pytest.mark.parametrize("answer, right", [
    ("-12", True), (" -12 ", True),
    ("0 - 4 - 8", False),  # the question's own expression copied back
    ("4+9-1", False), ("24/2", False), ("-24/2", False), ("(-12)", False), ("\\frac{-24}{2}", False),
    ("-12, 12", False), ("-12 -12", False), ("-12.0", False), ("+-12", False), ("-012", False), ("- 12", False),
    ("-12.", False), ("12", False), ("", False),
])
def test_integer_answers_score_only_as_one_canonical_integer(answer, right):
    """The checker that serves reward, rejection sampling and evaluation: an expression, an echo of the question or
    several numbers is neither right nor well-formed, even when it evaluates to the gold answer."""
    problem = Problem(question=CHAIN.format("0 - 4 - 8"), answer="-12")
    for name in ("chain_sum", "basic_arithmetic", "gsm_symbolic"):
        scores = get_task(name).score(problem, GOOD.format(answer))
        assert scores["accuracy"] == float(right)
        wellformed = right or answer.strip() == "12"
        assert scores["format"] == float(wellformed) and scores["partial"] == float(wellformed)


def test_every_family_declares_an_answer_form_that_its_gold_answers_take():
    from nanoseek.tasks.verify import ANSWER_FORMS, answer_in_form

    for name in TASKS:
        task = get_task(name)
        assert task.answer_form in ANSWER_FORMS
        for p in task.problems(seed=5, n=3 if name == "countdown" else 20):
            assert answer_in_form(p.answer, task.answer_form), (name, p.answer)


# ----------------------------------------------------------------------------- the family registry

# What the code before the one-module-per-family redesign produced for 300 raw problems of each family at its
# get_task defaults (generator seed 20261207): hashes of the problems, of their split keys and of the sorted ids of
# the held-out ones. A change here moves problems between the splits (or changes what a family generates).
PINNED_SPLIT = {
    "chain_sum": dict(gen="574045136286ff67", keys="f51ae215c98952ea", n_keys=275, n_held=36,
                      held="e8740ab2c63510f3"),
    "basic_arithmetic": dict(gen="78deead6610a7d38", keys="83ec0061628ad707", n_keys=292, n_held=40,
                             held="ab37c0f59837f344"),
    "basic_arithmetic format_style=natural": dict(gen="c0238269d3dcb23e", keys="83ec0061628ad707", n_keys=292,
                                                  n_held=40, held="ab37c0f59837f344"),  # its rewordings: same keys
    "gsm_symbolic": dict(gen="856c362749d07359", keys="bc25c33a7d28576f", n_keys=299, n_held=27,
                         held="97653a93d45d0a7a"),
    "countdown": dict(gen="f3db76c097a00190", keys="d45ee16c04b53f79", n_keys=294, n_held=31,
                      held="8e382d737be84198"),
    "syllogism": dict(gen="eb8ff15579ff66a3", keys="fe448d54e5b206a1", n_keys=300, n_held=33,
                      held="ccbec826d21e1271"),
}


def _h(obj) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name, options", [(n, {}) for n in TASKS] + [("basic_arithmetic",
                                                                       {"format_style": "natural"})])
def test_generation_and_split_match_the_code_before_the_registry(name, options):
    from nanoseek.tasks.base import _digest

    problems = get_task(name, **options).generate(20261207, 300)
    keys = [problem_key(p.question) for p in problems]
    held = sorted({_digest(k).hex()[:12] for k in keys if is_heldout_key(k)})
    got = dict(gen=_h([[p.question, p.answer, p.metadata] for p in problems]), keys=_h(keys), n_keys=len(set(keys)),
               n_held=len(held), held=_h(held))
    assert got == PINNED_SPLIT[" ".join([name] + [f"{k}={v}" for k, v in options.items()])]


def test_keys_of_arbitrary_text_match_the_code_before_the_registry():
    """20,000 strings spliced from every family's phrasings, numbers and operators (with full-width letters and
    no-break spaces) keep the keys the one function with every pattern gave them."""
    import random

    frags = ["calculate ", "Calculate ", "what is ", "solve ", "compute ", "evaluate: ", "State the final answer to "
             "the following arithmetic problem: ", "using all the numbers ", "Using all the numbers ", ", create an "
             "expression that equals ", "find a way to make ", " using all of these numbers: ", "3", "14", " + ",
             " - ", "*", "/", "(", ")", ".", "?", "=", " ", "\n", ",", "7, 3, 5", "-0", "ＣＡＬＣＵＬＡＴＥ ", "\u00a0"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(frags) for _ in range(rng.randint(1, 12))) for _ in range(20_000)]
    assert _h([problem_key(t) for t in texts]) == "13ff7b2608af6390"


def test_each_question_is_keyed_by_the_one_family_whose_phrasing_it_is():
    """Phrasings are disjoint, so the order families are tried in cannot change a key."""
    import unicodedata

    for name, cls in TASKS.items():
        for p in get_task(name).generate(11, 3 if name == "countdown" else 40):
            text = " ".join(unicodedata.normalize("NFKC", p.question).lower().split())
            claims = [other for other, c in TASKS.items() if c.content_key(text) is not None]
            assert claims in ([name], []), (name, p.question, claims)
            assert problem_key(p.question) == (cls.content_key(text) or text)


def test_worked_solutions_are_the_families_own_and_reach_the_gold_answer():
    solved = [name for name, cls in TASKS.items() if cls.solve is not Task.solve]
    assert sorted(solved) == ["basic_arithmetic", "chain_sum", "countdown", "gsm_symbolic"]
    for name in solved:
        task, done = get_task(name), 0
        for p in task.generate(13, 3 if name == "countdown" else 40):
            try:
                think, answer = task.solve(p)
            except Unsolvable:
                continue
            done += 1
            assert answer == p.answer and think.strip()
            assert task.score(p, f"{think} </think> <answer> {answer} </answer>")["accuracy"] == 1.0
        assert done >= (2 if name == "countdown" else 20), name


class ToyDouble(Task):
    """A family defined outside the library: "Double 7." (or "What is twice 7?"), answer 14."""

    name = "toy_double"
    answer_form = "integer"
    knobs = dict(max_value=500)  # get_task's default; the class's own default is the generator's full range

    def __init__(self, max_value: int = 10_000):  # its own named parameter, like StartsWithTask(chars)
        super().__init__(max_value=max_value)

    def iterate(self, seed, n):
        import random

        for i in range(n):
            rng = random.Random(seed + i)
            value = rng.randint(0, self.options["max_value"])
            question = f"Double {value}." if rng.random() < 0.5 else f"What is twice {value}?"
            yield Problem(question=question, answer=str(2 * value), metadata={"value": value})

    def check(self, problem, answer):
        return float(answer == problem.answer)

    @staticmethod
    def content_key(text):
        import re

        m = re.fullmatch(r"double (\d+)\.", text) or re.fullmatch(r"what is twice (\d+)\?", text)
        return f"double:{int(m.group(1))}" if m else None

    def solve(self, problem):
        value = problem.metadata["value"]
        return f"Twice {value} is {value} + {value} = {2 * value}.", problem.answer


@pytest.fixture
def toy():
    """ToyDouble and StartsWithTask registered for one test, and gone after it."""
    before = dict(TASKS)
    register(ToyDouble)
    register(StartsWithTask)
    yield ToyDouble
    TASKS.clear()
    TASKS.update(before)


def test_a_family_defined_in_a_test_registers_and_works_everywhere(toy):
    from nanoseek import corpus

    task = get_task("toy_double")
    assert task.options == {"max_value": 500} and get_task("toy_double", max_value=9).options == {"max_value": 9}
    with pytest.raises(ValueError, match="colour"):
        get_task("toy_double", colour="red")
    # the split: its own key, so a rewording of a held-out question is held out too
    assert problem_key("Double 7.") == problem_key("what is  TWICE 7?") == "double:7"
    held = task.problems(0, 4, split="heldout")
    assert all(p.id.startswith("toy_double/") for p in held)
    for p in held:
        value = p.metadata["value"]
        assert is_heldout(f"Double {value}.") and is_heldout(f"What is twice {value}?")
    train = task.problems(0, 30)
    assert not {problem_key(p.question) for p in train} & {problem_key(p.question) for p in held}
    assert task.score(train[0], GOOD.format(train[0].answer))["accuracy"] == 1.0
    # the corpus: worked solutions and pretraining documents of training-split questions only
    rows = corpus.worked_solutions("toy_double", 5, seed=1)
    assert len(rows) == 5 and all("Twice" in r["completion"] and not is_heldout(r["question"]) for r in rows)
    docs = corpus.reasoning_documents(0, 12, mixture={"toy_double": 0.5, "chain_sum": 0.5})
    toy_docs = [d for d in docs if "Twice" in d]
    assert len(docs) == 12 and 0 < len(toy_docs) < 12
    assert not any(is_heldout(question_from_prompt(d.split("<think>")[0] + "<think>")) for d in toy_docs)
    # a constructor with its own required parameter
    assert get_task("starts_with", chars="ab").chars == "ab"
    with pytest.raises(ValueError, match="chars"):
        get_task("starts_with")


def test_registration_refuses_clashes_and_bad_declarations(toy):
    register(ToyDouble)  # the same class again: nothing happens
    clash = type("Clash", (ToyDouble,), {})
    with pytest.raises(ValueError, match="already registered"):
        register(clash)
    with pytest.raises(ValueError, match="answer_form"):
        register(type("BadForm", (ToyDouble,), {"name": "bad_form", "answer_form": "essay"}))
    with pytest.raises(ValueError, match="identifier"):
        register(type("BadName", (ToyDouble,), {"name": "a/b"}))
    with pytest.raises(ValueError, match="writes no worked solutions"):
        from nanoseek import corpus

        corpus.worked_solutions("syllogism", 1)


def test_the_registry_holds_exactly_the_shipped_families():
    """Every module of nanoseek/tasks that declares a family registers it by being there (no list to edit)."""
    assert list(TASKS) == ["basic_arithmetic", "chain_sum", "countdown", "gsm_symbolic", "syllogism"]
    assert "toy_double" not in TASKS  # the fixture's family is gone after its test


def test_chain_sum_judges_each_line_of_a_worked_solution():
    """The process reward: a right line scores 1, a wrong one 0, and the line after a wrong one is judged from
    what the wrong line wrote, so each error costs one step; the answer block carries the outcome."""
    from nanoseek.tasks.chain_sum import worked_solution
    from nanoseek.template import r1_completion

    task = get_task("chain_sum", min_terms=4, max_terms=4, min_digits=1, max_digits=1)
    problem = next(p for p in task.problems(0, 20) if p.metadata["expression"] == "0 - 4 - 8 - 7")
    gold = r1_completion(*worked_solution(problem.question))
    steps = task.step_rewards(problem, gold)
    assert [r for _, r in steps] == [1.0] * 6 and steps[-1][0] == len(gold)
    assert [gold[end - 1] for end, _ in steps[:-2]] == ["\n"] * 4  # a line's step ends after its newline
    sums = gold.replace("-4 - 8 = -12, so it becomes -12 - 7", "-4 - 8 = -13, so it becomes -13 - 7")
    sums = sums.replace("-12 - 7 = -19.\nSo the result is -19", "-13 - 7 = -20.\nSo the result is -20")
    assert [r for _, r in task.step_rewards(problem, sums.replace("> -19 <", "> -20 <"))] == [1, 1, 0, 1, 1, 0]
    copy = gold.replace("so it becomes -4 - 8 - 7", "so it becomes -4 - 7 - 7")
    assert [r for _, r in task.step_rewards(problem, copy)] == [1, 0, 0, 1, 1, 1]  # -4 - 8 no longer follows
    cut = gold[:gold.index("Then -12")]
    assert [r for _, r in task.step_rewards(problem, cut)] == [1, 1, 1, 0]  # no answer block: no outcome step
    assert get_task("countdown").step_rewards(problem, gold) is None  # families without a line checker
