"""DeepConf online's threshold, vote and consensus, and the exact simulator of a run (numpy only; the package's
docstring gives the algorithm)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ray_pipeline.deepconf.confidence import first_stop, lowest_group_confidence

# A candidate's phase in an online run (the `phase` column); full generation leaves it null.
WARMUP, FINAL, SKIPPED = "warmup", "final", "skipped"


def stop_threshold(lowest_groups, percentile: float) -> float:
    """The threshold s: the `percentile`-th percentile (numpy's linear interpolation) of the warm-up traces'
    lowest group confidences (NaN ones, of empty traces, left out; NaN when none is left: nothing stops or votes)."""
    values = np.asarray(lowest_groups, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(np.percentile(values, percentile)) if values.size else math.nan



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
