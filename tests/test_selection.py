"""Selection methods on hand-made candidates whose right pick is known."""

import math

import pytest
import torch

from ray_pipeline.errors import ConfigError
from ray_pipeline.selection import (
    ALPHA_METHODS,
    METHODS,
    MethodUnavailable,
    SelectionParams,
    answer_groups,
    best_of,
    get_method,
    key_step,
    self_certainty_score,
)

VOCAB = 100
LOG_V = math.log(VOCAB)


def candidate(
    pred="1",
    entropy=1.0,
    token_sc=1.0,
    step_sc=(1.0,),
    step_h=None,
    tokens=10,
    confidence=(1.0,),
    coe=((0.5,), (0.5,), 1.0, 1.0),
    self_eval=(0.5,),
):
    """One candidate row with just the columns the methods read."""
    magnitude, angle, span_magnitude, span_angle = coe
    return {
        "pred": pred,
        "token_count": tokens,
        "vocab_size": VOCAB,
        "mean_entropy": entropy,
        "mean_self_certainty": token_sc,
        "step_self_certainty": list(step_sc),
        "step_entropy": list(step_h if step_h is not None else [entropy] * len(step_sc)),
        "step_texts": [f"step {i}" for i in range(len(step_sc))],
        "token_confidence": list(confidence),
        "coe_magnitude": list(magnitude),
        "coe_angle": list(angle),
        "coe_span_magnitude": span_magnitude,
        "coe_span_angle": span_angle,
        "step_self_eval": None if self_eval is None else list(self_eval),
    }


def pick(name, candidates, **params):
    return get_method(name)(candidates, SelectionParams(**params))


def test_registry_holds_every_method_of_the_issue():
    wanted = {
        "baseline",
        "entropy",
        "self-certainty",
        "coe-r",
        "coe-c",
        "self-eval",
        "self-consistency",
        "borda",
        "weighted-vote",
        "lowest-group",
        "tail",
    }
    assert wanted <= set(METHODS)
    assert ALPHA_METHODS == {"self-certainty", "borda", "weighted-vote"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_works_with_one_candidate(name):
    choice = pick(name, [candidate()])
    assert choice.index == 0 and len(choice.scores) == 1


def test_baseline_takes_the_first():
    choice = pick("baseline", [candidate(entropy=9), candidate(entropy=0)])
    assert choice.index == 0 and all(math.isnan(s) for s in choice.scores)


def test_entropy_takes_the_lowest_mean_entropy():
    choice = pick("entropy", [candidate(entropy=2.0), candidate(entropy=0.5), candidate(entropy=1.0)])
    assert (choice.index, choice.score, choice.scores) == (1, -0.5, (-2.0, -0.5, -1.0))


def test_self_certainty_alpha_trades_token_for_step_level():
    # A: confident on average but with one weak step; B: steady.
    a = candidate(token_sc=8.0, step_sc=(9.0, 1.0))
    b = candidate(token_sc=5.0, step_sc=(4.0, 6.0))
    assert pick("self-certainty", [a, b], alpha=1.0).index == 0
    assert pick("self-certainty", [a, b], alpha=0.0).index == 1
    assert pick("self-certainty", [a, b], alpha=0.4).index == 1  # 0.4*8+0.6*1=3.8 < 0.4*5+0.6*4=4.4
    assert self_certainty_score(a, 0.4) == pytest.approx(3.8 / LOG_V)
    assert pick("self-certainty-token", [a, b]).index == 0
    assert pick("self-certainty-step", [a, b]).index == 1
    assert key_step(a) == {"index": 1, "text": "step 1", "score": pytest.approx(1.0 / LOG_V)}


def test_lambda_weight_mixes_self_certainty_with_negative_entropy():
    # A: far from uniform (high SC) but spread over several likely tokens (high entropy); B: the reverse.
    a = candidate(token_sc=3.0, entropy=3.0, step_sc=(3.0,))
    b = candidate(token_sc=2.0, entropy=0.5, step_sc=(2.0,))
    assert pick("self-certainty", [a, b], lambda_weight=1.0).index == 0
    assert pick("self-certainty", [a, b], lambda_weight=0.0).index == 1
    assert self_certainty_score(b, 0.4, 0.0) == pytest.approx(1 - 0.5 / LOG_V)


def test_coe_r_and_coe_c_follow_the_paper():
    # With unit spans: A has M = A = (0.5, 0.5): CoE-R 0, CoE-C |0.5 e^{0.5i}| = 0.5.
    # B has M = (0.3, 0.3), A = (0, 0): CoE-R 0.3, CoE-C 0.3. So the two scores disagree.
    a = candidate(coe=((0.5, 0.5), (0.5, 0.5), 1.0, 1.0))
    b = candidate(coe=((0.6, 0.6), (0.0, 0.0), 2.0, 1.0))
    r, c = pick("coe-r", [a, b]), pick("coe-c", [a, b])
    assert r.index == 1 and r.scores == (pytest.approx(0.0), pytest.approx(0.3))
    assert c.index == 0 and c.scores == (pytest.approx(0.5), pytest.approx(0.3))


def test_self_eval_takes_the_best_weakest_step():
    a = candidate(step_sc=(1, 1), self_eval=(0.9, 0.2))
    b = candidate(step_sc=(1, 1), self_eval=(0.6, 0.7))
    choice = pick("self-eval", [a, b])
    assert (choice.index, choice.scores) == (1, (0.2, 0.6))
    with pytest.raises(MethodUnavailable, match="--self_eval"):
        pick("self-eval", [a, candidate(self_eval=None)])


def test_deepconf_lowest_group_and_tail():
    # A: confident except a dip in the middle; B: steady, weaker at the end.
    a = candidate(confidence=(5, 5, 1, 1, 5, 5))
    b = candidate(confidence=(3, 3, 3, 3, 3, 2))
    assert pick("lowest-group", [a, b], deepconf_window=2).scores == (pytest.approx(1.0), pytest.approx(2.5))
    assert pick("lowest-group", [a, b], deepconf_window=2).index == 1
    assert pick("tail", [a, b], deepconf_window=2).index == 0
    # A window longer than the response is clipped to it: both reduce to the mean.
    assert pick("lowest-group", [a, b], deepconf_window=2048).scores == (pytest.approx(22 / 6), pytest.approx(17 / 6))
    assert pick("lowest-group", [a, b], deepconf_window=2048).index == 0
    assert pick("tail", [a, candidate(confidence=torch.tensor([4.0]))], deepconf_window=2048).index == 1


def test_self_consistency_groups_equivalent_answers():
    # By string, "3" has the majority (2 votes); by math-verify 1/2 = 0.5 = \frac{1}{2} has 3.
    cands = [candidate("3"), candidate("\\frac{1}{2}"), candidate("0.5"), candidate("1/2"), candidate("3")]
    choice = pick("self-consistency", cands)
    assert choice.index == 1
    assert choice.scores == (0.4, 0.6, 0.6, 0.6, 0.4)


def test_self_consistency_ties_and_missing_answers():
    tie = pick("self-consistency", [candidate(None), candidate("2"), candidate("5"), candidate("5"), candidate("2")])
    assert tie.index == 1  # 2 and 5 have two votes each: the answer seen first wins
    assert tie.scores[0] == 0.0
    assert pick("self-consistency", [candidate(None), candidate(None)]).index == 0


def test_answer_groups_of_a_prefix_do_not_depend_on_later_answers():
    preds = ["x", "0.5", None, "1/2", "x", "7"]
    labels = answer_groups(preds)
    assert labels == [0, 1, None, 1, 0, 2]
    assert all(answer_groups(preds[:k]) == labels[:k] for k in range(1, len(preds)))


def borda_candidates():
    # Certainty ranks 0..3 (0 = most certain): answers 7, 9, 9, 7.
    return [
        candidate("7", token_sc=4.0, step_sc=(4.0,)),
        candidate("9", token_sc=3.0, step_sc=(3.0,)),
        candidate("9", token_sc=2.0, step_sc=(2.0,)),
        candidate("7", token_sc=1.0, step_sc=(1.0,)),
    ]


def test_borda_weights_votes_by_certainty_rank():
    cands = borda_candidates()
    # p = 0.5: 7 gets 4^.5 + 1^.5 = 3, 9 gets 3^.5 + 2^.5 = 3.15 -> 9, its most certain member (1).
    choice = pick("borda", cands, borda_power=0.5)
    assert choice.index == 1
    total = sum(k**0.5 for k in (4, 3, 2, 1))
    assert choice.scores[0] == pytest.approx(3.0 / total) and choice.scores[1] == pytest.approx(
        (3**0.5 + 2**0.5) / total
    )
    # p = 2: 7 gets 16 + 1 = 17, 9 gets 9 + 4 = 13 -> 7 (candidate 0).
    assert pick("borda", cands, borda_power=2.0).index == 0
    # p = 0: plain majority, a 2-2 tie -> the answer seen first (7), its most certain member.
    assert pick("borda", cands, borda_power=0.0).index == 0


def test_weighted_vote_lets_one_confident_answer_beat_two_doubtful_ones():
    cands = [
        candidate("9", token_sc=0.3 * LOG_V, step_sc=(0.3 * LOG_V,)),
        candidate("7", token_sc=0.9 * LOG_V, step_sc=(0.9 * LOG_V,)),
        candidate("9", token_sc=0.3 * LOG_V, step_sc=(0.3 * LOG_V,)),
    ]
    assert pick("self-consistency", cands).index == 0
    choice = pick("weighted-vote", cands)
    assert choice.index == 1 and choice.scores == (pytest.approx(0.4), pytest.approx(0.6), pytest.approx(0.4))


def test_empty_responses_rank_last():
    empty = candidate(entropy=math.nan, token_sc=math.nan, step_sc=(), tokens=0, confidence=(), coe=((), (), 0, 0))
    for name in ("self-certainty", "entropy", "coe-r", "coe-c", "lowest-group", "tail", "self-eval"):
        assert pick(name, [empty, candidate()]).index == 1, name
    assert key_step(empty) is None
    assert best_of([math.nan, math.nan]).index == 0


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        get_method("magic")
    assert "magic" in str(err.value)
    for name in METHODS:
        assert name in str(err.value)
