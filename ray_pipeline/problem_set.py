"""The embedded problem set: short math problems this project generates itself, with exact MATH-style answers.

`--dataset embedded` (500 problems) or `--dataset embedded:K` (the first K) needs no download. Problem i is
level `i % 5 + 1`, so any prefix is spread evenly over the five levels, and its text and answer depend only on
i (a seeded `random.Random` per problem), so a prefix of a larger set is the smaller set. Levels run from one-step
addition of small numbers (1) to probabilities, polynomials from their roots and least common multiples (5); with
the chat prompt, 128 tokens and math-verify extraction SmolLM2-135M-Instruct got 54 %, 26 %, 0 %, 0 % and 1 % of
its samples right on levels 1 to 5 (`make run`: 100 problems x 4). Answers are written as MATH writes them: integers,
`\\frac{p}{q}` in lowest terms, and polynomials such as `x^2+5x+6`. From level 3 on, no problem holds an
expression equal to its answer, so a model that echoes the question is not graded correct.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from fractions import Fraction

from ray_pipeline.errors import PipelineError

EMBEDDED_DATASET = "embedded"
DEFAULT_SIZE = 500
MAX_SIZE = 100_000
LEVELS = 5
# Part of every problem's seed: changing a generator changes this, so old ids never name new problems.
VERSION = "v1"


def is_embedded(dataset: str) -> bool:
    """True for `embedded` and `embedded:K`."""
    return dataset == EMBEDDED_DATASET or dataset.startswith(EMBEDDED_DATASET + ":")


def embedded_size(dataset: str) -> int:
    """The K of `embedded:K` (DEFAULT_SIZE for plain `embedded`); a bad K is a one-line error."""
    if dataset == EMBEDDED_DATASET:
        return DEFAULT_SIZE
    text = dataset[len(EMBEDDED_DATASET) + 1 :]
    if not text.isdigit() or not 1 <= int(text) <= MAX_SIZE:
        raise PipelineError(
            f"data set {dataset!r}: the embedded set's size must be an integer in [1, {MAX_SIZE}], "
            f"e.g. {EMBEDDED_DATASET}:100"
        )
    return int(text)


def _frac(q: Fraction) -> str:
    """MATH's form of a rational: an integer, or `\\frac{p}{q}` in lowest terms with the sign in front."""
    if q.denominator == 1:
        return str(q.numerator)
    sign = "-" if q < 0 else ""
    return f"{sign}\\frac{{{abs(q.numerator)}}}{{{q.denominator}}}"


def _poly(coeffs: list[int], var: str = "x") -> str:
    """`[1, 5, 6]` -> `x^2+5x+6`: highest power first, zero terms dropped, unit coefficients implicit."""
    degree = len(coeffs) - 1
    out = ""
    for i, c in enumerate(coeffs):
        power = degree - i
        if c == 0:
            continue
        mag = abs(c)
        body = str(mag) if power == 0 or mag != 1 else ""
        if power >= 1:
            body += var + (f"^{power}" if power > 1 else "")
        sign = "-" if c < 0 else ("+" if out else "")
        out += sign + body
    return out or "0"


def _add_small(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return "Prealgebra", f"What is ${a} + {b}$?", str(a + b)


def _add_sub_two_digit(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return "Prealgebra", f"What is ${a} + {b}$?", str(a + b)
    a, b = max(a, b), min(a, b)
    return "Prealgebra", f"What is ${a} - {b}$?", str(a - b)


def _times_table(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    return "Prealgebra", f"What is ${a} \\times {b}$?", str(a * b)


def _shopping(rng: random.Random) -> tuple[str, str, str]:
    price, count, extra = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 30)
    problem = (
        f"Pencils cost ${price}$ dollars each. Sam buys ${count}$ pencils and a notebook that costs ${extra}$ "
        "dollars. How many dollars does Sam spend in all?"
    )
    return "Prealgebra", problem, str(price * count + extra)


def _linear_equation(rng: random.Random) -> tuple[str, str, str]:
    while True:
        a, x, b = rng.randint(2, 9), rng.randint(-12, 15), rng.randint(1, 40)
        # The root must not be a number the question shows, or echoing it would count.
        if x not in (a, b, a * x + b):
            break
    return "Algebra", f"Solve for $x$: ${a}x + {b} = {a * x + b}$.", str(x)


def _probability(rng: random.Random) -> tuple[str, str, str]:
    while True:
        red, blue = rng.randint(1, 12), rng.randint(1, 12)
        p = Fraction(red, red + blue)
        if p.denominator > 2:
            break
    problem = (
        f"A bag holds ${red}$ red marbles and ${blue}$ blue marbles. One marble is drawn at random. What is the "
        "probability that it is red? Express your answer as a common fraction."
    )
    return "Counting & Probability", problem, _frac(p)


def _quadratic_from_roots(rng: random.Random) -> tuple[str, str, str]:
    p, q = rng.choice([-1, 1]) * rng.randint(1, 9), rng.choice([-1, 1]) * rng.randint(1, 9)
    problem = f"What is the monic quadratic polynomial in $x$ whose roots are ${p}$ and ${q}$? Expand it."
    return "Algebra", problem, _poly([1, -(p + q), p * q])


def _lcm(rng: random.Random) -> tuple[str, str, str]:
    while True:
        a, b = rng.randint(6, 40), rng.randint(6, 40)
        if math.lcm(a, b) > max(a, b):
            break
    return "Number Theory", f"What is the least common multiple of ${a}$ and ${b}$?", str(math.lcm(a, b))


def _series_sum(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(11, 60)
    return "Algebra", f"What is the sum of the integers from $1$ to ${n}$?", str(n * (n + 1) // 2)


# Level -> the generators it draws from; each returns (subject, problem, answer).
GENERATORS: dict[int, list[Callable[[random.Random], tuple[str, str, str]]]] = {
    1: [_add_small],
    2: [_add_sub_two_digit, _times_table],
    3: [_shopping],
    4: [_linear_equation, _series_sum],
    5: [_probability, _quadratic_from_roots, _lcm],
}


def make_problem(index: int) -> dict:
    """Problem `index` of the embedded set, a row like MATH-500's (problem, answer, unique_id, subject, level)."""
    level = index % LEVELS + 1
    rng = random.Random(f"{EMBEDDED_DATASET}-{VERSION}:{index}")
    subject, problem, answer = rng.choice(GENERATORS[level])(rng)
    slug = subject.lower().replace(" ", "_")
    return {
        "problem": problem,
        "answer": answer,
        "unique_id": f"{EMBEDDED_DATASET}/{slug}/{index}.json",
        "subject": subject,
        "level": level,
    }


def embedded_records(dataset: str = EMBEDDED_DATASET) -> list[dict]:
    """The rows `--dataset embedded[:K]` names."""
    return [make_problem(i) for i in range(embedded_size(dataset))]
