"""Arithmetic the expression families share: the split key of an expression and its step-by-step evaluation.

chain_sum and basic_arithmetic key a question by its expression (a sum by its signed terms, so reorderings
are one problem), and chain_sum, basic_arithmetic and countdown write worked solutions as one line per step of
`work`; `judge_lines` checks a worked solution line by line (the process reward). Exact rational arithmetic
throughout: a division that does not come out even has no worked solution (the generators' gold answers use
Python's //, which a true step cannot show).
"""

from __future__ import annotations

import re
from fractions import Fraction

from .base import Problem, Unsolvable, signed_terms

EXPR = r"[\d\s+\-*/()]+"  # an expression as the generators write it, after problem_key's normalisation


def expression_key(expression: str) -> str:
    """The split key of an arithmetic expression: a sum's terms in any order and grouping are one problem
    ("sum:-1,+3,+4"); anything with * or / is its text without spaces ("arith:3*4")."""
    terms = signed_terms(expression)
    if terms is not None:
        return "sum:" + ",".join(f"{t:+d}" for t in terms)
    return "arith:" + re.sub(r"\s", "", expression)


def solution(intro: str, expression: str) -> tuple[str, Fraction]:
    """(worked text, value) of an expression: the intro line, one line per step, then "So the result is V."."""
    lines, value = work(expression)
    return "\n".join([intro, *lines, f"So the result is {value}."]), value


def solve_expression(intro: str, problem: Problem) -> tuple[str, str]:
    """(worked text, answer) of a problem whose metadata holds its expression; Unsolvable when the steps do not
    reach the gold answer (a generator's // rounded, or the expression is not one the steps can show)."""
    text, value = solution(intro, problem.metadata["expression"])
    if str(value) != problem.answer:
        raise Unsolvable(problem.question)
    return text, problem.answer


_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _tokens(expression: str) -> list:
    """Numbers (as Fractions) and operators; a minus where an operand is expected is a sign ("-7", "-( ... )")."""
    if re.search(r"[^\d\s+\-*/()]", expression):
        raise Unsolvable(expression)  # decimals, powers, names: not what these generators make
    out: list = []
    negate = False
    for tok in re.findall(r"\d+|[-+*/()]", expression):
        operand_expected = not out or out[-1] in ("+", "-", "*", "/", "(", "-(")
        if tok == "-" and operand_expected and not negate:
            negate = True
        elif tok == "(" and operand_expected:
            out.append("-(" if negate else "(")
            negate = False
        elif tok.isdigit() and (operand_expected or negate):
            out.append(-Fraction(tok) if negate else Fraction(tok))
            negate = False
        elif operand_expected or negate or tok.isdigit() or tok == "(":
            raise Unsolvable(expression)  # "+ *", "- - 3" and the like: not an expression the steps below can show
        else:
            out.append(tok)
    depth = 0
    for t in out:  # brackets must balance, or the step loop below would look for a missing partner
        depth += (t in ("(", "-(")) - (t == ")")
        if depth < 0:
            break
    if negate or not out or depth != 0 or out[-1] in ("+", "-", "*", "/"):
        raise Unsolvable(expression)
    return out


def _show(tokens: list) -> str:
    text = " ".join(str(t) if isinstance(t, Fraction) else t for t in tokens)
    return text.replace("( ", "(").replace(" )", ")")


def _apply(a: Fraction, op: str, b: Fraction) -> Fraction:
    if op != "/":
        return _OPS[op](a, b)
    if b == 0 or a % b:  # generators' gold uses Python's //: only an exact quotient is a true worked step
        raise Unsolvable(f"{a} / {b}")
    return a / b


def _drop_parens(tokens: list) -> None:
    """Remove plain brackets around a single number: "(23)" -> "23"."""
    i = 0
    while i + 2 < len(tokens):
        if tokens[i] == "(" and isinstance(tokens[i + 1], Fraction) and tokens[i + 2] == ")":
            tokens[i:i + 3] = [tokens[i + 1]]
            i = max(i - 1, 0)
        else:
            i += 1


def work(expression: str) -> tuple[list[str], Fraction]:
    """Evaluate step by step (innermost brackets, then * and / before + and -, left to right); one line a step."""
    tokens = _tokens(expression)
    _drop_parens(tokens)
    lines = []
    while len(tokens) > 1:
        close = tokens.index(")") if ")" in tokens else len(tokens)
        opens = [i for i in range(close) if tokens[i] in ("(", "-(")]
        lo = opens[-1] + 1 if close < len(tokens) else 0
        if close - lo == 1:  # "-(x)": only the sign is left to apply
            value = -tokens[lo]
            step = f"-({tokens[lo]}) = {value}"
            tokens[lo - 1:close + 1] = [value]
        else:
            inner = tokens[lo:close]
            ops = [i for i, t in enumerate(inner) if t in ("*", "/")]  # * and / bind tighter than + and -
            k = lo + (ops or [i for i, t in enumerate(inner) if t in ("+", "-")])[0]
            a, op, b = tokens[k - 1], tokens[k], tokens[k + 1]
            value = _apply(a, op, b)
            step = f"{a} {op} {b} = {value}"
            tokens[k - 1:k + 2] = [value]
        _drop_parens(tokens)
        # "First, " / "Then " before each step: a line never starts with a number, so every number is written as the
        # same token everywhere (" 14" after a space; a line-initial "14" is another token), and copying a term or
        # a running value from the line before is token identity rather than a learnt mapping
        lead = "Then" if lines else "First,"
        lines.append(f"{lead} {step}, so it becomes {_show(tokens)}." if len(tokens) > 1 else f"{lead} {step}.")
    if len(tokens) != 1 or not isinstance(tokens[0], Fraction) or tokens[0].denominator != 1:
        raise Unsolvable(expression)
    return lines, tokens[0]


_STEP_LINE = re.compile(r"(?:First,|Then) .+ = (-?\d+)(?:, so it becomes (.+))?\.")


def judge_lines(intro: str, expression: str, lines: list[str]) -> list[bool]:
    """Whether each line of a worked solution of `expression` is a right step from the line before it: the intro,
    then each "First,/Then a op b = v, so it becomes …." line must be exactly the next step of `work` applied to
    what the previous line left (the question's expression for the first), and "So the result is V." must follow
    a single value V. A line is judged on its own: after a wrong line, the next is judged from what the wrong
    line wrote (a copy or a sum right from a wrong start is a right step), so each error is charged once."""
    valid, state, steps = [], expression, 0
    for i, line in enumerate(lines):
        line = line.strip()
        if i == 0:
            valid.append(line == intro)
            continue
        expected = None
        try:
            worked, value = work(state) if state is not None else (None, None)
        except Unsolvable:
            worked = None
        if worked:  # a step is left: the next line of `work`, led by "First," or "Then"
            expected = ("Then" + worked[0][len("First,"):]) if steps else worked[0]
        elif worked is not None:
            expected = f"So the result is {value}."
        valid.append(line == expected)
        m = _STEP_LINE.fullmatch(line)
        steps += 1
        state = (m.group(2) or m.group(1)) if m else None  # what this line leaves for the next, right or wrong
    return valid
