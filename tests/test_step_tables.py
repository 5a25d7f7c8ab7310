"""Step boundaries from the vocabulary's newline table equal `step_index` over per-token decoded pieces."""

import json
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


def test_token_steps_equal_step_index_on_real_tokenizer_output(tokenizer, math500):
    """Many responses: MATH-500 solutions re-tokenized, with and without blank lines, and random token ids."""
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    table = newline_table(pieces)
    newline_ids = [i for i, p in enumerate(pieces) if "\n" in p]
    rng = random.Random(1)
    rows = [json.loads(line) for line in math500.read_text().splitlines()[:200]]
    texts = [row["solution"] for row in rows]
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
