"""The lambda mix puts self-certainty and negative entropy on one scale: nats over log V, 0 for uniform.

The entropy term lies in [0, 1]; the self-certainty term grows without bound as a distribution
sharpens, so it keeps ordering spans however sharp they are, at every lambda.
"""

import math

import numpy as np
import pytest
import torch

from ray_pipeline.aggregates import mixed_certainty
from ray_pipeline.reduce import select_questions
from ray_pipeline.scores import logit_statistics
from ray_pipeline.selection import SelectionParams, self_certainty_score


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
def test_both_terms_start_at_zero_and_the_entropy_term_ends_at_one(vocab, seed):
    cases = distributions(vocab, seed)
    for name, logits in cases.items():
        sc_term, h_term = terms(logits)
        assert (sc_term >= -1e-12).all(), name
        assert ((h_term >= -1e-12) & (h_term <= 1.0 + 1e-12)).all(), (name, h_term.min(), h_term.max())
    uniform_sc, uniform_h = terms(cases["uniform"])
    assert np.abs(uniform_sc).max() < 1e-9 and np.abs(uniform_h).max() < 1e-9
    one_hot_sc, one_hot_h = terms(cases["one-hot"])
    # Near one-hot: the entropy term reaches 1, and the self-certainty term is far past it.
    assert one_hot_h.min() > 1 - 1e-9 and one_hot_sc.min() > 10


def test_peaked_distributions_take_the_self_certainty_term_past_the_entropy_term_s_range():
    """SC / log V passes 1 on the peaked tokens: a saturating map would squeeze them together."""
    logits = distributions(1000, 0)["peaked"]
    sc_term, h_term = terms(logits)
    assert (sc_term > 1).mean() > 0.3 and (h_term <= 1 + 1e-12).all()


LAMBDAS = [1e-6, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0]


@pytest.mark.parametrize("sc", [5.0, 40.0, 400.0])
@pytest.mark.parametrize("lam", LAMBDAS)
def test_a_hundredth_of_a_nat_of_self_certainty_orders_candidates_at_any_certainty(sc, lam):
    """At SC = 36.7 the old map 1 - exp(-SC) was 1.0 in float64: candidates tied and the first won."""

    def candidate(token_sc):
        return {
            "pred": "1", "token_count": 5, "vocab_size": 49152, "mean_entropy": 0.3,
            "mean_self_certainty": token_sc, "step_self_certainty": [token_sc], "step_entropy": [0.3],
        }  # fmt: skip

    low, high = candidate(sc), candidate(sc + 0.01)
    for alpha in (0.0, 0.4, 1.0):
        assert self_certainty_score(high, alpha, lam) > self_certainty_score(low, alpha, lam)
    params = SelectionParams(lambda_weight=lam)
    for method in ("self-certainty", "self-certainty-token", "self-certainty-step"):
        assert select_questions([[low, high]], method, params)[0].index == 1, method
        assert select_questions([[high, low]], method, params)[0].index == 0, method


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
        want = 0.6 * sc[i].item() / math.log(100) + 0.4 * (1 - h[i].item() / math.log(100))
        assert mixed[i].item() == pytest.approx(want) == mixed_certainty(sc[i].item(), h[i].item(), 0.6, 100)
