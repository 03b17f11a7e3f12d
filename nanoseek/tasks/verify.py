"""Safe answer checking: answers in each task's own form, exact rational arithmetic on bounded strings, never `eval`.

An answer scores only in the form its task declares (`ANSWER_FORMS`): an integer family (chain_sum,
basic_arithmetic, gsm_symbolic) takes one integer written canonically ("-12", not "0 - 4 - 8", "24/2", "+12",
"012" or "12, 13"): a policy that copies the question's expression back, or hedges with several numbers, earns
nothing. Only countdown, whose answer *is* an expression, parses expressions.

Model text is untrusted. Everything here parses with a small recursive-descent grammar over numbers, + - * /,
parentheses and LaTeX \\frac, with hard limits on length, nesting depth and number size, and no exponent
operator at all, so every check ends in well under a millisecond and never raises.
"""

from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction

MAX_CHARS = 200  # longer answers are rejected unread
MAX_DEPTH = 16  # parenthesis nesting
MAX_DIGITS = 12  # per number literal: no 10^1000-digit arithmetic
_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|(\\[dt]?frac)|([-+*/(){}]))")
_NUMBER = re.compile(r"^[+-]?\d{1,12}(?:\.\d{1,12})?$")
_INTEGER = re.compile(r"-?(?:0|[1-9]\d{0,11})")  # canonical: no sign but a minus, no leading zeros, no "-0"

# The answer forms a task family can declare: what `answer_in_form` accepts for each.
ANSWER_FORMS = ("integer", "expression", "yes/no")


class _Reject(Exception):
    pass


def _tokens(text: str) -> list:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise _Reject
        num, frac, op = m.groups()
        if num is not None:
            if len(num.replace(".", "")) > MAX_DIGITS:
                raise _Reject
            out.append(Fraction(num))
        else:
            out.append("frac" if frac else op)
        pos = m.end()
    return out


class _Parser:
    """expr := term (('+'|'-') term)*; term := unary (('*'|'/') unary)*; unary := '-' unary | atom;
    atom := number | '(' expr ')' | \\frac '{' expr '}' '{' expr '}'"""

    def __init__(self, tokens: list):
        self.t, self.i, self.depth, self.numbers = tokens, 0, 0, []

    def peek(self):
        return self.t[self.i] if self.i < len(self.t) else None

    def take(self, want=None):
        tok = self.peek()
        if tok is None or (want is not None and tok != want):
            raise _Reject
        self.i += 1
        return tok

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/"):
            if self.take() == "*":
                value *= self.unary()
            else:
                divisor = self.unary()
                if divisor == 0:
                    raise _Reject
                value /= divisor
            if abs(value.numerator) > 10**40 or value.denominator > 10**40:
                raise _Reject
        return value

    def unary(self) -> Fraction:
        if self.peek() == "-":
            self.take()
            return -self.unary()
        if self.peek() == "+":
            self.take()
            return self.unary()
        return self.atom()

    def atom(self) -> Fraction:
        tok = self.peek()
        if isinstance(tok, Fraction):
            self.numbers.append(self.take())
            return tok
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Reject
        if tok == "(":
            self.take()
            value = self.expr()
            self.take(")")
        elif tok == "frac":
            self.take()
            num = self._braced()
            den = self._braced()
            if den == 0:
                raise _Reject
            value = num / den
        else:
            raise _Reject
        self.depth -= 1
        return value

    def _braced(self) -> Fraction:
        self.take("{")
        value = self.expr()
        self.take("}")
        return value


def parse_expression(text: str) -> tuple[Fraction, list[Fraction]] | None:
    """(value, number literals used) of an arithmetic answer, or None if it is not one (never raises)."""
    if not isinstance(text, str) or len(text) > MAX_CHARS:
        return None
    try:
        parser = _Parser(_tokens(text.replace(",", "").replace("$", "").replace("×", "*").replace("÷", "/")))
        value = parser.expr()
        if parser.peek() is not None:
            return None
        return value, parser.numbers
    except (_Reject, ValueError, ZeroDivisionError, RecursionError):
        return None


def parse_number(text: str) -> Fraction | None:
    """A plain number ("1,234", "-3.50", "$7", "45%" → 45) or a simple fraction/expression of numbers."""
    if not isinstance(text, str) or len(text) > MAX_CHARS:
        return None
    cleaned = text.strip().rstrip(".").replace(",", "").replace("$", "").rstrip("%").strip()
    if _NUMBER.match(cleaned):
        return Fraction(cleaned)
    result = parse_expression(cleaned)
    return result[0] if result else None


def numbers_equal(answer: str, gold: str) -> bool:
    """Lenient comparison of two numbers written in any of `parse_number`'s forms (for gold data and tools, never
    for rewards: rewards go through `answer_in_form`)."""
    a, g = parse_number(answer), parse_number(gold)
    return a is not None and g is not None and a == g


def answer_in_form(text: str, form: str) -> bool:
    """Whether an extracted answer is written in the task's form: "integer" (one canonical integer, nothing
    else), "expression" (an arithmetic expression the bounded parser accepts) or "yes/no" (Yes or No, case and a
    trailing period ignored). Never raises."""
    if not isinstance(text, str) or len(text) > MAX_CHARS:
        return False
    text = text.strip()
    if form == "integer":
        return _INTEGER.fullmatch(text) is not None
    if form == "expression":
        return parse_expression(text) is not None
    if form == "yes/no":
        return text.rstrip(".").lower() in ("yes", "no")
    raise ValueError(f"unknown answer form {form!r}; forms: {', '.join(ANSWER_FORMS)}")


def integer_equal(answer: str, gold: str) -> bool:
    """True only if `answer` is one canonical integer equal to the gold integer."""
    return answer_in_form(answer, "integer") and int(answer.strip()) == int(gold.strip())


def countdown_ok(answer: str, numbers: list[int], target: int) -> bool:
    """True if the expression uses each given number exactly once and evaluates to the target."""
    result = parse_expression(answer)
    if result is None:
        return False
    value, used = result
    return value == target and Counter(used) == Counter(Fraction(n) for n in numbers)
