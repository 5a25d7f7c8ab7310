"""Selection methods on hand-made candidates whose right pick is known."""

import dataclasses
import itertools
import math

import numpy as np
import pytest

from ray_pipeline.deepconf.methods import deepconf_kept
from ray_pipeline.errors import ConfigError
from ray_pipeline.reduce import select_questions
from ray_pipeline.selection import (
    METHODS,
    SCORE_METHODS,
    MethodUnavailable,
    SelectionParams,
    alpha_methods,
    get_method,
    key_step,
    self_certainty_score,
)

VOCAB = 100
LOG_V = math.log(VOCAB)


def sc_for(certainty):
    """The mean self-certainty whose certainty term SC / log V is `certainty`."""
    return certainty * LOG_V


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
    """One method on one question of hand-made candidates."""
    (choice,) = select_questions([candidates], name, SelectionParams(**params))
    return choice


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
        "deepconf-lowest-group-10",
        "deepconf-lowest-group-90",
        "deepconf-tail-10",
        "deepconf-tail-90",
    }
    assert wanted <= set(METHODS)
    # Borda depends on alpha only when it ranks by the combined score.
    assert set(alpha_methods(SelectionParams())) == {"self-certainty", "weighted-vote"}
    assert set(alpha_methods(SelectionParams(borda_score="combined"))) == {"self-certainty", "borda", "weighted-vote"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_works_with_one_candidate(name):
    # An online run's columns too, which only deepconf-online reads.
    online = {"phase": "warmup", "stop_threshold": 0.5, "engine_confidence": [1.0, 2.0]}
    choice = pick(name, [candidate() | online])
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
    # (0.4 * 8 + 0.6 * 1) / log V = 3.8 / log V < (0.4 * 5 + 0.6 * 4) / log V = 4.4 / log V
    assert pick("self-certainty", [a, b], alpha=0.4).index == 1
    assert self_certainty_score(a, 0.4) == pytest.approx((0.4 * 8 + 0.6 * 1) / LOG_V)
    assert pick("self-certainty-token", [a, b]).index == 0
    assert pick("self-certainty-step", [a, b]).index == 1
    assert key_step(a) == {"index": 1, "text": "step 1", "score": pytest.approx(1 / LOG_V)}


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
    assert pick("tail", [a, candidate(confidence=np.array([4.0], dtype=np.float32))], deepconf_window=2048).index == 1


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


def test_vote_scores_count_the_answer_classes():
    cands = [candidate("x"), candidate("0.5"), candidate(None), candidate("1/2"), candidate("x"), candidate("7")]
    # Classes x, 1/2 (two forms), 7: self-consistency's score of a candidate is its class's share of six votes.
    assert pick("self-consistency", cands).scores == (2 / 6, 2 / 6, 0.0, 2 / 6, 2 / 6, 1 / 6)


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
        candidate("9", token_sc=sc_for(0.3), step_sc=(sc_for(0.3),)),
        candidate("7", token_sc=sc_for(0.9), step_sc=(sc_for(0.9),)),
        candidate("9", token_sc=sc_for(0.3), step_sc=(sc_for(0.3),)),
    ]
    assert pick("self-consistency", cands).index == 0
    choice = pick("weighted-vote", cands)
    assert choice.index == 1 and choice.scores == (pytest.approx(0.4), pytest.approx(0.6), pytest.approx(0.4))


def test_empty_responses_rank_last():
    empty = candidate(entropy=math.nan, token_sc=math.nan, step_sc=(), tokens=0, confidence=(), coe=((), (), 0, 0))
    for name in ("self-certainty", "entropy", "coe-r", "coe-c", "lowest-group", "tail", "self-eval"):
        assert pick(name, [empty, candidate()]).index == 1, name
    assert key_step(empty) is None
    assert pick("entropy", [empty, empty]).index == 0


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        get_method("magic")
    assert "magic" in str(err.value)
    for name in METHODS:
        assert name in str(err.value)


def test_selection_defaults_are_the_configs():
    from ray_pipeline.config import RunConfig

    assert SelectionParams.from_config(RunConfig()) == SelectionParams()


def test_every_selection_field_of_the_config_is_a_parameter_carried_from_the_config():
    from ray_pipeline.config import RunConfig, config_fields

    names = [f.name for f in config_fields("selection") if f.name != "method"]
    assert [f.name for f in dataclasses.fields(SelectionParams)] == names
    # A distinct marker in every field: from_config must carry each one, none left at its default.
    config = dataclasses.replace(RunConfig(), **{name: f"marker-{name}" for name in names})
    params = SelectionParams.from_config(config)
    assert dataclasses.asdict(params) == {name: f"marker-{name}" for name in names}
    assert dataclasses.replace(params, alpha=0.9).lambda_weight == "marker-lambda_weight"


def random_candidates(rng, n, *, answerless_share=0.4):
    """`n` candidates with random answers (some missing) and random values of every score a method reads."""
    cands = []
    for _ in range(n):
        steps = rng.randint(1, 3)
        length = rng.randint(1, 8)
        cands.append(
            candidate(
                pred=None if rng.random() < answerless_share else rng.choice("1234"),
                entropy=rng.uniform(0.1, 3.0),
                token_sc=rng.uniform(0.1, 3.0),
                step_sc=[rng.uniform(0.1, 3.0) for _ in range(steps)],
                tokens=length,
                confidence=[rng.uniform(0.5, 5.0) for _ in range(length)],
                coe=([rng.uniform(0.1, 1) for _ in range(3)], [rng.uniform(0.1, 1) for _ in range(3)], 1.0, 1.0),
                self_eval=[rng.random() for _ in range(steps)],
            )
        )
    return cands


ARGMAX_METHODS = sorted(SCORE_METHODS - {name for name in METHODS if name.startswith("deepconf-")})


@pytest.mark.parametrize("name", ARGMAX_METHODS)
def test_answerless_candidates_rank_last_in_every_score_method(name):
    import random

    rng = random.Random(name)
    moved = 0
    for _ in range(200):
        cands = random_candidates(rng, rng.randint(1, 6))
        has_answer = [c["pred"] is not None for c in cands]
        choice = pick(name, cands, deepconf_window=3)
        plain = pick(name, cands, deepconf_window=3, answerless_last=False)
        keyed = [-math.inf if math.isnan(v) else v for v in choice.scores]
        # Off: the best score over all; on: the best score over the candidates with an answer, if any.
        assert plain.index == max(range(len(cands)), key=lambda i: (keyed[i], -i))
        pool = [i for i in range(len(cands)) if has_answer[i]] or list(range(len(cands)))
        assert choice.index == max(pool, key=lambda i: (keyed[i], -i))
        assert choice.scores == plain.scores
        moved += choice.index != plain.index
    assert moved > 0, "the random cases never exercised the rule"


def test_vote_methods_never_pick_an_answerless_candidate_when_one_has_an_answer():
    import random

    rng = random.Random(0)
    votes = [n for n in METHODS if n.startswith("deepconf-") and n != "deepconf-online"]
    votes += ["self-consistency", "borda", "weighted-vote"]
    for _ in range(100):
        cands = random_candidates(rng, rng.randint(1, 8))
        for name in votes:
            choice = pick(name, cands, deepconf_window=3)
            assert cands[choice.index]["pred"] is not None or all(c["pred"] is None for c in cands), name


def test_borda_ranks_by_token_self_certainty_by_default_and_by_the_combined_score_on_request():
    # Token level: A > B > C; combined at alpha 0.4 (weak last steps for A): B > C > A.
    a = candidate("7", token_sc=3.0, step_sc=(3.0, 0.1))
    b = candidate("9", token_sc=2.0, step_sc=(2.0, 2.0))
    c = candidate("7", token_sc=1.5, step_sc=(1.5, 1.5))
    # Token ranks A 0, B 1, C 2: 7 gets 3 + 1 = 4 votes, 9 gets 2 (p = 1).
    assert pick("borda", [a, b, c], borda_power=1.0).index == 0
    # Combined ranks B 0, C 1, A 2: 9 gets 3, 7 gets 2 + 1 = 3: a tie, the answer seen first (7), its
    # most certain member under the combined score (C).
    assert pick("borda", [a, b, c], borda_power=1.0, borda_score="combined").index == 2
    assert pick("borda", [a, b, c], borda_power=1.1, borda_score="combined").index == 1


def upstream_borda(preds, confidences, power):
    """The Self-Certainty repository's Borda vote (src/voting_from_list.py), answers compared as strings."""
    order = sorted(range(len(confidences)), key=lambda k: confidences[k], reverse=True)
    votes_map = {order[r]: (len(confidences) - r) ** power for r in range(len(confidences))}
    votes = [0.0] * len(preds)
    for i, answer in enumerate(preds):
        if answer is None:
            continue
        first = next((j for j in range(i) if preds[j] == answer), i)
        votes[first] += votes_map[i]
    return preds[votes.index(max(votes))]


def test_borda_default_equals_the_self_certainty_code_on_random_questions():
    import random

    rng = random.Random(1)
    for _ in range(300):
        cands = random_candidates(rng, rng.randint(1, 10), answerless_share=0.2)
        power = rng.choice([0.0, 0.5, 1.0, 2.0])
        want = upstream_borda([c["pred"] for c in cands], [c["mean_self_certainty"] for c in cands], power)
        if want is not None:
            assert cands[pick("borda", cands, borda_power=power).index]["pred"] == want


def upstream_deepconf(preds, token_confidence, kind, keep_percent, window):
    """DeepConf's offline filtered vote (deepconf/utils.py: filter_top_confidence + weighted_majority_vote)."""
    import numpy as np

    def confidence(confs):
        if kind == "tail":
            return float(np.mean(confs[-window:]))
        if len(confs) < window:
            return float(np.mean(confs))
        return min(sum(confs[i : i + window]) / window for i in range(len(confs) - window + 1))

    traces = [(p, confidence(c)) for p, c in zip(preds, token_confidence) if p]
    if not traces:
        return None
    threshold = np.percentile([c for _, c in traces], (1 - keep_percent / 100) * 100)
    weights = {}
    for answer, conf in traces:
        if conf >= threshold:
            weights[answer] = weights.get(answer, 0.0) + conf
    return max(weights, key=lambda a: weights[a])


@pytest.mark.parametrize("kind", ["lowest-group", "tail"])
@pytest.mark.parametrize("keep_percent", [10, 90])
def test_deepconf_filtered_vote_equals_deepconf_code_on_random_questions(kind, keep_percent):
    import random

    rng = random.Random(f"{kind}{keep_percent}")
    for _ in range(300):
        cands = random_candidates(rng, rng.randint(1, 16), answerless_share=0.2)
        window = rng.randint(1, 5)
        confs = [list(c["token_confidence"]) for c in cands]
        want = upstream_deepconf([c["pred"] for c in cands], confs, kind, keep_percent, window)
        choice = pick(f"deepconf-{kind}-{keep_percent}", cands, deepconf_window=window)
        if want is not None:
            assert cands[choice.index]["pred"] == want


@pytest.mark.parametrize(
    ("n", "keep_percent", "kept"),
    [(1, 10, 1), (4, 10, 1), (4, 90, 3), (10, 10, 1), (10, 90, 9), (64, 10, 7), (64, 90, 57)],
)
def test_deepconf_keeps_the_top_eta_percent_as_deepconf_counts_them(n, keep_percent, kept):
    confidences = np.arange(n, dtype=np.float64)[None, :]
    mask = deepconf_kept(confidences, np.ones((1, n), dtype=bool), keep_percent)[0]
    assert mask.sum() == kept and mask.tolist() == [i >= n - kept for i in range(n)]


def test_deepconf_filtered_vote_keeps_the_most_confident_and_weights_by_confidence():
    # Nine candidates with an answer. Their top 10 % is the single most confident (tail 5, answer 7); their
    # top 90 % drops only the least confident (0.1): 9 totals 4 + 4 = 8 against 3's 4 x 1.9 and 7's 5.
    preds = ["7", "9", "9", "3", "3", "3", "3", "2", None, "2"]
    tails = [5.0, 4.0, 4.0, 1.9, 1.9, 1.9, 1.9, 0.5, 9.0, 0.1]
    cands = [candidate(p, confidence=(t,)) for p, t in zip(preds, tails)]
    top10 = pick("deepconf-tail-10", cands)
    assert top10.index == 0 and top10.scores[0] == pytest.approx(1.0) and top10.scores[1] == 0.0
    top90 = pick("deepconf-tail-90", cands)
    assert preds[top90.index] == "9" and top90.index == 1
    assert top90.scores[1] == pytest.approx(8.0 / (5 + 8 + 4 * 1.9 + 0.5))
    # Without the answerless rule the answerless candidate (tail 9) takes the top 10 % and votes for nothing.
    assert pick("deepconf-tail-10", cands, answerless_last=False).index == 0
    assert pick("deepconf-tail-10", cands, answerless_last=False).scores == (0.0,) * len(cands)


def test_row_percentiles_equal_numpy_percentile_row_by_row():
    from ray_pipeline.deepconf.methods import row_percentiles

    rng = np.random.default_rng(0)
    for _ in range(300):
        rows, n = rng.integers(1, 6), rng.integers(1, 20)
        # Few distinct values, so ties and repeated thresholds are common.
        values = rng.integers(0, 6, (rows, n)) / rng.choice([1.0, 3.0, 7.0])
        among = rng.random((rows, n)) < 0.7
        q = float(rng.choice([10, 90, 0, 100, 37.5]))
        got = row_percentiles(values, among, q)
        for r in range(rows):
            pool = values[r][among[r]]
            want = np.percentile(pool, q) if pool.size else np.nan
            assert (np.isnan(want) and np.isnan(got[r])) or got[r] == want, (values[r], among[r], q)


def scalar_weighted_vote(labels, weights, tie_break=None, voters=None):
    """The vote as it was written per question: a dict of totals, Python sums and tuple keys."""
    voters = voters or [True] * len(labels)
    totals, first_voter = {}, {}
    for i, (label, weight) in enumerate(zip(labels, weights)):
        if label is not None and voters[i]:
            totals[label] = totals.get(label, 0.0) + weight
            first_voter.setdefault(label, i)
    total = sum(w for w, votes in zip(weights, voters) if votes) or 1.0
    scores = [totals.get(label, 0.0) / total if label is not None else 0.0 for label in labels]
    if not totals:
        return 0, scores
    winner = max(totals, key=lambda g: (totals[g], -first_voter[g]))
    members = [i for i, label in enumerate(labels) if label == winner and voters[i]]
    order = [(-math.inf if v is None or math.isnan(v) else v) for v in (tie_break or [0.0] * len(labels))]
    return max(members, key=lambda i: (order[i], -i)), scores


def test_array_vote_equals_the_per_question_vote_bit_for_bit():
    from ray_pipeline.selection import weighted_vote

    rng = np.random.default_rng(1)
    for _ in range(400):
        rows, n = int(rng.integers(1, 5)), int(rng.integers(1, 12))
        labels = rng.integers(-1, 4, (rows, n))
        # Weights with exact ties (small integers) and without (random floats), some zero.
        weights = rng.choice([rng.integers(0, 3, (rows, n)).astype(float), rng.random((rows, n))], axis=0)
        tie_break = np.where(rng.random((rows, n)) < 0.2, np.nan, rng.integers(0, 3, (rows, n)).astype(float))
        voters = rng.random((rows, n)) < 0.8
        picks = weighted_vote(labels, weights, tie_break, voters)
        for r in range(rows):
            row_labels = [None if x < 0 else int(x) for x in labels[r]]
            row = (weights[r].tolist(), tie_break[r].tolist(), voters[r].tolist())
            index, scores = scalar_weighted_vote(row_labels, *row)
            assert picks.index[r] == index and picks.scores[r].tolist() == scores


def test_unbiased_pass_at_k_equals_the_share_of_k_subsets_with_a_correct_candidate():
    from ray_pipeline.metrics import pass_at_k

    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                want = sum(any(i < c for i in s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
