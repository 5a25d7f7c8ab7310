"""The lambda mix puts self-certainty and negative entropy on one scale: [0, 1], 0 uniform, 1 one-hot."""

import math

import numpy as np
import pytest
import torch

from ray_pipeline.aggregates import mixed_certainty
from ray_pipeline.scores import logit_statistics


def distributions(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Float64 logits `[T, V]` of uniform, random, peaked and (numerically) one-hot next-token distributions."""
    g = torch.Generator().manual_seed(seed)
    random = torch.randn(64, vocab, generator=g, dtype=torch.float64) * torch.rand(64, 1, generator=g).mul(8)
    peaked = torch.randn(64, vocab, generator=g, dtype=torch.float64)
    top = torch.randint(vocab, (64,), generator=g)
    peaked[torch.arange(64), top] += torch.linspace(2, 40, 64, dtype=torch.float64)
    one_hot = torch.full((4, vocab), -1e4, dtype=torch.float64)
    one_hot[:, 0] = 0.0
    uniform = torch.zeros(4, vocab, dtype=torch.float64)
    return {"uniform": uniform, "random": random, "peaked": peaked, "one-hot": one_hot}


def terms(logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The self-certainty term (lambda 1) and the negative-entropy term (lambda 0) of each token."""
    stats = logit_statistics(logits, torch.zeros(logits.shape[0], dtype=torch.long))
    vocab = logits.shape[-1]
    sc, h = stats.self_certainty.numpy(), stats.entropy.numpy()
    return mixed_certainty(sc, h, 1.0, vocab), mixed_certainty(sc, h, 0.0, vocab)


@pytest.mark.parametrize("vocab", [2, 17, 1000, 49152])
@pytest.mark.parametrize("seed", range(3))
def test_both_terms_lie_in_zero_one_and_span_uniform_to_one_hot(vocab, seed):
    cases = distributions(vocab, seed)
    for name, logits in cases.items():
        sc_term, h_term = terms(logits)
        for term in (sc_term, h_term):
            assert ((term >= -1e-12) & (term <= 1.0)).all(), (name, term.min().item(), term.max().item())
        for lam in (0.0, 0.3, 0.7, 1.0):
            mix = lam * sc_term + (1 - lam) * h_term
            assert ((mix >= -1e-12) & (mix <= 1.0)).all()
    uniform_sc, uniform_h = terms(cases["uniform"])
    assert np.abs(uniform_sc).max() < 1e-9 and np.abs(uniform_h).max() < 1e-9
    one_hot_sc, one_hot_h = terms(cases["one-hot"])
    assert one_hot_sc.min() > 1 - 1e-9 and one_hot_h.min() > 1 - 1e-9


def test_peaked_distributions_would_leave_the_old_scale():
    """SC / log V (the old self-certainty term) passes 1 on the peaked tokens; the new term does not."""
    logits = distributions(1000, 0)["peaked"]
    stats = logit_statistics(logits, torch.zeros(logits.shape[0], dtype=torch.long))
    assert (stats.self_certainty / math.log(1000) > 1).float().mean() > 0.3
    assert (terms(logits)[0] < 1).all()


@pytest.mark.parametrize("vocab", [17, 1000])
def test_both_terms_grow_as_a_distribution_sharpens(vocab):
    base = torch.randn(8, vocab, generator=torch.Generator().manual_seed(vocab), dtype=torch.float64)
    previous = None
    for inverse_temperature in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0):
        current = terms(base * inverse_temperature)
        if previous is not None:
            assert all((now > before).all() for now, before in zip(current, previous))
        previous = current


def test_the_mix_applies_to_span_means_and_arrays_as_to_floats():
    sc, h = np.array([0.5, 2.0, 7.0]), np.array([3.0, 1.0, 0.1])
    mixed = mixed_certainty(sc, h, 0.6, 100)
    for i in range(3):
        want = 0.6 * (1 - math.exp(-sc[i].item())) + 0.4 * (1 - h[i].item() / math.log(100))
        assert mixed[i].item() == pytest.approx(want) == mixed_certainty(sc[i].item(), h[i].item(), 0.6, 100)
