"""The embedded problem set: deterministic, spread over five levels, answers correct and gradable."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest
import sympy
from latex2sympy2_extended import latex2sympy

from conftest import ROOT, run_job
from ray_pipeline.answers import grade
from ray_pipeline.data import load_problems
from ray_pipeline.errors import PipelineError
from ray_pipeline.problem_set import DEFAULT_SIZE, LEVELS, embedded_records, embedded_size, is_embedded

pytestmark = pytest.mark.fast

ALL = embedded_records("embedded")
_MATH_RE = re.compile(r"\$([^$]*)\$")


def _solve(problem: str) -> sympy.Expr:
    """The problem's answer worked out independently of the generator, from its text with SymPy."""
    maths = _MATH_RE.findall(problem)
    if problem.startswith("Solve for $x$"):
        x = sympy.Symbol("x")
        (root,) = sympy.solve(latex2sympy(maths[1]), x)
        return root
    if problem.startswith("What is the monic quadratic"):
        x = sympy.Symbol("x")
        p, q = (int(m) for m in maths[1:])
        return sympy.expand((x - p) * (x - q))
    if problem.startswith("What is the sum of the integers"):
        low, high = (int(m) for m in maths)
        return sympy.Integer(sum(range(low, high + 1)))
    if problem.startswith("What is the least common multiple"):
        return sympy.ilcm(*(int(m) for m in maths))
    if problem.startswith("Pencils cost"):
        price, count, extra = (int(m) for m in maths)
        return sympy.Integer(price * count + extra)
    if problem.startswith("A bag holds"):
        red, blue = (int(m) for m in maths)
        return sympy.Rational(red, red + blue)
    assert problem.startswith("What is"), problem
    return sympy.nsimplify(latex2sympy(maths[0]).doit())


def _equivalent_form(answer: str) -> str:
    """The same value written another way: `a/b` for `\\frac{a}{b}`, `n.0` for an integer, terms reordered."""
    frac = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", answer)
    if frac:
        return f"{frac[1]}{frac[2]}/{frac[3]}"
    if re.fullmatch(r"-?\d+", answer):
        return answer + ".0"
    terms = re.findall(r"[+-]?[^+-]+", answer)
    assert len(terms) >= 2, answer
    return "".join(t if t[0] in "+-" else "+" + t for t in reversed(terms)).lstrip("+")


def test_rows_look_like_math500():
    assert len(ALL) == DEFAULT_SIZE
    for row in ALL:
        assert set(row) == {"problem", "answer", "unique_id", "subject", "level"}
        assert row["subject"] in {"Prealgebra", "Algebra", "Number Theory", "Counting & Probability"}
        assert row["problem"].strip() and row["answer"].strip()
    assert len({row["unique_id"] for row in ALL}) == len(ALL)


def test_levels_spread_evenly_over_every_prefix():
    assert Counter(row["level"] for row in ALL) == {level: DEFAULT_SIZE // LEVELS for level in range(1, LEVELS + 1)}
    for k in (1, 5, 7, 23):
        counts = Counter(row["level"] for row in embedded_records(f"embedded:{k}"))
        assert max(counts.values()) - min(counts.values(), default=0) <= 1
        assert sorted(counts) == list(range(1, min(k, LEVELS) + 1))


def test_a_prefix_is_the_smaller_set_and_generation_is_deterministic_across_processes():
    assert embedded_records("embedded:37") == ALL[:37]
    code = "import json; from ray_pipeline.problem_set import embedded_records; print(json.dumps(embedded_records()))"
    for seed in ("0", "12345"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert json.loads(out.stdout) == ALL


def test_every_answer_is_what_sympy_computes_from_the_problem_text():
    wrong = []
    for row in ALL:
        expected = _solve(row["problem"])
        if sympy.simplify(latex2sympy(row["answer"]) - expected) != 0:
            wrong.append((row["problem"], row["answer"], expected))
    assert wrong == []


def test_answers_use_math_forms():
    kinds = Counter()
    for row in ALL:
        a = row["answer"]
        if re.fullmatch(r"-?\d+", a):
            kinds["integer"] += 1
        elif re.fullmatch(r"-?\\frac\{\d+\}\{\d+\}", a):
            kinds["fraction"] += 1
            assert sympy.Rational(*map(int, re.findall(r"\d+", a))).q == int(re.findall(r"\d+", a)[1]), a
        else:
            assert re.fullmatch(r"x\^2([+-]\d*x)?([+-]\d+)?", a), a
            kinds["polynomial"] += 1
    assert min(kinds.values()) > 0 and set(kinds) == {"integer", "fraction", "polynomial"}


def test_every_answer_grades_equal_to_itself_and_an_equivalent_form_and_not_to_another_value():
    for row in ALL:
        a = row["answer"]
        assert grade(a, a), a
        assert grade(_equivalent_form(a), a), (a, _equivalent_form(a))
        off_by_one = sympy.latex(latex2sympy(a) + 1)
        assert not grade(off_by_one, a), (a, off_by_one)


def test_from_level_3_echoing_the_question_is_not_an_answer():
    for row in ALL:
        if row["level"] >= 3:
            for expression in _MATH_RE.findall(row["problem"]):
                assert not grade(expression, row["answer"]), (row["problem"], expression)


@pytest.mark.parametrize(("name", "size"), [("embedded", DEFAULT_SIZE), ("embedded:1", 1), ("embedded:200", 200)])
def test_embedded_names_and_sizes(name, size):
    assert is_embedded(name) and embedded_size(name) == size
    table = load_problems(name, shard_size=7)
    assert table.num_rows == size
    assert table.column("gold").to_pylist() == [row["answer"] for row in ALL[:size]]


@pytest.mark.parametrize("name", ["embedded:", "embedded:0", "embedded:-3", "embedded:abc", "embedded:1.5"])
def test_bad_embedded_size_is_one_actionable_error(name):
    with pytest.raises(PipelineError, match=r"must be an integer in \[1, 100000\], e\.g\. embedded:100"):
        load_problems(name)


@pytest.mark.parametrize("name", ["embeddedx", "my/embedded", "Embedded"])
def test_other_names_are_not_the_embedded_set(name):
    assert not is_embedded(name)


def test_job_refuses_a_bad_embedded_size_with_exit_2():
    result = run_job("jobs.infer", "--dataset", "embedded:0", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: data set 'embedded:0'")
