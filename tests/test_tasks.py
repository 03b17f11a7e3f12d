"""Tasks and verifiers: right answers score 1, wrong or malformed ones 0, and adversarial text never raises or
takes more than 50 ms."""

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoseek.tasks import TASKS, extract_answer, format_ok, get_task
from nanoseek.tasks.base import combine
from nanoseek.tasks.verify import countdown_ok, evaluate, parse_number

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


def test_heldout_problems_are_disjoint(problems):
    task = get_task("gsm_symbolic")
    train = {p.question for p in task.problems(0, 50)}
    held = {p.question for p in task.problems(0, 50, split="heldout")}
    assert not train & held


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


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=ADVERSARIAL)
def test_verifiers_never_raise_and_stay_fast(text, warm_tasks):
    for name, (task, problem) in warm_tasks.items():
        for completion in (text, GOOD.format(text)):
            t0 = time.perf_counter()
            scores = task.score(problem, completion)
            elapsed = time.perf_counter() - t0
            assert elapsed < 0.05, (name, completion[:80], elapsed)
            assert scores["accuracy"] in (0.0, 1.0) and scores["format"] in (0.0, 1.0)
