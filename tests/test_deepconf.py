"""DeepConf online's math against float64 references: engine confidences, windows, the threshold, the stop rule,
the vote, the replay of a problem, and the statistics of the tokens-vs-accuracy table."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from ray_pipeline.answer_classes import group_answers
from ray_pipeline.deepconf import (
    CONFIDENCE_SCALE,
    FINAL,
    SKIPPED,
    WARMUP,
    OnlineSettings,
    WindowMonitor,
    estimated_savings,
    filtered_vote,
    first_stop,
    lowest_group_confidence,
    majority_class,
    online_vote,
    replay_problem,
    stop_threshold,
    token_confidences,
    window_means,
)
from ray_pipeline.deepconf.tables import tokens_vs_accuracy
from ray_pipeline.metrics import paired_difference, wilson_interval

pytestmark = pytest.mark.fast


def quantized(rng: np.random.Generator, size: int, low=0.5, high=3.0) -> np.ndarray:
    return np.rint(rng.uniform(low, high, size) * CONFIDENCE_SCALE) / CONFIDENCE_SCALE


def reference_means(conf: np.ndarray, window: int) -> list[float]:
    """Each full window's mean by an exactly rounded sum (math.fsum), then one division."""
    return [math.fsum(conf[i : i + window]) / window for i in range(len(conf) - window + 1)]


def test_token_confidence_is_minus_the_mean_top_k_logprob_on_a_2_16_grid():
    rng = np.random.default_rng(0)
    top = np.sort(rng.normal(-3, 2, (500, 20)).astype(np.float32), axis=1)[:, ::-1]
    conf = token_confidences(top)
    reference = np.array([-math.fsum(map(float, row)) / 20 for row in top])
    assert conf.dtype == np.float64
    assert np.all(np.abs(conf - reference) <= 0.5 / CONFIDENCE_SCALE + 1e-12)
    assert np.array_equal(conf * CONFIDENCE_SCALE, np.rint(conf * CONFIDENCE_SCALE))
    with pytest.raises(ValueError):
        token_confidences(np.zeros(3))


@pytest.mark.parametrize("seed", range(5))
def test_window_means_equal_an_exactly_rounded_reference(seed):
    rng = np.random.default_rng(seed)
    conf = quantized(rng, int(rng.integers(1, 300)), 0.0, 40.0)
    for window in (1, 2, 7, 64, 400):
        means = window_means(conf, window)
        assert means.tolist() == reference_means(conf, window)
        if len(conf) >= window:
            assert lowest_group_confidence(conf, window) == min(reference_means(conf, window))
        else:
            # A trace shorter than the window is one clipped window.
            assert means.size == 0
            assert lowest_group_confidence(conf, window) == math.fsum(conf) / len(conf)
    assert math.isnan(lowest_group_confidence([], 4))


@pytest.mark.parametrize("seed", range(20))
def test_the_running_monitor_stops_where_the_cumulative_sums_do(seed):
    """The generators' running window and the simulator's cumulative sums must decide alike, to the token."""
    rng = np.random.default_rng(seed)
    conf = quantized(rng, 200, 0.2, 4.0)
    window = int(rng.integers(1, 40))
    means = window_means(conf, window)
    # The least window mean (the boundary: "below" is strict, so nothing stops), another window's mean, or random.
    choices = (float(means.min()), float(means[rng.integers(means.size)]), float(rng.uniform(1.5, 3.0)))
    threshold = choices[seed % 3]
    monitor = WindowMonitor(window, threshold)
    online = next((t + 1 for t, c in enumerate(conf) if monitor.add(float(c))), None)
    assert online == first_stop(conf, window, threshold)
    reference = next((i + window for i, m in enumerate(reference_means(conf, window)) if m < threshold), None)
    assert online == reference
    if seed % 3 == 0:
        assert online is None


def test_a_nan_threshold_stops_nothing():
    assert first_stop([1.0] * 10, 2, math.nan) is None
    monitor = WindowMonitor(2, math.nan)
    assert not any(monitor.add(1.0) for _ in range(10))


def test_threshold_is_numpys_linear_percentile_of_the_warmup_lowest_groups():
    values = [3.5, 1.25, 2.0, 4.75, 2.5]
    ordered = sorted(values)

    def linear(q):  # the textbook definition numpy's default follows
        pos = q / 100 * (len(ordered) - 1)
        low = math.floor(pos)
        return ordered[low] + (pos - low) * (ordered[min(low + 1, len(ordered) - 1)] - ordered[low])

    for q in (0, 10, 50, 90, 100):
        assert stop_threshold(values, q) == pytest.approx(linear(q), abs=1e-15)
    assert stop_threshold(values + [math.nan], 90) == stop_threshold(values, 90)
    assert math.isnan(stop_threshold([math.nan], 90))


def test_online_vote_weights_confident_traces_and_breaks_ties_by_first_voter():
    lowest = np.array([2.0, 1.0, 3.0, 1.5, math.nan, 2.5])
    classes = np.array([0, 1, 1, -1, 0, 0])
    launched = np.array([True, True, True, True, False, True])
    vote = online_vote(lowest, classes, launched, threshold=1.5)
    # Voters: 0 (class 0, 2.0), 2 (class 1, 3.0), 5 (class 0, 2.5); 1 is below s, 3 has no answer, 4 never ran.
    assert vote.weights.tolist() == [2.0, 0.0, 3.0, 0.0, 0.0, 2.5]
    assert vote.winner == 0 and vote.share == pytest.approx(4.5 / 7.5)
    tie = online_vote([2.0, 2.0], [1, 0], [True, True], 1.0)
    assert (tie.winner, tie.share) == (1, 0.5)
    nobody = online_vote([1.0, 1.0], [0, 0], [True, True], 2.0)
    assert (nobody.winner, nobody.share, nobody.weights.tolist()) == (-1, 0.0, [0.0, 0.0])


def test_group_answers_joins_the_first_equivalent_class():
    equivalent = lambda a, b: a.replace(" ", "") == b.replace(" ", "")  # noqa: E731
    ids = group_answers(["1 2", None, "3", "12", "3 ", None], equivalent)
    assert ids.tolist() == [0, -1, 1, 0, 1, -1]
    assert majority_class(ids) == 0 and majority_class([-1, -1]) == -1
    assert majority_class([1, 0, 0, 1]) == 1


def trace(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def test_replay_stops_final_traces_at_their_first_low_window():
    confidences = [
        trace([3, 3, 3, 3]),  # warm-up, lowest group (window 2) 3.0
        trace([1, 1, 4]),  # warm-up, lowest group 1.0
        trace([2, 2, 2, 2]),  # final: every window 2.0 (not below s = 2.0): runs to its end
        trace([3, 1, 0.5, 3, 3]),  # final: window [1, 0.5] has mean 0.75 < 2: stops after 3 tokens
        trace([1.5]),  # final, shorter than the window: never stopped, but its mean 1.5 < s: no vote
    ]
    classes = [0, 1, 1, 0, 1]
    replay = replay_problem(confidences, classes, OnlineSettings(window=2, warmup=2, percentile=50))
    assert replay.threshold == 2.0  # the median of [3.0, 1.0]
    assert replay.phase == [WARMUP, WARMUP, FINAL, FINAL, FINAL]
    assert replay.stopped_at.tolist() == [-1, -1, -1, 3, -1]
    assert replay.kept.tolist() == [4, 3, 4, 3, 1] and replay.tokens == 15
    assert replay.lowest_group.tolist() == [3.0, 1.0, 2.0, 0.75, 1.5]
    # Voters: trace 0 (class 0, 3.0) and trace 2 (class 1, 2.0).
    assert replay.vote.winner == 0 and replay.vote.share == pytest.approx(3.0 / 5.0)


def test_replay_with_consensus_checks_after_every_final_trace():
    agree = trace([2, 2, 2])
    confidences = [agree] * 2 + [agree] * 6
    settings = OnlineSettings(window=2, warmup=2, percentile=50, consensus=0.9, wave=2)
    replay = replay_problem(confidences, [0] * 8, settings)
    # The warm-up already agrees, but one final trace always runs; then the vote is unanimous: stop.
    assert replay.phase == [WARMUP] * 2 + [FINAL] + [SKIPPED] * 5 and replay.tokens == 9
    assert replay.launched.tolist() == [True] * 3 + [False] * 5
    split = replay_problem(confidences, [0, 1, 0, 0, 1, 1, 0, 0], settings)
    # Shares of class 0 after each final trace: 2/3, 3/4, 3/5, 3/6, 4/7, 5/8: never 0.9, all run.
    assert split.phase == [WARMUP] * 2 + [FINAL] * 6
    # 0.75 is reached after the second final trace (3 of 4), 0.65 after the first (2 of 3).
    stop_after_two = replay_problem(confidences, [0, 1, 0, 0, 0, 0, 0, 0], OnlineSettings(2, 2, 50, 0.75, 2))
    assert stop_after_two.phase == [WARMUP] * 2 + [FINAL] * 2 + [SKIPPED] * 4
    stop_after_one = replay_problem(confidences, [0, 1, 0, 1, 0, 0, 0, 0], OnlineSettings(2, 2, 50, 0.65, 2))
    assert stop_after_one.phase == [WARMUP] * 2 + [FINAL] + [SKIPPED] * 5
    # How many traces are in flight (`wave`) never changes which traces vote.
    for labels in ([0] * 8, [0, 1, 0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0]):
        replays = [replay_problem(confidences, labels, OnlineSettings(2, 2, 50, 0.75, w)) for w in (1, 3, 8)]
        assert len({tuple(r.phase) for r in replays}) == 1


def test_wilson_interval_reference_values():
    # Wilson (1927): 8 of 10 at z = 1.96 is [0.4902, 0.9433] (textbook value).
    low, high = wilson_interval(8, 10, 1.96)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_paired_difference_follows_newcombe():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 60)
        a = [rng.random() < 0.6 for _ in range(n)]
        b = [rng.random() < 0.5 for _ in range(n)]
        diff, low, high = paired_difference(a, b)
        assert diff == pytest.approx((sum(a) - sum(b)) / n)
        assert -1 <= low <= diff <= high <= 1
        # Swapping the two negates the interval.
        back = paired_difference(b, a)
        assert back == pytest.approx((-diff, -high, -low))
    # phi = 0 (a*d = b*c): the interval joins the two Wilson intervals as for independent samples.
    a = [True] * 4 + [True] * 4 + [False] * 4 + [False] * 4
    b = [True] * 4 + [False] * 4 + [True] * 4 + [False] * 4
    diff, low, high = paired_difference(a, b)
    l1, u1 = wilson_interval(8, 16)
    assert diff == 0 and low == pytest.approx(-math.hypot(0.5 - l1, u1 - 0.5))
    assert high == pytest.approx(math.hypot(u1 - 0.5, 0.5 - l1))
    # Identical outcomes at p = 0.5 (symmetric Wilson intervals, phi = 1): the zero interval.
    assert paired_difference([True, False] * 10, [True, False] * 10) == (0.0, 0.0, 0.0)
    # Large n: close to the Wald interval of the mean paired difference.
    rng2 = np.random.default_rng(1)
    a = rng2.random(20000) < 0.6
    b = np.where(rng2.random(20000) < 0.8, a, rng2.random(20000) < 0.5)
    d = a.astype(float) - b.astype(float)
    half = 1.959963984540054 * d.std() / math.sqrt(d.size)
    diff, low, high = paired_difference(a, b)
    assert low == pytest.approx(d.mean() - half, abs=2e-3) and high == pytest.approx(d.mean() + half, abs=2e-3)


def test_tokens_vs_accuracy_rows():
    rows = tokens_vs_accuracy(
        {"full": ([10, 10, 10, 10], [True, False, True, False]), "online": ([4, 6, 5, 5], [True, True, True, False])},
        reference="full",
    )
    full, online = rows
    assert (full["tokens"], full["tokens_vs_reference"], full["paired_difference"]) == (40, 1.0, 0.0)
    assert full["paired_difference_ci95"] == (0.0, 0.0)
    assert (online["tokens"], online["tokens_vs_reference"], online["accuracy"]) == (20, 0.5, 0.75)
    assert online["paired_difference"] == 0.25
    low, high = online["paired_difference_ci95"]
    assert low < 0.25 < high


def test_estimated_savings_counts_cut_traces_at_their_problems_mean_complete_length():
    generated, estimate = estimated_savings(
        ["a", "a", "a", "a", "b", "b"],
        [WARMUP, WARMUP, FINAL, SKIPPED, WARMUP, FINAL],
        [False, False, True, False, False, False],
        [10, 20, 4, 0, 7, 9],
    )
    assert generated == 50
    # Problem a: complete 10 + 20 (mean 15), cut traces 4 -> 15 and 0 -> 15; problem b: 7 + 9.
    assert estimate == 10 + 20 + 15 + 15 + 7 + 9


def test_filtered_vote_keeps_the_most_confident_answered_traces():
    lowest = [1.0, 2.0, 3.0, 4.0, math.nan, 5.0]
    classes = [0, 0, 1, 1, 0, -1]
    # Answered and confident: 1, 2, 3, 4 (the 5.0 has no answer, the NaN no tokens). Keep 10 %: the
    # 90th percentile of [1, 2, 3, 4] is 3.7: trace 3 alone votes.
    top = filtered_vote(lowest, classes, 10)
    assert (top.winner, top.share, top.weights.tolist()) == (1, 1.0, [0, 0, 0, 4.0, 0, 0])
    # Keep 90 %: the 10th percentile is 1.3: traces 1, 2, 3 vote, class 1 with 7 of 9.
    most = filtered_vote(lowest, classes, 90)
    assert most.winner == 1 and most.share == pytest.approx(7 / 9)
    assert filtered_vote([1.0], [-1], 90).winner == -1
