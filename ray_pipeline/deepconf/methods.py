"""DeepConf's selection methods: offline filtering (the most confident traces vote, weighted by confidence) and
online's own vote over an online run's traces. They register in `selection.METHODS` like every method."""

from __future__ import annotations

import numpy as np

from ray_pipeline.selection import Candidates, MethodUnavailable, Picks, SelectionParams, method, weighted_vote

# DeepConf's offline filtering: the percentages of most confident traces kept (the paper's eta).
DEEPCONF_KEEP_PERCENTS = (10, 90)


def row_percentiles(values: np.ndarray, among: np.ndarray, percentile: float) -> np.ndarray:
    """Per row, `numpy.percentile` (linear interpolation) of the values `among` marks; NaN for a row with none.

    numpy computes one percentile per call and cannot skip masked values per row; this is its
    'linear' method (virtual index (c - 1) q, numpy's `_lerp`) on every row at once, equal to it bit for bit.
    """
    rows = values.shape[0]
    count = among.sum(axis=1)
    ordered = np.sort(np.where(among, values, np.inf), axis=1)
    q = np.true_divide(percentile, np.float64(100))
    virtual = (count - 1) * q
    low = np.floor(virtual)
    at_top = virtual >= count - 1
    low_index = np.where(at_top, count - 1, low).astype(np.intp)
    high_index = np.where(at_top, count - 1, low + 1).astype(np.intp)
    low_index, high_index = np.maximum(low_index, 0), np.maximum(high_index, 0)
    a = ordered[np.arange(rows), low_index]
    b = ordered[np.arange(rows), high_index]
    gamma = virtual - np.where(at_top, -1, low)
    # Rows with no value hold inf - inf here; they end as NaN below.
    with np.errstate(invalid="ignore"):
        diff = b - a
        result = a + diff * gamma
        result = np.where(gamma >= 0.5, b - diff * (1 - gamma), result)
    result = np.where(at_top, a, result)
    return np.where(count > 0, result, np.nan)


def deepconf_kept(confidences: np.ndarray, eligible: np.ndarray, keep_percent: float) -> np.ndarray:
    """DeepConf's filter: per row, the eligible candidates whose confidence is at least the (100 - eta)th percentile.

    The percentile is numpy's (linear interpolation) over the row's eligible confidences, as in
    DeepConf's `filter_top_confidence`; so of N distinct confidences N - ceil((1 - eta/100)(N - 1))
    are kept (at least one), and ties at the threshold are all kept.
    """
    threshold = row_percentiles(confidences, eligible, 100 - keep_percent)
    with np.errstate(invalid="ignore"):
        return eligible & (confidences >= threshold[:, None])


def deepconf_filtered_vote(
    block: Candidates, confidences: np.ndarray, keep_percent: float, params: SelectionParams
) -> Picks:
    """Keep the most confident `keep_percent` % of candidates, then a confidence-weighted vote among them.

    Candidates without a confidence (empty responses) never take part; with `answerless_last`,
    neither do candidates without an answer (DeepConf votes over traces with an answer only).
    """
    eligible = ~np.isnan(confidences)
    if params.answerless_last:
        eligible &= block.answered
    kept = deepconf_kept(confidences, eligible, keep_percent)
    return weighted_vote(block.label, np.where(kept, confidences, 0.0), confidences, kept)


def _register_deepconf_filtered(kind: str, keep_percent: int) -> None:
    value = kind.replace("-", "_")

    @method(f"deepconf-{kind}-{keep_percent}")
    def filtered(block: Candidates, params: SelectionParams) -> Picks:
        return deepconf_filtered_vote(block, getattr(block, value), keep_percent, params)

    filtered.__doc__ = (
        f"DeepConf offline: the {keep_percent} % most {kind} confident candidates vote, weighted by that confidence."
    )


for _kind in ("lowest-group", "tail"):
    for _keep in DEEPCONF_KEEP_PERCENTS:
        _register_deepconf_filtered(_kind, _keep)


@method("deepconf-online", scored=False)
def deepconf_online_vote(block: Candidates, params: SelectionParams) -> Picks:
    """DeepConf online's own vote (`deepconf.online_vote`) over an online run's traces.

    Every launched trace with an answer whose lowest group confidence over the engine's confidences is
    at least its problem's threshold votes, weighted by that confidence: the warm-up traces at or above
    the threshold and the final traces that were not stopped. The winning answer's heaviest voter wins.
    """
    if not block.online.all():
        raise MethodUnavailable(
            "method deepconf-online needs the shards of an online run (jobs.infer or jobs.main --generation "
            "deepconf-online)"
        )
    confidence = block.engine_lowest_group
    with np.errstate(invalid="ignore"):
        voters = block.launched & block.answered & (confidence >= block.stop_threshold)
    return weighted_vote(block.label, np.where(voters, confidence, 0.0), confidence, voters)
