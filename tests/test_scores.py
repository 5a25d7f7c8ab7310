"""Chunked confidence scores against a float64 reference."""

import math

import pytest
import torch

from ray_pipeline.scores import (
    coe_transitions,
    logit_statistics,
    option_probability,
    response_means,
    step_index,
    step_means,
    step_texts,
    token_scores,
)


def reference(hidden, weight, targets, bias=None, top_k=20):
    """Float64, unchunked, straight from the definitions."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    p = torch.softmax(z, -1)
    logp = torch.log_softmax(z, -1)
    vocab = z.shape[-1]
    entropy = -(p * logp).sum(-1)
    kl_uniform = (torch.full_like(p, 1 / vocab) * (math.log(1 / vocab) - logp)).sum(-1)
    confidence = -torch.sort(logp, dim=-1, descending=True).values[:, : min(top_k, vocab)].mean(-1)
    return entropy, kl_uniform, logp.gather(-1, targets[:, None]).squeeze(-1), confidence


@pytest.mark.parametrize(
    ("tokens", "vocab", "token_chunk", "vocab_chunk", "scale", "top_k"),
    [
        (7, 50, 256, 16384, 1.0, 20),  # one chunk
        (33, 1000, 8, 128, 3.0, 20),  # vocabulary larger than one chunk, uneven last chunk
        (65, 5003, 16, 1024, 10.0, 20),  # peaked distributions (large logits)
        (5, 300, 2, 7, 0.01, 20),  # nearly uniform; vocabulary chunks smaller than k
        (9, 40, 4, 16, 2.0, 64),  # k larger than the vocabulary
    ],
)
def test_token_scores_match_float64_reference(tokens, vocab, token_chunk, vocab_chunk, scale, top_k):
    gen = torch.Generator().manual_seed(tokens * vocab)
    hidden = torch.randn(tokens, 16, generator=gen) * scale
    weight = torch.randn(vocab, 16, generator=gen)
    bias = torch.randn(vocab, generator=gen)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    got = token_scores(
        hidden, weight, targets, bias=bias, token_chunk=token_chunk, vocab_chunk=vocab_chunk, top_k=top_k
    )
    want_h, want_sc, want_lp, want_conf = reference(hidden, weight, targets, bias, top_k)
    tol = dict(rtol=1e-4, atol=2e-4 * max(1.0, scale))
    torch.testing.assert_close(got.entropy.double(), want_h, **tol)
    torch.testing.assert_close(got.self_certainty.double(), want_sc, **tol)
    torch.testing.assert_close(got.logprob.double(), want_lp, **tol)
    torch.testing.assert_close(got.confidence.double(), want_conf, **tol)
    assert (got.entropy >= 0).all() and (got.self_certainty >= 0).all() and (got.confidence >= 0).all()
    assert got.entropy.dtype == torch.float32 and got.confidence.dtype == torch.float32


def test_logit_statistics_is_the_unchunked_definition():
    gen = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(9, 8, generator=gen), torch.randn(77, 8, generator=gen)
    targets = torch.randint(0, 77, (9,), generator=gen)
    full = logit_statistics(hidden @ weight.T, targets)
    chunked = token_scores(hidden, weight, targets, token_chunk=4, vocab_chunk=10)
    for name in ("entropy", "self_certainty", "logprob", "confidence"):
        torch.testing.assert_close(getattr(full, name), getattr(chunked, name), rtol=1e-4, atol=1e-4)


def test_uniform_and_one_hot_limits():
    vocab = 64
    weight = torch.eye(vocab)
    uniform = token_scores(torch.zeros(1, vocab), weight, torch.tensor([3]), vocab_chunk=10)
    assert uniform.entropy.item() == pytest.approx(math.log(vocab), abs=1e-5)
    assert uniform.self_certainty.item() == pytest.approx(0.0, abs=1e-5)
    assert uniform.logprob.item() == pytest.approx(-math.log(vocab), abs=1e-5)
    assert uniform.confidence.item() == pytest.approx(math.log(vocab), abs=1e-5)
    peaked = token_scores(40.0 * torch.eye(vocab)[:1], weight, torch.tensor([0]), vocab_chunk=10)
    assert peaked.entropy.item() == pytest.approx(0.0, abs=1e-4)
    assert peaked.self_certainty.item() == pytest.approx(40.0 * (vocab - 1) / vocab - math.log(vocab), rel=1e-4)


def test_step_index_splits_at_blank_lines_then_single_newlines():
    pieces = ["First", " step", ".\n", "\n", "Second", "\n\n", "Answer", " 5"]
    assert step_index(pieces) == [0, 0, 0, 0, 1, 1, 2, 2]
    assert step_index(["a", "\n", "b", "\n", "c"]) == [0, 0, 1, 1, 2]
    assert step_index(["no", " breaks"]) == [0, 0]
    assert step_index([]) == []


def test_step_means_and_texts():
    values = torch.tensor([1.0, 3.0, 10.0, 2.0, 4.0])
    means = step_means(values, [0, 0, 1, 2, 2])
    torch.testing.assert_close(means, torch.tensor([2.0, 10.0, 3.0]))
    assert step_means(torch.zeros(0), []).numel() == 0
    pieces = ["First", ".\n\n", "Then", "\n\n", "5"]
    assert step_texts(pieces, step_index(pieces)) == ["First.\n\n", "Then\n\n", "5"]
    assert step_texts([], []) == []


def coe_reference(layers):
    """CoE features with plain float64 Python loops, as the paper defines them."""
    import numpy as np

    h = [np.asarray(x, dtype=np.float64) for x in layers]

    def angle(a, b):
        return math.acos(max(-1.0, min(1.0, float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)))))

    mags = [float(np.linalg.norm(h[i + 1] - h[i])) for i in range(len(h) - 1)]
    angs = [angle(h[i + 1], h[i]) for i in range(len(h) - 1)]
    span_m, span_a = float(np.linalg.norm(h[-1] - h[0])), angle(h[-1], h[0])
    return mags, angs, span_m, span_a


def test_coe_transitions_match_float64_reference():
    gen = torch.Generator().manual_seed(5)
    layers = torch.randn(13, 32, generator=gen).cumsum(0)  # a drifting chain of 12 transitions
    got = coe_transitions(layers)
    mags, angs, span_m, span_a = coe_reference(layers.double().numpy())
    torch.testing.assert_close(got.magnitude, torch.tensor(mags, dtype=torch.float64))
    torch.testing.assert_close(got.angle, torch.tensor(angs, dtype=torch.float64))
    assert (got.span_magnitude, got.span_angle) == (pytest.approx(span_m), pytest.approx(span_a))
    # Points on one ray from the origin: every angle, so the angle span too, is 0 (CoE is undefined:
    # tests/test_aggregates.py).
    line = coe_transitions(torch.arange(1.0, 5.0)[:, None] * torch.ones(1, 4))
    assert line.span_angle == 0.0 and (line.angle == 0).all()


def test_response_means_weight_each_rows_response_positions():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 7, 5, generator=gen, dtype=torch.float64)
    spans = [(2, 6), (0, 1), (4, 7)]
    weights = torch.zeros(3, 7)
    for b, (start, end) in enumerate(spans):
        weights[b, start:end] = 1.0 / (end - start)
    got = response_means(hidden.to(torch.bfloat16), weights)
    assert got.dtype == torch.float32 and got.shape == (3, 5)
    for b, (start, end) in enumerate(spans):
        want = hidden.to(torch.bfloat16).double()[b, start:end].mean(0)
        torch.testing.assert_close(got[b].double(), want, rtol=1e-6, atol=1e-6)


def test_option_probability_matches_float64_softmax_over_two_logits():
    gen = torch.Generator().manual_seed(9)
    hidden, weight, bias = torch.randn(6, 8, generator=gen), torch.randn(2, 8, generator=gen), torch.randn(2)
    z = hidden.double() @ weight.double().T + bias.double()
    want = torch.softmax(z, -1)[:, 0]
    torch.testing.assert_close(option_probability(hidden, weight, bias).double(), want, rtol=1e-5, atol=1e-6)
    assert option_probability(torch.ones(1, 2), torch.eye(2)).item() == pytest.approx(0.5)
