"""Grading and grouping a problem's answers once: the cheap keys agree with math-verify, classes with pairwise grouping.

The battery below covers the kinds of answers MATH solutions give, each in several written forms:
integers, fractions and decimals, radicals and pi, polynomials, equations, intervals, sets and
tuples, percentages, degrees, text and symbols, complex numbers, and answers math-verify cannot
compare. Every pair the keys decide must get math-verify's own answer (`answers_equivalent`, and
`grade` in both directions), and grouping must equal the clique grouping done with math-verify alone
(tests/test_answer_classes.py checks the cliques and their order independence on generated cases).
"""

import itertools
import logging
import random
import threading
from functools import cache

import math_verify.grader
import numpy as np
import pytest

from ray_pipeline import answers, grading
from ray_pipeline.answers import answers_equivalent, grade, timeouts
from ray_pipeline.grading import decide_equivalent, grade_and_group, parse_answer


def integer_forms(v: int) -> list[str]:
    forms = [str(v), f"{v}.0", f"\\frac{{{2 * v}}}{{2}}", f"{{{v}}}", f"{v}\\%", f"x={v}", f"\\text{{{v}}}"]
    return forms + ([f"+{v}", f"0{v}", f"{v}^\\circ", f"{v}^{{\\circ}}"] if v > 0 else [])


def fraction_forms(a: int, b: int) -> list[str]:
    sign = "-" if a < 0 else ""
    forms = [f"{sign}\\frac{{{abs(a)}}}{{{b}}}", f"{sign}\\dfrac{{{abs(a)}}}{{{b}}}", f"{a}/{b}", f"{a / b:.6f}"]
    forms += [f"{a / b:.2f}", f"\\frac{{{2 * a}}}{{{2 * b}}}"]
    if abs(a) < 10 and b < 10:
        forms.append(f"{sign}\\dfrac{abs(a)}{b}")
    return forms


BATTERY = sorted(
    set(
        integer_forms(0)
        + integer_forms(7)
        + integer_forms(-3)
        + integer_forms(1000)
        + ["1,000", "1{,}000", "10^{3}", "1e3", "12", "21", "1000000000000000000001", "1000000000000000000000"]
        + fraction_forms(1, 2)
        + fraction_forms(-3, 4)
        + fraction_forms(5, 12)
        + fraction_forms(7, 3)
        + ["0.5", ".5", "50\\%", "50", "0.50"]
        + ["\\sqrt{2}", "2^{1/2}", "\\frac{\\sqrt{8}}{2}", "1.414214", "1.41", "2\\sqrt{3}", "\\sqrt{12}", "3\\sqrt{2}"]
        + ["\\pi", "3.141593", "\\frac{\\pi}{2}", "\\frac{2\\pi}{4}", "90^\\circ", "\\frac{\\pi}{3}"]
        + ["x^2-5x+6", "(x-2)(x-3)", "x^2 - 5x + 6", "x^2-5x-6", "(x+1)^2", "x^2+2x+1", "y^2+2y+1", "2x+2"]
        + ["x=2", "y=2", "x = 2", "x=3", "2", "3", "x>3", "x<3", "(-\\infty,3)", "(3,\\infty)"]
        + ["(1,2)", "[1,2]", "\\{1,2\\}", "\\{2,1\\}", "1,2", "(2,1)", "\\{3\\}", "\\{7\\}", "(1,2,3)", "\\emptyset"]
        + ["\\text{(C)}", "C", "(C)", "c", "\\text{Monday}", "Monday", "e", "\\infty", "-\\infty"]
        + ["i", "2+3i", "3i+2", "2-3i", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\3\\end{pmatrix}"]
        + ["$$", "{}", "\\text{}", "?", "\\frac{1}{0}", "9^{9^{9}}", "2" * 1100]
    )
)
GOLDS = ["7", "-\\frac{3}{4}", "\\frac{5}{12}", "1000", "\\sqrt{2}", "x^2-5x+6", "x=2", "(1,2)", "\\{1,2\\}"]
GOLDS += ["\\text{(C)}", "50\\%", "\\frac{\\pi}{2}", "2+3i", "\\{3\\}", "0"]


@cache
def reference_equivalent(a: str, b: str) -> bool:
    return answers_equivalent(a, b)


def test_the_keys_decide_most_pairs_and_always_as_math_verify_does():
    decided = valued = valued_decided = 0
    pairs = list(itertools.combinations(BATTERY, 2))
    # Every pair the keys call equal, and a seeded sample of those they call different (SymPy is slow on these).
    checked = set(random.Random(3).sample(range(len(pairs)), 1500))
    for i, (a, b) in enumerate(pairs):
        pa, pb = parse_answer(a), parse_answer(b)
        decision = decide_equivalent(pa, pb)
        if decision is not None:
            decided += 1
            if decision or i in checked:
                assert decision == reference_equivalent(a, b), (a, b, decision)
        if pa.value is not None and pb.value is not None:
            valued += 1
            valued_decided += decision is not None
    # The point of the keys: most pairs never reach SymPy. The battery is rich in the kinds that have no value
    # (relations, sets, symbols), which math-verify compares; answers with a value are decided almost always.
    assert decided > 0.4 * len(pairs) and valued_decided > 0.95 * valued, (decided, valued_decided, valued)


@pytest.mark.parametrize("gold", GOLDS)
def test_the_keys_grade_as_grade_does(gold):
    for pred in BATTERY:
        decision = decide_equivalent(parse_answer(gold), parse_answer(pred))
        if decision is not None:
            assert decision == grade(pred, gold), (pred, gold)


def clique_groups(preds):
    """The class rule with math-verify alone: distinct answers, most common first (ties: by string), each joins the
    first class all of whose members are equivalent to it; classes numbered by first appearance in `preds`."""
    counts = {p: preds.count(p) for p in preds if p is not None}
    classes = []
    for pred in sorted(counts, key=lambda p: (-counts[p], p)):
        home = next((c for c in classes if all(reference_equivalent(m, pred) for m in c)), None)
        if home is None:
            classes.append(home := [])
        home.append(pred)
    number: dict[int, int] = {}
    labels = []
    for pred in preds:
        if pred is None:
            labels.append(-1)
            continue
        c = next(i for i, members in enumerate(classes) if pred in members)
        labels.append(number.setdefault(c, len(number)))
    return labels


def test_classes_equal_clique_grouping_and_grades_equal_grade():
    rng = random.Random(0)
    # Answers that are equivalent to themselves: an answer that is not (nothing parses) is one class with its copies.
    pool = [a for a in BATTERY if reference_equivalent(a, a) and len(a) < 100]
    for _ in range(30):
        preds = [rng.choice(pool) if rng.random() > 0.1 else None for _ in range(rng.randint(1, 14))]
        preds += rng.sample([p for p in preds if p is not None], k=min(3, sum(p is not None for p in preds)))
        gold = rng.choice(GOLDS)
        graded = grade_and_group(preds, gold)
        assert graded.labels.tolist() == clique_groups(preds), preds
        assert graded.correct == [p is not None and grade(p, gold) for p in preds], (preds, gold)
        assert graded.distinct == len({p for p in preds if p is not None})


def test_classes_of_transitive_answers_do_not_depend_on_their_order():
    # Within each value's forms equivalence is transitive, so every order gives the same partition.
    forms = fraction_forms(1, 2)[:4] + integer_forms(7)[:3] + ["x^2-5x+6", "(x-2)(x-3)"]
    rng = random.Random(1)
    want = None
    for _ in range(10):
        order = rng.sample(forms, len(forms))
        labels = grade_and_group(order, None).labels.tolist()
        partition = sorted(sorted(f for f, label in zip(order, labels) if label == c) for c in set(labels))
        assert want is None or partition == want
        want = partition
    assert len(want) == 3


@pytest.mark.fast
def test_identical_strings_share_a_class_even_when_nothing_parses():
    graded = grade_and_group(["$$", "7", "$$", None, "7.0"], "7")
    assert graded.labels.tolist() == [0, 1, 0, -1, 1]
    assert graded.correct == [False, True, False, False, True]
    assert graded.correct[0] == grade("$$", "7")


@pytest.mark.fast
def test_plain_numbers_skip_the_parse_and_are_what_math_verify_parses():
    rng = random.Random(2)
    cases = ["0", "-0", "+5", "007", "\\frac{0}{5}", "\\dfrac12", "-\\tfrac{3}{9}", "4/2", "12345678901234567890"]
    cases += ["0.50", "-0.5", "0.05", "00.5", "10.5", "2.50", "361.0", "0.0", "-0.0"]
    for _ in range(200):
        a, b = rng.randint(0, 10 ** rng.randint(1, 9)), rng.randint(1, 10 ** rng.randint(1, 4))
        cases += [str(a), f"-{a}", f"\\frac{{{a}}}{{{b}}}", f"{a}/{b}", f"-\\dfrac{{{a}}}{{{b}}}"]
        cases += [f"{a}.{b}", f"-{a}.{str(b).zfill(5)}", f"{a % 100}.{b}0"]
    for text in cases:
        fast = parse_answer(text)
        slow = [e for e in answers._parse(text, 5) if not isinstance(e, str)]
        assert len(slow) == 1 and fast.exprs[0] == slow[0] and type(fast.exprs[0]) is type(slow[0]), text
    # A zero denominator is no plain number: math-verify's own parse (zoo) decides it. Neither is 0.5, which
    # math-verify reads as the fraction 1/2 (its string part is \frac{1}{2}), nor .5.
    assert parse_answer("1/0").value is None
    for text in ("0.5", ".5", "5."):
        assert grading._plain_number(text) is None


def block(*args, **kwargs):
    """A comparison that does not return within a minute: math-verify's alarm (an exception raised in this thread)
    ends it first; without one it returns False untimed, and the count below fails."""
    threading.Event().wait(60)
    return False


def test_timeouts_are_counted_and_never_printed(monkeypatch, capsys):
    """A comparison that never finishes times out on any machine: SymPy's comparison is replaced by one that blocks.

    (A comparison that is merely slow, such as expanding (x + 1)^400, finished within the second on a fast machine.)
    """
    monkeypatch.setattr(answers, "MAIN_THREAD_TIMEOUT_S", 1)
    monkeypatch.setattr(math_verify.grader, "sympy_expr_eq", block)
    logging.lastResort.setLevel(logging.WARNING)
    before = timeouts()
    # Equivalence needs both directions (verify is not symmetric); the first times out after its second, which
    # counts as "not equivalent", so the second is not run.
    assert answers_equivalent("(x+1)^{4}", "x^{4}+1") is False
    assert timeouts() == before + 1
    assert grade("x^{4}+1", "(x+1)^{4}") is False
    assert timeouts() == before + 2
    logging.getLogger("math_verify.grader").warning("Timeout during comparison")
    assert timeouts() == before + 3
    captured = capsys.readouterr()
    assert "Timeout" not in captured.out + captured.err


@pytest.mark.fast
def test_values_are_probed_at_the_same_point_in_every_process():
    a, b = parse_answer("x^2-5x+6"), parse_answer("(x-2)(x-3)")
    assert a.value is not None and abs(a.value - b.value) < 1e-9
    assert np.isfinite(abs(parse_answer("\\{3\\}").value)) and parse_answer("50\\%").value is None
    assert parse_answer("x=2").value is None and parse_answer("C").value is None
