"""bench/chain_sum_errors.py puts each wrong worked solution in the class of the first step it broke."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("chain_sum_errors",
                                               Path(__file__).parents[1] / "bench" / "chain_sum_errors.py")
errors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(errors)

Q = "State the final answer to the following arithmetic problem: 6 - 8 - 7 ="


def solution(first: str, becomes: str, second: str, answer: str) -> str:
    return (f" Add and subtract from left to right.\n{first}, so it becomes {becomes}.\n{second}.\n"
            f"So the result is {answer}. </think> <answer> {answer} </answer>")


@pytest.mark.parametrize("completion, expected", [
    (solution("6 - 8 = -2", "-2 - 7", "-2 - 7 = -9", "-9"), "ok"),
    (solution("6 - 8 = -3", "-3 - 7", "-3 - 7 = -10", "-10"), "step1"),
    (solution("6 + 8 = 14", "14 - 7", "14 - 7 = 7", "7"), "step1"),
    (solution("6 - 8 = -2", "-2 - 5", "-2 - 5 = -7", "-7"), "copy"),
    (solution("6 - 8 = -2", "-2 + 7", "-2 + 7 = 5", "5"), "copy"),
    (solution("6 - 8 = -2", "2 - 7", "2 - 7 = -5", "-5"), "copy"),
    (solution("6 - 8 = -2", "-2 - 7", "-2 - 7 = -8", "-8"), "step"),
    (solution("6 - 8 = -2", "-2 - 7", "-2 - 7 = -9", "-8"), "form"),
    (" I do not know. </think> <answer> 3 </answer>", "form"),
])
def test_each_failure_is_classified_by_the_first_broken_step(completion, expected):
    assert errors.classify(Q, completion, "-9") == expected


def test_expression_reads_the_terms_and_operators():
    assert errors.expression(Q) == [6, "-", 8, "-", 7]
