"""DeepConf online: its stop rule, threshold and vote, and an exact offline simulator of it (numpy only).

DeepConf ("Deep Think with Confidence", Fu et al. 2025; facebookresearch/deepconf, `deepconf-online.py`)
does this per problem:

1. `warmup` traces run to their end. A trace's lowest group confidence is the least mean engine confidence
   over `window` consecutive tokens (the window clipped to the trace when the trace is shorter).
2. The threshold s is the `percentile`-th percentile (numpy's, linear) of the warm-up traces' lowest group
   confidences: 90 is DeepConf-low (most later traces stop), 10 DeepConf-high.
3. Every later ("final") trace stops at the first token whose last `window` tokens (a full window) have a
   mean engine confidence below s.
4. The vote: every generated trace whose lowest group confidence (over what it generated) is at least s
   votes for its answer with that confidence as its weight. That keeps the warm-up traces at or above s and
   the final traces that were not stopped; like `deepconf-online.py`, which marks every final trace whose
   lowest group confidence is below s as stopped after generation, it also leaves out a final trace shorter
   than the window whose mean is below s. Traces without an answer never vote.
5. Optional consensus stop (the paper's adaptive sampling): after each final trace, in trace order, the
   problem stops once the leading answer holds at least `consensus` of the vote's weight; the later traces do
   not vote (phase skipped). As in the paper, the check follows each new trace, so at least one final trace
   runs: the warm-up's vote alone (with DeepConf-low often one or two traces) never stops it. Which traces
   vote depends only on the traces, never on timing: the generator keeps `wave` final traces in flight and
   hands them to the check in trace order; a trace that finished after the stop was decided is counted as
   spent engine work, not as a vote.

A token's engine confidence is minus the mean of the generator's top-k log-probabilities of the raw
(temperature 1) distribution at that position, DeepConf's definition, read from the engine that samples
(vLLM's log-probs, or transformers' logits). It is stored rounded to a multiple of 2^-16 nat
(`token_confidences`), so every sum of confidences is an integer multiple of 2^-16 that float64 holds
exactly in any order: a window's mean is its exact sum divided by the window, one rounding. The generators'
running sums (`WindowMonitor`) and the simulator's cumulative sums (`window_means`) therefore give the same
means bit for bit, and the simulator (`replay_problem`) decides exactly what an online run on the same traces
decided. The scorer's `token_confidence` (a teacher-forced pass, up to 0.16 nat away in bf16) is never mixed in.
One limit under a consensus stop: the online check groups the answers of the traces finished so far, the replay
is given the classes of the complete run's answers; answer classes are cliques (`group_answers`), and where a
problem's answers are not transitively equivalent (50\\% ~ 0.5 and 50\\% ~ 50, 0.5 !~ 50) the classes of a
subset need not be those of the whole restricted to it, so the two can weigh a vote differently there.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# Engine confidences are multiples of 1 / CONFIDENCE_SCALE nat.
CONFIDENCE_SCALE = 1 << 16
# A candidate's phase in an online run (the `phase` column); full generation leaves it null.
WARMUP, FINAL, SKIPPED = "warmup", "final", "skipped"
# z of a two-sided 95 % interval.
Z95 = 1.959963984540054


def token_confidences(top_logprobs) -> np.ndarray:
    """Engine confidence of each position from its top-k log-probabilities `[T, k]`: minus their mean, rounded
    to a multiple of 2^-16 nat (float64 `[T]`)."""
    top = np.asarray(top_logprobs, dtype=np.float64)
    if top.ndim != 2:
        raise ValueError(f"top_logprobs must be [positions, k], got shape {top.shape}")
    return np.rint(-top.mean(axis=1) * CONFIDENCE_SCALE) / CONFIDENCE_SCALE


def confidence_units(confidence) -> np.ndarray:
    """Stored engine confidences as integer multiples of 2^-16 nat (int64): exact, since they were stored so."""
    return np.rint(np.asarray(confidence, dtype=np.float64) * CONFIDENCE_SCALE).astype(np.int64)


def window_means(confidence, window: int) -> np.ndarray:
    """Mean engine confidence of every full window of `window` consecutive tokens (float64 `[T - window + 1]`;
    empty when the trace is shorter than the window)."""
    units = confidence_units(confidence)
    if units.size < window:
        return np.zeros(0, dtype=np.float64)
    sums = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(units)])
    return (sums[window:] - sums[:-window]) / (window * CONFIDENCE_SCALE)


def lowest_group_confidence(confidence, window: int) -> float:
    """The least mean over windows of `window` tokens; a trace shorter than the window is one clipped window
    (its mean); NaN for an empty trace."""
    units = confidence_units(confidence)
    if units.size == 0:
        return math.nan
    if units.size < window:
        return int(units.sum()) / (units.size * CONFIDENCE_SCALE)
    return float(window_means(confidence, window).min())


def first_stop(confidence, window: int, threshold: float) -> int | None:
    """Tokens an online trace keeps: the end of its first full window whose mean is below `threshold`, or None
    when no window is (the trace runs to its end)."""
    below = np.flatnonzero(window_means(confidence, window) < threshold)
    return int(below[0]) + window if below.size else None


def stop_threshold(lowest_groups, percentile: float) -> float:
    """The threshold s: the `percentile`-th percentile (numpy's linear interpolation) of the warm-up traces'
    lowest group confidences (NaN ones, of empty traces, left out; NaN when none is left: nothing stops or votes)."""
    values = np.asarray(lowest_groups, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(np.percentile(values, percentile)) if values.size else math.nan


class WindowMonitor:
    """The online stop rule for one final trace: `add` each new token's engine confidence; True once the last
    `window` tokens have a mean below the threshold. Computes exactly what `window_means` computes."""

    def __init__(self, window: int, threshold: float):
        self.window, self.threshold = window, threshold
        self.recent: deque[int] = deque()
        self.units = 0
        self.divisor = window * CONFIDENCE_SCALE

    def add(self, confidence: float) -> bool:
        unit = round(confidence * CONFIDENCE_SCALE)
        self.recent.append(unit)
        self.units += unit
        if len(self.recent) > self.window:
            self.units -= self.recent.popleft()
        return len(self.recent) == self.window and self.units / self.divisor < self.threshold


def group_answers(
    answers: Sequence[str | None],
    equivalent: Callable[[str, str], bool],
    *,
    decide: Callable[[str, str], bool | None] | None = None,
) -> np.ndarray:
    """A class id per answer (int64; -1 for no answer), ids numbered by first appearance in `answers`.

    Classes are cliques: every two answers of a class are `equivalent`, which must be symmetric (the one
    pairwise rule; for math answers `answers.answers_equivalent`). Identical strings always share a class.
    The partition depends only on the answers and their counts, never on their order: the distinct answers
    are taken in a canonical order, most common first (ties: by string), and each joins the first class all
    of whose members it is equivalent to, else starts one. The most common answer seeds a class, so a rare
    answer that is equivalent to two non-equivalent ones (a "bridge": 50\\% to both 0.5 and 50) joins at
    most one of their classes and never chains them; a class is never seeded by such a one-off.

    `decide` (optional) is a cheap pre-decision of a pair: True or False where it knows `equivalent`'s
    verdict, None where `equivalent` must run. A class's members are all pre-decided before `equivalent`
    runs on any of them, so one decided False rules the class out at no cost. Each unordered pair is
    decided at most once per call (an answer meets each member of a class once), always with the earlier
    answer of the canonical order first.

    The ids of a subset are not those of the whole restricted to it where equivalence is not transitive
    (a ~ b ~ c but not a ~ c): no order-independent clique rule can give both.
    """
    counts: dict[str, int] = {}
    for answer in answers:
        if answer is not None:
            counts[answer] = counts.get(answer, 0) + 1
    classes: list[list[str]] = []
    class_of: dict[str, int] = {}
    for answer in sorted(counts, key=lambda a: (-counts[a], a)):
        label = next((c for c, members in enumerate(classes) if _joins(answer, members, equivalent, decide)), None)
        if label is None:
            label = len(classes)
            classes.append([])
        classes[label].append(answer)
        class_of[answer] = label
    # Renumber the classes by the first appearance of any of their members in the given order.
    renumber: dict[int, int] = {}
    for answer in counts:
        renumber.setdefault(class_of[answer], len(renumber))
    ids = np.full(len(answers), -1, dtype=np.int64)
    for i, answer in enumerate(answers):
        if answer is not None:
            ids[i] = renumber[class_of[answer]]
    return ids


def _joins(
    answer: str,
    members: list[str],
    equivalent: Callable[[str, str], bool],
    decide: Callable[[str, str], bool | None] | None,
) -> bool:
    """Whether `answer` is equivalent to every member of a class (each member precedes it in the canonical order)."""
    undecided = members
    if decide is not None:
        undecided = []
        for member in members:
            verdict = decide(member, answer)
            if verdict is False:
                return False
            if verdict is None:
                undecided.append(member)
    return all(equivalent(member, answer) for member in undecided)


@dataclass(frozen=True)
class OnlineVote:
    """The online vote of one problem: the winning answer class (-1 when no trace votes), its share of the
    voting weight, and each candidate's weight (its lowest group confidence if it votes, else 0)."""

    winner: int
    share: float
    weights: np.ndarray


def online_vote(lowest_group, class_ids, launched, threshold: float) -> OnlineVote:
    """DeepConf's online vote (step 4 of the module docstring) over one problem's candidates.

    `lowest_group` float `[N]` (each candidate's lowest group confidence over what it generated; NaN for a
    candidate never generated), `class_ids` int `[N]` (-1: no answer), `launched` bool `[N]` (False for traces a
    consensus stop skipped), `threshold` the problem's s. Ties go to the class whose first voter comes first.
    """
    lowest_group = np.asarray(lowest_group, dtype=np.float64)
    class_ids = np.asarray(class_ids, dtype=np.int64)
    with np.errstate(invalid="ignore"):
        votes = np.asarray(launched, dtype=bool) & (class_ids >= 0) & (lowest_group >= threshold)
    weights = np.where(votes, lowest_group, 0.0)
    if not votes.any():
        return OnlineVote(-1, 0.0, weights)
    totals = np.bincount(class_ids[votes], weights=weights[votes])
    best = totals.max()
    # Among the classes with the largest weight, the one whose first voter comes first.
    winner = next(int(c) for c in class_ids[votes] if totals[c] == best)
    return OnlineVote(winner, float(best / totals.sum()), weights)


def filtered_vote(lowest_group, class_ids, keep_percent: float) -> OnlineVote:
    """DeepConf offline over complete traces: of the traces with an answer, those whose lowest group confidence is
    at least the (100 - `keep_percent`)-th percentile of theirs vote, weighted by it (the `deepconf-lowest-group-*`
    methods, here on the engine's confidences)."""
    lowest_group = np.asarray(lowest_group, dtype=np.float64)
    class_ids = np.asarray(class_ids, dtype=np.int64)
    answered = (class_ids >= 0) & ~np.isnan(lowest_group)
    if not answered.any():
        return OnlineVote(-1, 0.0, np.zeros(lowest_group.size))
    threshold = float(np.percentile(lowest_group[answered], 100 - keep_percent))
    return online_vote(lowest_group, class_ids, answered, threshold)


@dataclass(frozen=True)
class OnlineSettings:
    """The online algorithm's parameters (RunConfig's deepconf_window, warmup_traces, deepconf_percentile,
    consensus, consensus_wave)."""

    window: int
    warmup: int
    percentile: float
    consensus: float | None = None
    wave: int = 8

    @classmethod
    def from_config(cls, config) -> OnlineSettings:
        return cls(
            config.deepconf_window,
            config.warmup_traces,
            config.deepconf_percentile,
            config.consensus,
            config.consensus_wave,
        )

    def consensus_reached(self, vote: OnlineVote) -> bool:
        return self.consensus is not None and vote.winner >= 0 and vote.share >= self.consensus


@dataclass(frozen=True)
class ProblemReplay:
    """What the online algorithm does on one problem: per trace its phase, tokens kept, where it stopped
    (-1: it did not) and lowest group confidence (over what it generated; NaN if never launched); the
    threshold and the vote."""

    phase: list[str]
    kept: np.ndarray
    stopped_at: np.ndarray
    lowest_group: np.ndarray
    threshold: float
    vote: OnlineVote

    @property
    def tokens(self) -> int:
        return int(self.kept.sum())

    @property
    def launched(self) -> np.ndarray:
        return np.array([p != SKIPPED for p in self.phase], dtype=bool)


def replay_problem(confidences: Sequence, class_ids, settings: OnlineSettings) -> ProblemReplay:
    """Replay the online algorithm on one problem's complete traces (their stored engine confidences, in trace
    order, and answer class ids): which traces stop and where, the tokens each keeps, the threshold, the vote.

    A trace is a prefix of its complete counterpart (per-trace seeds), so stopping it is cutting it where the
    online rule would have: the replay decides exactly what the online run decided.
    """
    n, warmup = len(confidences), settings.warmup
    class_ids = np.asarray(class_ids, dtype=np.int64)
    phase = [SKIPPED] * n
    kept = np.zeros(n, dtype=np.int64)
    stopped_at = np.full(n, -1, dtype=np.int64)
    lowest = np.full(n, math.nan)
    for k in range(min(warmup, n)):
        phase[k], kept[k] = WARMUP, len(confidences[k])
        lowest[k] = lowest_group_confidence(confidences[k], settings.window)
    threshold = stop_threshold(lowest[:warmup], settings.percentile)
    for k in range(warmup, n):
        conf = np.asarray(confidences[k])
        stop = first_stop(conf, settings.window, threshold)
        phase[k] = FINAL
        kept[k] = len(conf) if stop is None else stop
        stopped_at[k] = -1 if stop is None else stop
        lowest[k] = lowest_group_confidence(conf[: kept[k]], settings.window)
        if settings.consensus is not None:
            launched = np.array([p != SKIPPED for p in phase], dtype=bool)
            if settings.consensus_reached(online_vote(lowest, class_ids, launched, threshold)):
                break
    vote = online_vote(lowest, class_ids, np.array([p != SKIPPED for p in phase], dtype=bool), threshold)
    return ProblemReplay(phase, kept, stopped_at, lowest, threshold, vote)


def majority_class(class_ids) -> int:
    """Self-consistency over one problem's answer classes: the largest class (ties: the first seen); -1 if none."""
    class_ids = np.asarray(class_ids, dtype=np.int64)
    answered = class_ids[class_ids >= 0]
    if not answered.size:
        return -1
    counts = np.bincount(answered)
    return next(int(c) for c in answered if counts[c] == counts.max())


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (NaN, NaN for n = 0)."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(correct_a, correct_b, z: float = Z95) -> tuple[float, float, float]:
    """Accuracy of A minus accuracy of B on the same problems, with Newcombe's (1998) score interval for paired
    proportions (his method 10: the two Wilson intervals, joined through the pairs' phi correlation).

    Returns (difference, low, high); NaNs for no problems.
    """
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    n = a.size
    if n == 0:
        return math.nan, math.nan, math.nan
    both, only_a, only_b = int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum())
    neither = n - both - only_a - only_b
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson_interval(both + only_a, n, z)
    l2, u2 = wilson_interval(both + only_b, n, z)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(margins) if margins else 0.0
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    diff = p1 - p2
    return diff, max(-1.0, diff - below), min(1.0, diff + above)


def tokens_vs_accuracy(
    strategies: dict[str, tuple[Sequence[int], Sequence[bool]]], reference: str
) -> list[dict]:
    """The "tokens vs accuracy" table: per strategy (name -> per-problem tokens generated and per-problem
    correctness, problems in the same order for all), its tokens, their ratio to the reference's, its accuracy
    with a Wilson interval, and its accuracy minus the reference's on the same problems with Newcombe's paired
    interval. `reference` names one of `strategies` (e.g. full self-consistency)."""
    ref_tokens, ref_correct = strategies[reference]
    ref_total = int(np.sum(ref_tokens, dtype=np.int64))
    rows = []
    for name, (tokens, correct) in strategies.items():
        correct = np.asarray(correct, dtype=bool)
        total = int(np.sum(tokens, dtype=np.int64))
        # The reference against itself differs by nothing, with certainty.
        diff, low, high = (0.0, 0.0, 0.0) if name == reference else paired_difference(correct, ref_correct)
        rows.append(
            {
                "name": name,
                "tokens": total,
                "tokens_vs_reference": total / ref_total if ref_total else math.nan,
                "accuracy": float(correct.mean()) if correct.size else math.nan,
                "accuracy_ci95": wilson_interval(int(correct.sum()), correct.size),
                "paired_difference": diff,
                "paired_difference_ci95": (low, high),
            }
        )
    return rows


def estimated_savings(problem_ids, phase, stopped, token_counts) -> tuple[int, int]:
    """(tokens an online run generated, an estimate of what running its every trace to the end would have
    generated): a stopped or skipped trace is counted at its problem's mean length of the traces that ended on
    their own (or its own length, if longer)."""
    problem_ids = np.asarray(problem_ids)
    phase = np.asarray(phase, dtype=object)
    stopped = np.asarray(stopped, dtype=bool)
    counts = np.asarray(token_counts, dtype=np.int64)
    estimate = 0
    for pid in dict.fromkeys(problem_ids.tolist()):
        mine = problem_ids == pid
        cut = mine & (stopped | (phase == SKIPPED))
        whole = mine & ~cut
        mean = counts[whole].mean() if whole.any() else 0.0
        estimate += int(counts[whole].sum()) + int(round(np.maximum(counts[cut], mean).sum()))
    return int(counts.sum()), estimate
