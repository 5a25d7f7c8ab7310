"""Answer extraction, normalization and equivalence checking for MATH-style outputs.

Extraction and normalization are plain string code. Equivalence goes through math-verify (LaTeX -> SymPy).
math-verify enforces its timeouts with ``signal.alarm``, which only works in the main thread, so outside
the main thread (e.g. in Ray actor threads) the timeouts are switched off.

One direction rule serves grading and grouping: `grade(pred, gold)` is math-verify's `verify(gold, pred)`, and two
answers are equivalent (`answers_equivalent`, the rule of answer classes) when each grades correct against the
other; classes are cliques of it. A problem's N answers are graded and grouped once, each parsed once
(`grading.grade_and_group`). math-verify counts a timeout as "not equivalent"; every one is counted (`timeouts`)
and none is printed.
"""

from __future__ import annotations

import logging
import re
import threading
from functools import lru_cache

from math_verify import parse, verify
from math_verify.errors import TimeoutException

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
