"""What DeepConf would have done on a full run whose traces carry engine confidences: per problem the tokens and
the pick of DeepConf offline and of DeepConf online simulated (the rows of the tokens-vs-accuracy table)."""

from __future__ import annotations

import dataclasses

import numpy as np

from ray_pipeline.deepconf.methods import DEEPCONF_KEEP_PERCENTS
from ray_pipeline.deepconf.online import OnlineVote, filtered_vote, replay_problem

# DeepConf online's percentiles in the tokens-vs-accuracy table: 90 (DeepConf-low) and 10 (DeepConf-high).
SIMULATED_PERCENTILES = {"low": 90.0, "high": 10.0}


def engine_strategies(
    engine, lowest_group, phase, label, token_count, starts, ends, online, window: int
) -> dict | None:
    """Per problem of a full run whose traces carry engine confidences: the tokens and the pick (-1: none) of
    DeepConf online simulated at each SIMULATED_PERCENTILES (`online.replay_problem`) and of DeepConf offline
    on those confidences (`online.filtered_vote`, 10 % and 90 %), from each trace's `lowest_group` confidence over
    them (the reducer's `engine_lowest_group`). None for an online run or without them."""
    if online is None or not len(starts) or any(p is not None for p in phase):
        return None
    if any(c is None or (not len(c) and n) for c, n in zip(engine, token_count)):
        return None
    strategies: dict[str, tuple[list[int], list[int]]] = {}
    for start, end in zip(starts, ends):
        confidences = [np.asarray(c, dtype=np.float64) for c in engine[start:end]]
        classes = label[start:end]
        lowest = lowest_group[start:end]
        full = int(sum(len(c) for c in confidences))
        for keep in DEEPCONF_KEEP_PERCENTS:
            vote = filtered_vote(lowest, classes, keep)
            _add(strategies, f"deepconf-offline-{keep}", full, heaviest_voter(vote, classes))
        for name, percentile in SIMULATED_PERCENTILES.items():
            settings = dataclasses.replace(online, window=window, percentile=percentile)
            replay = replay_problem(confidences, classes, settings)
            _add(strategies, f"deepconf-{name}-online-simulated", replay.tokens, heaviest_voter(replay.vote, classes))
    return strategies


def heaviest_voter(vote: OnlineVote, classes: np.ndarray) -> int:
    """The pick of a DeepConf vote: the winning answer's heaviest voter (the first on ties); -1 without a vote."""
    if vote.winner < 0:
        return -1
    weights = np.where((classes == vote.winner) & (vote.weights > 0), vote.weights, -np.inf)
    return int(np.argmax(weights))


def _add(strategies: dict, name: str, tokens: int, pick: int) -> None:
    tokens_list, picks = strategies.setdefault(name, ([], []))
    tokens_list.append(tokens)
    picks.append(pick)
