"""Chunked confidence scores against a float64 reference."""

import math

import pytest
import torch

from ray_pipeline.scores import (
    combined_self_certainty,
    logit_statistics,
    masked_token_scores,
    step_index,
    step_means,
    token_scores,
)


def reference(hidden, weight, targets, bias=None):
    """Float64, unchunked, straight from the definitions."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    p = torch.softmax(z, -1)
    logp = torch.log_softmax(z, -1)
    vocab = z.shape[-1]
    entropy = -(p * logp).sum(-1)
    kl_uniform = (torch.full_like(p, 1 / vocab) * (math.log(1 / vocab) - logp)).sum(-1)
    return entropy, kl_uniform, logp.gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize(
    ("tokens", "vocab", "token_chunk", "vocab_chunk", "scale"),
    [
        (7, 50, 256, 16384, 1.0),  # one chunk
        (33, 1000, 8, 128, 3.0),  # vocabulary larger than one chunk, uneven last chunk
        (65, 5003, 16, 1024, 10.0),  # peaked distributions (large logits)
        (5, 300, 2, 7, 0.01),  # nearly uniform
    ],
)
def test_token_scores_match_float64_reference(tokens, vocab, token_chunk, vocab_chunk, scale):
    gen = torch.Generator().manual_seed(tokens * vocab)
    hidden = torch.randn(tokens, 16, generator=gen) * scale
    weight = torch.randn(vocab, 16, generator=gen)
    bias = torch.randn(vocab, generator=gen)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    got = token_scores(hidden, weight, targets, bias=bias, token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    want_h, want_sc, want_lp = reference(hidden, weight, targets, bias)
    tol = dict(rtol=1e-4, atol=2e-4 * max(1.0, scale))
    torch.testing.assert_close(got.entropy.double(), want_h, **tol)
    torch.testing.assert_close(got.self_certainty.double(), want_sc, **tol)
    torch.testing.assert_close(got.logprob.double(), want_lp, **tol)
    assert (got.entropy >= 0).all() and (got.self_certainty >= 0).all()
    assert got.entropy.dtype == torch.float32


def test_logit_statistics_is_the_unchunked_definition():
    gen = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(9, 8, generator=gen), torch.randn(77, 8, generator=gen)
    targets = torch.randint(0, 77, (9,), generator=gen)
    full = logit_statistics(hidden @ weight.T, targets)
    chunked = token_scores(hidden, weight, targets, token_chunk=4, vocab_chunk=10)
    for name in ("entropy", "self_certainty", "logprob"):
        torch.testing.assert_close(getattr(full, name), getattr(chunked, name), rtol=1e-4, atol=1e-4)


def test_uniform_and_one_hot_limits():
    vocab = 64
    weight = torch.eye(vocab)
    uniform = token_scores(torch.zeros(1, vocab), weight, torch.tensor([3]), vocab_chunk=10)
    assert uniform.entropy.item() == pytest.approx(math.log(vocab), abs=1e-5)
    assert uniform.self_certainty.item() == pytest.approx(0.0, abs=1e-5)
    assert uniform.logprob.item() == pytest.approx(-math.log(vocab), abs=1e-5)
    peaked = token_scores(40.0 * torch.eye(vocab)[:1], weight, torch.tensor([0]), vocab_chunk=10)
    assert peaked.entropy.item() == pytest.approx(0.0, abs=1e-4)
    assert peaked.self_certainty.item() == pytest.approx(40.0 * (vocab - 1) / vocab - math.log(vocab), rel=1e-4)


def test_padded_batch_equals_rows_scored_alone():
    gen = torch.Generator().manual_seed(7)
    lengths, width, dim, vocab = [5, 1, 9, 0], 12, 8, 300
    hidden = torch.randn(len(lengths), width, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen)
    targets = torch.randint(0, vocab, (len(lengths), width), generator=gen)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    offsets = [2, 0, 3, 0]
    for row, (n, off) in enumerate(zip(lengths, offsets)):
        mask[row, off : off + n] = True
    # Padding positions hold garbage that must not leak into any row.
    hidden[~mask] = 1e4
    rows = masked_token_scores(hidden, weight, targets, mask, token_chunk=4, vocab_chunk=64)
    assert [r.entropy.numel() for r in rows] == lengths
    for row, (n, off) in enumerate(zip(lengths, offsets)):
        h, sc, lp = reference(hidden[row, off : off + n], weight, targets[row, off : off + n])
        torch.testing.assert_close(rows[row].entropy.double(), h, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rows[row].self_certainty.double(), sc, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rows[row].logprob.double(), lp, rtol=1e-4, atol=1e-4)


def test_step_index_splits_at_blank_lines_then_single_newlines():
    pieces = ["First", " step", ".\n", "\n", "Second", "\n\n", "Answer", " 5"]
    assert step_index(pieces) == [0, 0, 0, 0, 1, 1, 2, 2]
    assert step_index(["a", "\n", "b", "\n", "c"]) == [0, 0, 1, 1, 2]
    assert step_index(["no", " breaks"]) == [0, 0]
    assert step_index([]) == []


def test_step_means_and_combined_score():
    values = torch.tensor([1.0, 3.0, 10.0, 2.0, 4.0])
    means = step_means(values, [0, 0, 1, 2, 2])
    torch.testing.assert_close(means, torch.tensor([2.0, 10.0, 3.0]))
    score = combined_self_certainty(token_mean=4.0, step_min=2.0, alpha=0.25, vocab_size=100)
    assert score == pytest.approx((0.25 * 4.0 + 0.75 * 2.0) / math.log(100))
    assert step_means(torch.zeros(0), []).numel() == 0
