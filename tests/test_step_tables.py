"""Step boundaries from the vocabulary's newline table equal `step_index` over per-token decoded pieces."""

import random

import pytest
import torch

from ray_pipeline.scores import newline_table, step_index, step_spans, token_steps

# Pieces that exercise every case: empty, newline runs, separators inside, at the start and at the end.
PIECES = ["", "a", " b", "\n", "\n\n", "\n\n\n", "x\n", "\ny", "x\n\ny", "\nz\n", "\n ", " \n", "c"]


def check(ids: list[int], pieces: list[str], table) -> None:
    want = step_index([pieces[i] for i in ids])
    got = token_steps(torch.tensor(ids, dtype=torch.long), table).tolist()
    assert got == want, [pieces[i] for i in ids]


def test_token_steps_equal_step_index_on_generated_piece_sequences():
    table = newline_table(PIECES)
    rng = random.Random(0)
    for _ in range(3000):
        n = rng.randrange(0, 25)
        # Mostly text, newline-heavy pieces often enough to build every straddling pattern.
        ids = [rng.randrange(len(PIECES)) if rng.random() < 0.6 else rng.choice([1, 2, 12]) for _ in range(n)]
        check(ids, PIECES, table)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from ray_pipeline.model import EMBEDDED_MODEL, resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(EMBEDDED_MODEL))


# Pieces of worked solutions as MATH writes them (prose, inline and display LaTeX, aligned equations, lists, code),
# written for this test; `solutions` joins them with every newline pattern a step boundary can meet.
SOLUTION_PARTS = [
    "We start by writing the equation as $2x + 3 = 11$.",
    "Subtracting 3 from both sides gives $2x = 8$, so $x = 4$.",
    "$$\\frac{a}{b} + \\frac{c}{d} = \\frac{ad + bc}{bd}.$$",
    "\\begin{align*}\n(x-3)(x+5) &= x^2 + 2x - 15 \\\\\n&= 0.\n\\end{align*}",
    "There are $\\binom{6}{2} = 15$ ways to choose the pair.",
    "1. Count the red marbles.\n2. Count the blue marbles.\n3. Add them.",
    "- the first case: $n$ is even;\n- the second case: $n$ is odd.",
    "```python\nprint(sum(range(1, 11)))\n```",
    "The probability is $\\dfrac{5}{12}$, since 5 of the 12 outcomes work.",
    "Therefore, the answer is $\\boxed{17}$.",
    "[asy]\ndraw((0,0)--(4,0)--(4,3)--cycle);\nlabel(\"$A$\",(0,0),SW);\n[/asy]",
    "By the Pythagorean theorem, $AB = \\sqrt{3^2 + 4^2} = 5$.",
]
SEPARATORS = ["\n\n", "\n", "\n\n\n", " \n\n", "\n \n", "\n\n ", " ", ":\n", ".\n\n\n\n"]


def solutions(rng: random.Random, count: int) -> list[str]:
    texts = []
    for _ in range(count):
        parts = rng.sample(SOLUTION_PARTS, rng.randint(2, 7))
        text = parts[0]
        for part in parts[1:]:
            text += rng.choice(SEPARATORS) + part
        texts.append(rng.choice(["", "\n", " "]) + text + rng.choice(["", "\n", "\n\n"]))
    return texts


def test_token_steps_equal_step_index_on_real_tokenizer_output(tokenizer):
    """Many responses: worked solutions tokenized, with and without blank lines, and random token ids."""
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    table = newline_table(pieces)
    newline_ids = [i for i, p in enumerate(pieces) if "\n" in p]
    rng = random.Random(1)
    texts = solutions(rng, 200)
    texts += [t.replace("\n\n", "\n") for t in texts[:100]]
    for text in texts:
        check(tokenizer(text, add_special_tokens=False)["input_ids"], pieces, table)
    for _ in range(200):
        ids = [rng.choice(newline_ids) if rng.random() < 0.1 else rng.randrange(len(tokenizer)) for _ in range(120)]
        check(ids, pieces, table)


def test_step_spans_cover_the_response_in_order():
    steps = torch.tensor([0, 0, 1, 2, 2, 2])
    assert step_spans(steps) == [(0, 2), (2, 3), (3, 6)]
    assert step_spans(torch.zeros(0, dtype=torch.long)) == []
