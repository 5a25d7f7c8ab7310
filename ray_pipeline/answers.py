"""Answer extraction, normalization and equivalence checking for MATH-style outputs.

Extraction and normalization are plain string code. Equivalence goes through math-verify (LaTeX -> SymPy).
math-verify enforces its timeouts with ``signal.alarm``, which only works in the main thread, so outside
the main thread (e.g. in Ray actor threads) the timeouts are switched off.

A problem's N answers are graded and grouped once (`grade_and_group`): each distinct answer is parsed
once, cheap exact keys decide most pairs (`decide_equivalent`), and math-verify's symbolic comparison
runs only on the pairs the keys cannot decide. One direction rule serves both: `grade(pred, gold)` is
math-verify's `verify(gold, pred)`, and two answers are equivalent (`answers_equivalent`, the rule of
answer classes) when each grades correct against the other; classes are cliques of it. math-verify
counts a timeout as "not equivalent"; every one is counted (`timeouts`) and none is printed.
"""

from __future__ import annotations

import cmath
import hashlib
import logging
import re
import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from math_verify import parse, verify
from math_verify.errors import TimeoutException
from math_verify.utils import timeout as math_verify_timeout

from ray_pipeline.answer_classes import group_answers

# Per-call limit in the main thread, where signal.alarm is usable.
MAIN_THREAD_TIMEOUT_S = 5

# Without a timeout (any non-main thread), SymPy could hang on a huge input; no real answer gets near this
# length, so longer strings are refused before SymPy sees them.
MAX_SYMPY_CHARS = 1000

# Accept `\boxed` and `\fbox`; a letter right after the name would make it a different command (e.g. `\boxedx`).
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# `\boxed 5`: one whitespace-delimited token; a `$` closes the math, so it ends the token as well.
_BOX_TOKEN_RE = re.compile(r"\s*([^\s${}]+)")


def _braced_content(text: str, start: int) -> str | None:
    """The content of the `{...}` group opening at `text[start]`, or None when it never closes."""
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            # Skip the escaped char, so `\{` / `\}` (set braces) and `\\` do not count as grouping braces.
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Return the stripped content of the last `\\boxed{...}` / `\\fbox{...}` / `\\boxed X` in `text`.

    None when there is no box, when the last box is unclosed, or when it is empty.
    """
    if not text:
        return None
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    # Only the last box counts: models often box intermediate results before the final one. If that box is
    # broken we return None rather than fall back to an earlier one, which would likely be a wrong answer.
    end = matches[-1].end()
    rest = text[end:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        content = _braced_content(text, end + len(rest) - len(stripped))
    else:
        token = _BOX_TOKEN_RE.match(rest)
        content = token.group(1) if token else None
    if content is None:
        return None
    content = content.strip()
    return content or None


# The answer-extraction modes (`--answer_extraction`): "boxed" is the original (last `\boxed{}`); the others fall
# back the way evaluation harnesses do for small models that rarely box their answer.
ANSWER_EXTRACTIONS = ("boxed", "boxed-then-last-number", "math-verify")

# A number as written in prose: sign, thousands separators, decimals, and a plain `a/b` fraction.
_NUMBER_RE = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])|(?<![\w.])-?\d+(?:\.\d+)?(?:/\d+)?")


def extract_last_number(text: str) -> str | None:
    """The last number in `text` (`-3`, `1,000` -> `1000`, `2.5`, `3/4`), or None when there is none."""
    if not text:
        return None
    matches = _NUMBER_RE.findall(text)
    if not matches:
        return None
    return matches[-1].replace(",", "")


def extract_math_verify(text: str) -> str | None:
    """The answer math-verify's own extraction finds in free text (LaTeX first, then a plain expression).

    math-verify prefers `\\boxed{}`, then "final answer is ...", then the last LaTeX or expression; the string
    it matched is returned, so `grade` re-parses it like any other extracted answer.
    """
    if not text or len(text) > 100 * MAX_SYMPY_CHARS:
        return None
    try:
        parsed = parse(text, parsing_timeout=_timeout())
    except (Exception, TimeoutException):  # noqa: BLE001 - an unparsable text just has no answer
        return None
    if len(parsed) < 2 or not isinstance(parsed[-1], str):
        return None
    answer = parsed[-1].strip().rstrip(".").strip()
    return answer or None


def extract_answer(text: str, mode: str = "boxed") -> str | None:
    """The answer of one response under an extraction `mode` (one of ANSWER_EXTRACTIONS); None when there is none.

    "boxed": the last `\\boxed{}` (see `extract_boxed`); "boxed-then-last-number": that, else the last number in
    the text; "math-verify": that, else math-verify's LaTeX/expression extraction ("final answer is $...$", the
    last LaTeX or plain expression).
    """
    if mode == "boxed":
        return extract_boxed(text)
    if mode == "boxed-then-last-number":
        boxed = extract_boxed(text)
        return boxed if boxed is not None else extract_last_number(text)
    if mode == "math-verify":
        # The last box first: math-verify joins every box of a text into one set answer ("1,2").
        boxed = extract_boxed(text)
        return boxed if boxed is not None else extract_math_verify(text)
    raise ValueError(f"answer_extraction must be one of {', '.join(ANSWER_EXTRACTIONS)}, got {mode!r}")


_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])")
_THIN_SPACE_RE = re.compile(r"\\[!,;:]")
_FRAC_RE = re.compile(r"\\[dt]frac(?![A-Za-z])")


def normalize_answer(ans: str) -> str:
    """Light string normalization for display and grouping (not for grading: that is `grade`'s job).

    Steps: strip; remove surrounding `$`; drop `\\left`/`\\right`; drop degree marks `^\\circ` / `^{\\circ}`;
    drop the spacing commands `\\!`, `\\,`, `\\;`, `\\:`; `\\dfrac`/`\\tfrac` -> `\\frac`; unwrap
    `\\text{...}` (also `\\textbf`, `\\mathrm`, `\\mbox`) to its content; collapse whitespace.
    """
    s = ans.strip()
    # `$$...$$` and `$...$` both show up around extracted answers.
    while len(s) >= 2 and s.startswith("$") and s.endswith("$"):
        s = s[1:-1].strip()
    s = _LEFT_RIGHT_RE.sub("", s)
    s = _DEGREE_RE.sub("", s)
    s = _THIN_SPACE_RE.sub("", s)
    s = _FRAC_RE.sub(r"\\frac", s)
    # Keep the content, so `5\text{ cm}` -> `5 cm` and `\text{(C)}` -> `(C)`.
    s = _TEXT_RE.sub(r"\1", s)
    return " ".join(s.split())


def _timeout() -> int | None:
    # signal.alarm raises ValueError outside the main thread, so no timeout there.
    return MAIN_THREAD_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=4096)
def _parse(ans: str, timeout: int | None) -> list:
    """math-verify parse of a bare answer; cached because best-of-N grouping parses the same strings often."""
    # Wrapping in \boxed{} makes math-verify's LaTeX extractor take the whole answer as one expression.
    return parse("\\boxed{" + ans + "}", parsing_timeout=timeout)


def _verify(gold: str, pred: str) -> bool:
    """math-verify equivalence of `pred` against `gold`; any failure counts as not equivalent."""
    if len(gold) > MAX_SYMPY_CHARS or len(pred) > MAX_SYMPY_CHARS:
        return False
    timeout = _timeout()
    try:
        gold_parsed = _parse(gold, timeout)
        pred_parsed = _parse(pred, timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    # Grading must never take down the caller: a SymPy/latex2sympy failure just means "not equivalent".
    # TimeoutException derives from BaseException, so `Exception` alone would let it through.
    except (Exception, TimeoutException):  # noqa: BLE001
        return False


def _same_normalized(a: str, b: str) -> bool:
    na = normalize_answer(a)
    return bool(na) and na == normalize_answer(b)


def grade(pred: str | None, gold: str) -> bool:
    """True when `pred` is a correct answer for `gold` (both bare answers, no `\\boxed`). Never raises.

    The one direction rule, which `answers_equivalent` (and so every answer class) shares: equal non-empty
    normalized strings, else math-verify's `verify(gold, pred)`, gold first. math-verify is not symmetric
    on purpose: the gold's form decides how the prediction is read. A gold set or bare list (`2,3`)
    accepts its elements in any order, `(3,2)` included, while a gold tuple `(3,2)` rejects `2,3`; a gold
    inequality `1 \\le x \\le 2` accepts the interval `[1,2]`, a gold interval does not accept the
    inequality. (An assignment is read as its value in both directions: `x=2` and `2` grade each other
    correct.) Grading keeps math-verify's own direction, so accuracies stay math-verify's.
    """
    if pred is None or gold is None:
        return False
    if _same_normalized(pred, gold):
        return True
    return _verify(gold, pred)


def answers_equivalent(a: str, b: str) -> bool:
    """True when each answer grades correct against the other: `grade(a, b) and grade(b, a)`. Never raises.

    The one pairwise rule of answer classes (symmetric). Both directions must hold, not either: two answers
    share a class only if, whichever of them were the gold, the other would be graded correct. With
    "either", `2,3` and `(3,2)` would be one class although `grade("2,3", "(3,2)")` is False, so a vote's
    accuracy would depend on which member it picked. Equivalence stays non-transitive (50\\% ~ 0.5 and
    50\\% ~ 50, but 0.5 !~ 50), which is why classes are cliques (`answer_classes.group_answers`).
    """
    if a is None or b is None:
        return False
    if _same_normalized(a, b):
        return True
    return _verify(a, b) and _verify(b, a)


# --- timeouts: counted, never printed ---------------------------------------------------------------------------


class _TimeoutCounter(logging.Filter):
    """Counts math-verify's timeout warnings and keeps them (and its "timeout is disabled" notes) off the console.

    math-verify reports a timed-out parse or comparison only as a logged warning and a False/empty result;
    the count is how a comparison says how many of its answers a timeout may have touched.
    """

    def __init__(self):
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Timeout during"):
            self.count += 1
            return False
        return not message.startswith("Timeout is disabled")


_TIMEOUTS = _TimeoutCounter()
for _name in ("math_verify.grader", "math_verify.parser"):
    logging.getLogger(_name).addFilter(_TIMEOUTS)


def timeouts() -> int:
    """math-verify's timeouts (parses and comparisons, each counted as "not equivalent") in this process so far."""
    return _TIMEOUTS.count


# --- a problem's answers, parsed once -----------------------------------------------------------------------------

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
