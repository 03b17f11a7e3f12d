"""Tasks and verifiers: right answers score 1, wrong or malformed ones 0, and adversarial text never raises or
takes more than 50 ms."""

import contextlib
import signal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoseek.tasks import (HELDOUT_FRACTION, TASKS, extract_answer, format_ok, get_task, is_heldout, problem_key,
                            problem_space, question_from_prompt)
from nanoseek.tasks.base import combine
from nanoseek.tasks.verify import countdown_ok, evaluate, parse_number
from nanoseek.template import r1_prompt

GOOD = " let me add. </think> <answer> {} </answer>"


@pytest.fixture(scope="module")
def problems():
    return {name: get_task(name).problems(seed=3, n=5) for name in TASKS}


@pytest.mark.parametrize("name", list(TASKS))
def test_gold_answers_score_one_and_wrong_ones_zero(name, problems):
    task = get_task(name)
    for p in problems[name]:
        assert task.score(p, GOOD.format(p.answer)) == {"format": 1.0, "accuracy": 1.0, "partial": 1.0,
                                                         "answer": p.answer}
        wrong = task.score(p, GOOD.format("12345678"))
        assert wrong["accuracy"] == 0.0 and wrong["format"] == 1.0
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
    assert problem_key(chain) == problem_key("Calculate 3 + 4.") == problem_key("What is 3+4?") == "arith:3+4"
    assert problem_key(chain) != problem_key("Calculate 3 + 4 - 1.")
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
    n_train = sum(not is_heldout(f"Calculate {a} {op} {b}.") for a in range(10) for b in range(10) for op in "+-")
    assert len(set(keys[:n_train])) == n_train  # no repeats before the space is exhausted
    assert stream.repeats == len(keys) - n_train > 0 and stream.exhausted
    with pytest.raises(ValueError, match="too small|fewer than"):
        task.problems(0, 100, split="heldout")  # only ~20 of the 200 questions are held out


def test_problem_space_report():
    r = problem_space(get_task("chain_sum", **SMALL), draws=4000, train_draws=300)
    assert r["exact_size"] == 200 and r["distinct"] == 200 and 150 < r["effective_size"] < 250
    assert r["train_distinct"] == 200 - r["distinct_heldout"] and r["train_repeats"] == 300 - r["train_distinct"]
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
    assert evaluate("(" * 17 + "1" + ")" * 17) is None  # nesting limit
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
