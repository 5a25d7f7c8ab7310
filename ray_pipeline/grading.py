"""A problem's answers parsed once, graded and grouped (`grade_and_group`): each distinct answer is parsed once,
cheap exact keys decide most pairs (`decide_equivalent`), and math-verify's symbolic comparison runs only on the
pairs the keys cannot decide, under the direction rule of `answers.grade` and `answers.answers_equivalent`.
"""

from __future__ import annotations

import cmath
import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from math_verify import verify
from math_verify.errors import TimeoutException
from math_verify.utils import timeout as math_verify_timeout

from ray_pipeline.answer_classes import group_answers
from ray_pipeline.answers import MAX_SYMPY_CHARS, _parse, _timeout, normalize_answer

# Seconds a value probe may take (main thread only): past it the answer has no value key.
PROBE_TIMEOUT_S = 1
# Values that are "clearly different" differ by more than this share of their magnitude (at least 1). math-verify
# calls two numbers equal when they agree to 6 decimals (a float involved) or exactly: a gap above 1e-6 is never
# equal under either rule, and the margin keeps rounding in the value probe from deciding anything.
_DIFFERENT = 1e-5


@dataclass(frozen=True)
class ParsedAnswer:
    """What the cheap equivalence keys need of one extracted answer, computed once per distinct answer.

    `comparable` is False when math-verify cannot compare the answer at all (too long for SymPy, or
    nothing parsed); `strings` are the string parts of its parse, which verify compares as strings
    (empty where the parse was skipped); `exprs` its SymPy parts; `value` its numeric value at a fixed
    point of its free symbols, when it has exactly one SymPy part that is a plain expression or a
    one-element set of one (not a relation, larger set, interval, tuple, matrix, symbol or
    percentage, which math-verify compares by rules of their own), else None. `parsed` is
    math-verify's whole parse, made when first needed (a plain integer or fraction needs none).
    """

    text: str
    normalized: str
    comparable: bool
    strings: frozenset
    exprs: tuple
    value: complex | None

    @property
    def parsed(self) -> list:
        return _parse(self.text, _timeout())


def _symbol_point(name: str) -> float:
    """A fixed, irrational-looking value for a free symbol, the same in every process and run."""
    digest = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    return 0.5 + (digest % 100_003) / 37_171.0 + 0.0137 * len(name)


def _probe_value(expr) -> complex | None:
    """The value of a plain SymPy expression at `_symbol_point` of its symbols, or None when it has none."""
    from sympy import Expr, FiniteSet, Float, MatrixBase, Symbol, UnevaluatedExpr, nan, zoo
    from sympy.core.relational import Relational

    # math-verify compares a one-element set with an expression, or with another such set, by its element.
    if isinstance(expr, FiniteSet) and len(expr.args) == 1:
        expr = expr.args[0]
    if not isinstance(expr, Expr) or isinstance(expr, (Symbol, Relational, MatrixBase)) or expr in (nan, zoo):
        return None
    # Percentages (X * UnevaluatedExpr(1/100)) compare by math-verify's percentage rule, e.g. 9% = 9.
    if expr.has(UnevaluatedExpr) or not expr.is_commutative:
        return None
    points = {s: Float(_symbol_point(s.name), 30) for s in expr.free_symbols if isinstance(s, Symbol)}
    if len(points) != len(expr.free_symbols):
        return None

    @math_verify_timeout(timeout_seconds=PROBE_TIMEOUT_S if _timeout() else None)
    def evaluate():
        return complex(expr.subs(points).evalf(30))

    try:
        value = evaluate()
    # A value is only a shortcut: without one, math-verify compares the pair, so a slow probe changes no result.
    except (Exception, TimeoutException):  # noqa: BLE001
        return None
    return value if cmath.isfinite(value) else None


# A plain integer, decimal, fraction or quotient of integers: written so, math-verify parses it to exactly the
# SymPy number its value is (tests/test_equivalence.py holds the two equal on generated cases), so its parse,
# the costly part of grading, is skipped. math-verify reads the decimal 0.5 as the fraction 1/2 (and .5, 5.
# in ways of their own), so those go through its parse.
_PLAIN_NUMBER_RE = re.compile(
    r"(?P<sign>[+-]?)(?:(?P<int>\d+)|\\[dt]?frac\{(?P<num>\d+)\}\{(?P<den>\d+)\}|\\[dt]?frac(?P<n1>\d)(?P<d1>\d)"
    r"|(?P<p>\d+)/(?P<q>\d+))"
)
_PLAIN_DECIMAL_RE = re.compile(r"-?\d+\.\d+")


def _plain_number(text: str):
    """The SymPy number math-verify parses `text` to, when `text` is a plain integer, decimal or fraction; else None."""
    if len(text) > 40:
        return None
    if _PLAIN_DECIMAL_RE.fullmatch(text) and text != "0.5":
        from sympy import Float

        return Float(text, 15)
    match = _PLAIN_NUMBER_RE.fullmatch(text)
    if not match:
        return None
    from sympy import Integer, Rational

    sign = -1 if match["sign"] == "-" else 1
    if match["int"] is not None:
        return Integer(sign * int(match["int"]))
    num, den = next((match[a], match[b]) for a, b in (("num", "den"), ("n1", "d1"), ("p", "q")) if match[a] is not None)
    if int(den) == 0:
        return None
    return Rational(sign * int(num), int(den))


@lru_cache(maxsize=1 << 16)
def parse_answer(text: str) -> ParsedAnswer:
    """`text`'s keys: normalized string, string and SymPy parts, value (cached per process)."""
    normalized = normalize_answer(text)
    number = _plain_number(text)
    if number is not None:
        return ParsedAnswer(text, normalized, True, frozenset(), (number,), complex(number))
    parsed = _parse(text, _timeout()) if len(text) <= MAX_SYMPY_CHARS else []
    strings = frozenset(s.strip() for s in parsed if isinstance(s, str) and s.strip())
    exprs = tuple(e for e in parsed if not isinstance(e, str))
    value = _probe_value(exprs[0]) if len(exprs) == 1 else None
    return ParsedAnswer(text, normalized, bool(parsed), strings, exprs, value)


def _same_structure(a: ParsedAnswer, b: ParsedAnswer) -> bool:
    """Some SymPy part of `a` equals one of `b` structurally: math-verify's first check (`sympy_str_eq`) says equal."""
    from sympy import nan, zoo

    for x in a.exprs:
        for y in b.exprs:
            try:
                if x not in (nan, zoo) and x == y:
                    return True
            except Exception:  # noqa: BLE001 - SymPy's == can raise on odd objects; then it decides nothing
                continue
    return False


def _clearly_different(x: complex, y: complex) -> bool:
    return abs(x - y) > _DIFFERENT * max(1.0, abs(x), abs(y))


def _finite_number(expr) -> bool:
    from sympy import Number

    return isinstance(expr, Number) and bool(expr.is_finite)


def _numbers_equal(x, y) -> bool:
    """math-verify's verdict on two finite SymPy numbers, decided without SymPy's simplification.

    Its numeric check: with a float involved both are rounded to 6 decimals (verify's default
    `float_rounding`) and compared, else they must be equal; then its symbolic check, which for
    numbers is whether their difference is exactly zero (a float 7.0 against the integer 7).
    """
    from sympy import Float

    if isinstance(x, Float) or isinstance(y, Float):
        try:
            if x.round(6) == y.round(6):
                return True
        except Exception:  # noqa: BLE001 - as math-verify: a failed rounding decides nothing
            pass
    elif x == y:
        return True
    return bool((x - y).is_zero)


def decide_equivalent(a: ParsedAnswer, b: ParsedAnswer) -> bool | None:
    """What `grade` returns in either direction (so also `answers_equivalent`), where cheap keys decide it.

    True: the normalized strings are equal, a string part is shared, or a SymPy part is the same
    structure. Both plain numbers: math-verify's numeric rule (`_numbers_equal`). False: the answers
    cannot be compared (too long, nothing parsed), or both have a value and the values are clearly
    different (math-verify then finds no string, numeric or symbolic equality). None: undecided, so
    math-verify's comparison runs.
    """
    if a.normalized and a.normalized == b.normalized:
        return True
    if not a.comparable or not b.comparable:
        return False
    if a.strings & b.strings or _same_structure(a, b):
        return True
    if len(a.exprs) == len(b.exprs) == 1 and _finite_number(a.exprs[0]) and _finite_number(b.exprs[0]):
        return _numbers_equal(a.exprs[0], b.exprs[0])
    if a.value is not None and b.value is not None and _clearly_different(a.value, b.value):
        return False
    return None


def _verify_parsed(gold: ParsedAnswer, pred: ParsedAnswer) -> bool:
    """math-verify's verify(gold, pred) on answers parsed once; any failure counts as not equivalent."""
    try:
        return bool(verify(gold.parsed, pred.parsed, timeout_seconds=_timeout()))
    except (Exception, TimeoutException):  # noqa: BLE001 - as in `_verify`
        return False


@dataclass
class GradedAnswers:
    """One problem's answers graded and grouped: what every vote, curve and sweep reuses.

    `labels[i]` is candidate i's answer class (-1 without an answer), numbered by first appearance;
    `correct[i]` its grade against the gold answer (None without a gold answer); `distinct` the
    number of distinct answer strings; `symbolic` the math-verify comparisons that ran.
    """

    labels: np.ndarray
    correct: list
    distinct: int
    symbolic: int


def grade_and_group(preds: list[str | None], gold: str | None) -> GradedAnswers:
    """Grade each distinct answer once (`grade`'s rule) and give every candidate its answer class.

    Classes are `answer_classes.group_answers`'s cliques under `answers_equivalent` (each member graded correct
    against every other as gold): the partition depends only on the answers and their counts, not on
    their order; labels are numbered by first appearance. Keys decide a pair where they can (a clearly
    different value, then `decide_equivalent`), math-verify both ways otherwise (the second direction only
    when the first holds). The classes are the problem's, made once: the accuracy curves restrict them to
    each subset they draw instead of re-deriving them per subset.
    """
    parsed = {p: parse_answer(p) for p in dict.fromkeys(p for p in preds if p is not None)}
    # math-verify's verdicts, (gold text, pred text) -> bool: each comparison runs at most once per call, and
    # grading reuses one that grouping ran (the gold is often among the answers).
    verdicts: dict[tuple[str, str], bool] = {}

    def verified(gold_answer: ParsedAnswer, pred: ParsedAnswer) -> bool:
        key = (gold_answer.text, pred.text)
        if key not in verdicts:
            verdicts[key] = _verify_parsed(gold_answer, pred)
        return verdicts[key]

    def decide(a: str, b: str) -> bool | None:
        pa, pb = parsed[a], parsed[b]
        if pa.value is not None and pb.value is not None and _clearly_different(pa.value, pb.value):
            return False
        return decide_equivalent(pa, pb)

    def equivalent(a: str, b: str) -> bool:
        return verified(parsed[a], parsed[b]) and verified(parsed[b], parsed[a])

    labels = group_answers(preds, equivalent, decide=decide).astype(np.int32)
    grades = None
    if gold is not None:
        gold_parsed = parse_answer(gold)
        grades = {}
        for answer in parsed.values():
            decided = decide_equivalent(gold_parsed, answer)
            grades[answer.text] = verified(gold_parsed, answer) if decided is None else decided
    correct = [None] * len(preds) if grades is None else [False if p is None else grades[p] for p in preds]
    return GradedAnswers(labels, correct, len(parsed), len(verdicts))
