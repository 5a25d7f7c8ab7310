"""Tests for ray_pipeline.answers: box extraction, normalization and math-verify grading."""

import random
import re
import threading

import pytest

from ray_pipeline.answers import (
    ANSWER_EXTRACTIONS,
    answers_equivalent,
    extract_answer,
    extract_boxed,
    extract_last_number,
    grade,
    normalize_answer,
)
from ray_pipeline.problem_set import embedded_records

# --- extract_boxed ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so the answer is $\boxed{42}$.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\text{(A)}}", r"\text{(A)}"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{\sqrt{\frac{a^{2}}{b_{1}}}} done", r"\sqrt{\frac{a^{2}}{b_{1}}}"),
        (r"\boxed{90^\circ}", r"90^\circ"),
        (r"\boxed{  7  }", "7"),
        (r"\fbox{12}", "12"),
        (r"the answer is $\boxed 5$", "5"),
        (r"\boxed {8}", "8"),
        # Escaped (set) braces are content, not grouping, even when unbalanced.
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{\left\{ x \right.}", r"\left\{ x \right."),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_takes_last_box():
    assert extract_boxed(r"first \boxed{1}, then \boxed{2}, finally \boxed{\frac{3}{4}}.") == r"\frac{3}{4}"


@pytest.mark.parametrize(
    "text",
    [
        "no box here, the answer is 5",
        "",
        r"\boxed{\frac{1}{2}",  # unclosed
        r"\boxed{1} and then \boxed{2",  # last box unclosed: no fallback to the earlier one
        r"\boxed{}",  # empty
        r"\boxed",  # nothing after it
    ],
)
def test_extract_boxed_none(text):
    assert extract_boxed(text) is None


# --- normalize_answer ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  $42$ ", "42"),
        ("$$x+1$$", "x+1"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"( 3, \frac{\pi}{2} )"),
        (r"x \rightarrow y", r"x \rightarrow y"),  # \right must not eat \rightarrow
        (r"90^\circ", "90"),
        (r"90^{\circ}", "90"),
        (r"32,\!348", "32,348"),
        (r"\dfrac{1}{2}", r"\frac{1}{2}"),
        (r"5.4 \text{ cents}", "5.4 cents"),
        (r"\text{(C)}", "(C)"),
        ("a   +\n b", "a + b"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


# --- grade -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        (r"90^\circ", "90"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"(3, \frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\frac{1}{2}", "0.5"),
        ("0.5", r"\frac{1}{2}"),
        (r"\dfrac{14}{3}", r"\frac{14}{3}"),
        ("32348", r"\$32,\!348"),
        ("5.4", r"5.4 \text{ cents}"),
        (r"\{2, 1\}", r"\{1, 2\}"),
    ],
)
def test_grade_equivalent(pred, gold):
    assert grade(pred, gold)


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        (r"\frac{14}{3}", r"\frac{13}{3}"),
        ("[1, 2)", "[1, 2]"),
        (r"\text{(D)}", r"\text{(C)}"),
        (r"\text{west}", r"\text{east}"),
        ("", "0"),
    ],
)
def test_grade_not_equivalent(pred, gold):
    assert not grade(pred, gold)


def test_grade_end_to_end_with_extraction():
    assert grade(extract_boxed(r"Thus $\theta = \boxed{90^\circ}$."), "90")
    assert grade(extract_boxed(r"\boxed{\left( 3, \frac{\pi}{2} \right)}"), r"\left( 3, \frac{\pi}{2} \right)")


def test_grade_no_box_is_false():
    assert extract_boxed("The answer is 5.") is None
    assert grade(extract_boxed("The answer is 5."), "5") is False
    assert grade(None, "5") is False


@pytest.mark.parametrize("pred", [r"\text{(C)}", "C", "(C)", "c", r"\textbf{(C)}"])
def test_grade_multiple_choice_letter(pred):
    # Chosen behaviour (math-verify's): `\text{(C)}`, `(C)`, `C` and `c` all parse to the symbol `c`, so a bare
    # letter matches a `\text{(C)}` gold. A different letter does not.
    assert grade(pred, r"\text{(C)}")
    assert grade(r"\text{(C)}", pred)


def test_grade_never_raises_on_garbage():
    for pred in [r"\frac{", "}}}{{{", r"\boxed{", "\\", "a" * 5000, "1/0"]:
        assert grade(pred, "1") in (True, False)


def test_grade_in_non_main_thread():
    # signal.alarm (math-verify's timeout) raises ValueError outside the main thread; grade must avoid it.
    results: dict[str, object] = {}

    def worker():
        try:
            results["eq"] = grade(r"\frac{1}{2}", "0.5")
            results["deg"] = grade(extract_boxed(r"\boxed{90^\circ}"), "90")
            results["ne"] = grade(r"\frac{14}{3}", r"\frac{13}{3}")
            results["pair"] = answers_equivalent(r"(3, \frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)")
        except BaseException as e:  # noqa: BLE001 - the test wants to see any failure, whatever its type
            results["error"] = e

    t = threading.Thread(target=worker)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive()
    assert "error" not in results, results.get("error")
    assert results == {"eq": True, "deg": True, "ne": False, "pair": True}


# --- answers_equivalent ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (r"\frac{1}{2}", "0.5", True),
        ("x=2", "2", True),  # math-verify treats an assignment as its value
        (r"\frac{14}{3}", r"\frac{13}{3}", False),
        (r"\text{(C)}", "C", True),
    ],
)
def test_answers_equivalent_symmetric(a, b, expected):
    assert answers_equivalent(a, b) is expected
    assert answers_equivalent(b, a) is expected


# --- MATH-style golds ------------------------------------------------------------------------------------------

# Gold answers in every form MATH-500's answer column takes (written for this test, not taken from the data set):
# integers, fractions, decimals, radicals, multiples of pi, points, intervals and unions, sets and lists, lettered
# choices and words, degrees, percents, dollars, units, other bases, polynomials, equations, matrices, complex numbers.
MATH_GOLDS = [
    "7", "-12", "0", "2016", "\\frac{3}{8}", "-\\frac{5}{2}", "\\dfrac{7}{9}", "\\tfrac{1}{6}", "0.35",
    "3.\\overline{6}", "2\\sqrt{5}", "\\frac{\\sqrt{3}}{2}", "4 + 2\\sqrt{3}", "\\sqrt[3]{12}", "6\\pi",
    "\\frac{5\\pi}{6}", "\\left( 2, \\frac{\\pi}{3} \\right)", "(4,-1)", "\\left( -\\frac{1}{2}, 3 \\right)",
    "(1,2,-3)", "[-2, 5)", "(-\\infty, 0] \\cup [4, \\infty)", "\\{1, 3, 5\\}", "1, 3, 5", "\\text{(C)}",
    "\\text{C}", "\\text{Tuesday}", "\\text{even}", "45^\\circ", "120^\\circ", "15\\%", "\\$4.75",
    "12\\text{ inches}", "1011_2", "2A_{16}", "x^2 - 6x + 5", "3x^3 + 2x - 1", "y = -2x + 7", "x \\in [1, 4]",
    "a = 3", "k = -\\frac{2}{3}", "\\begin{pmatrix} 4 \\\\ -1 \\end{pmatrix}",
    "\\begin{pmatrix} 1 & 2 \\\\ 0 & 3 \\end{pmatrix}", "5 - 3i", "-1 + 2i", "\\frac{1}{4} + \\frac{\\sqrt{7}}{4} i",
    "e^{2}", "\\ln 3", "\\log_2 9", "\\binom{8}{3}", "6!", "\\infty", "10^{6}", "2.5 \\times 10^{-3}",
    "\\frac{x+1}{x-2}", "\\sin 2x", "\\pm 3", "-7, 2", "\\left[ \\frac{1}{3}, 1 \\right]",
]  # fmt: skip


def test_math_golds_graded_against_themselves():
    failures = []
    for gold in MATH_GOLDS:
        # Bare box, and a box inside inline math as models usually write it.
        for text in ("... \\boxed{" + gold + "}", "The final answer is $\\boxed{" + gold + "}$."):
            if extract_boxed(text) != gold.strip() or not grade(extract_boxed(text), gold):
                failures.append(text)
    assert failures == []


# --- extract_answer: the --answer_extraction modes over generated texts -----------------------------------------

# Answers of every kind the embedded set writes (integers, negative integers, fractions, polynomials), each once.
ANSWERS = sorted({row["answer"] for row in embedded_records("embedded:200")})
# Prose a small model writes around its answer without boxing it; `{d}` is an earlier, distracting number.
PROSE = [
    "So the answer is {a}.",
    "First we get {d}.\n\nTherefore, the final answer is ${a}$.",
    "{d} + 1 = {d1}, and then the result is {a}",
    "The answer is: {a}\n",
    "We compute step by step: {d}, {d1}, and finally ${a}$.",
]
BOXED = [
    r"The answer is $\boxed{{{a}}}$.",
    r"We get {d}. So $x = \boxed{{{a}}}$. (Checked {d1} times.)",
    r"First \boxed{{{d}}} was wrong; the answer is \boxed{{{a}}}",
]


def _plain(answer: str) -> str | None:
    """The answer as plain text (`-\\frac{3}{4}` -> `-3/4`), or None for a polynomial, which has no plain number."""
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", answer)
    if m:
        return f"{m[1]}{m[2]}/{m[3]}"
    return answer if re.fullmatch(r"-?\d+", answer) else None


def _texts(templates: list[str], answer: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for template in templates:
        d = rng.randint(2, 999)
        out.append(template.format(a=answer, d=d, d1=d + 1))
    return out


def test_boxed_mode_is_extract_boxed_and_ignores_unboxed_answers():
    for i, answer in enumerate(ANSWERS):
        for text in _texts(BOXED, answer, i):
            assert extract_answer(text, "boxed") == extract_boxed(text) == answer, text
        for text in _texts(PROSE, answer, i):
            assert extract_answer(text, "boxed") is None, text


def test_a_box_wins_over_later_numbers_in_every_mode():
    for i, answer in enumerate(ANSWERS):
        for text in _texts(BOXED, answer, i):
            for mode in ANSWER_EXTRACTIONS:
                assert grade(extract_answer(text, mode), answer), (mode, text)


def test_last_number_reads_unboxed_numeric_answers_after_distracting_numbers():
    numeric = [(a, _plain(a)) for a in ANSWERS if _plain(a) is not None]
    assert len(numeric) > 20 and any("/" in p for _, p in numeric) and any(p.startswith("-") for _, p in numeric)
    for i, (answer, plain) in enumerate(numeric):
        for text in _texts(PROSE, plain, i):
            assert extract_answer(text, "boxed-then-last-number") == plain, text
            assert grade(extract_answer(text, "boxed-then-last-number"), answer), text


def test_math_verify_reads_unboxed_latex_answers():
    latex = [a for a in ANSWERS if "\\frac" in a or "x" in a]
    assert any("x" in a for a in latex) and any("\\frac" in a for a in latex)
    failures = []
    for i, answer in enumerate(latex):
        for text in _texts(PROSE, answer, i):
            if "$" in text and not grade(extract_answer(text, "math-verify"), answer):
                failures.append(text)
    assert failures == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The total is 1,000,000 dollars.", "1000000"),
        ("x = -3.5, so", "-3.5"),
        ("from 12 to 3/4.", "3/4"),
        ("version v2 of 7 apples", "7"),
        ("1,2,3", "3"),
        ("no digits at all", None),
        ("", None),
    ],
)
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


@pytest.mark.parametrize("text", ["", "I do not know.", r"The answer is \boxed{}.", "A word, then another."])
def test_texts_without_an_answer_give_none_in_every_mode(text):
    for mode in ANSWER_EXTRACTIONS:
        assert extract_answer(text, mode) is None, mode


def test_unknown_mode_names_the_allowed_ones():
    with pytest.raises(ValueError, match="answer_extraction must be one of boxed, boxed-then-last-number, math-verify"):
        extract_answer("5", "last")


def test_math_verify_extraction_in_non_main_thread():
    results = {}

    def worker():
        results["pred"] = extract_answer(r"so the final answer is $\frac{7}{12}$.", "math-verify")

    t = threading.Thread(target=worker)
    t.start()
    t.join(timeout=60)
    assert results == {"pred": r"\frac{7}{12}"}
