"""Selection methods on hand-made candidates whose right pick is known."""

import math

import pytest

from ray_pipeline.errors import ConfigError
from ray_pipeline.selection import METHODS, SelectionParams, best_of, get_method, self_certainty_score


def candidate(entropy, token_sc, step_min, tokens=10, vocab=100):
    return {
        "mean_entropy": entropy,
        "mean_self_certainty": token_sc,
        "step_min_self_certainty": step_min,
        "token_count": tokens,
        "vocab_size": vocab,
    }


def test_baseline_takes_the_first():
    assert get_method("baseline")([candidate(9, 0, 0), candidate(0, 9, 9)], SelectionParams()).index == 0


def test_entropy_takes_the_lowest_mean_entropy():
    picks = get_method("entropy")([candidate(2.0, 0, 0), candidate(0.5, 0, 0), candidate(1.0, 0, 0)], SelectionParams())
    assert (picks.index, picks.score) == (1, -0.5)


def test_self_certainty_alpha_trades_token_for_step_level():
    # A: confident on average but with one weak step; B: steady.
    a, b = candidate(1, token_sc=8.0, step_min=1.0), candidate(1, token_sc=5.0, step_min=4.0)
    choose = get_method("self-certainty")
    assert choose([a, b], SelectionParams(alpha=1.0)).index == 0
    assert choose([a, b], SelectionParams(alpha=0.0)).index == 1
    assert choose([a, b], SelectionParams(alpha=0.4)).index == 1  # 0.4*8+0.6*1=3.8 < 0.4*5+0.6*4=4.4
    assert self_certainty_score(a, 0.4) == pytest.approx(3.8 / math.log(100))


def test_empty_responses_rank_last():
    empty = candidate(math.nan, math.nan, math.nan, tokens=0)
    assert get_method("self-certainty")([empty, candidate(1, 0.1, 0.1)], SelectionParams()).index == 1
    assert get_method("entropy")([empty, candidate(5, 1, 1)], SelectionParams()).index == 1
    assert best_of([math.nan, math.nan]).index == 0


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        get_method("magic")
    assert "magic" in str(err.value)
    for name in METHODS:
        assert name in str(err.value)
