"""DeepConf's "tokens vs accuracy" table: tokens generated against accuracy, each strategy paired with a reference
on the same problems (the report's section and jobs.bench.online's)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ray_pipeline.metrics import Z95, paired_difference, picked_correct, wilson_interval

if TYPE_CHECKING:
    from ray_pipeline.graded_run import GradedRun
    from ray_pipeline.metrics import MethodResult

# The table's rows for a full run with engine confidences (GradedRun.engine_strategies).
ENGINE_STRATEGY_NAMES = {
    "deepconf-offline-10": "DeepConf offline, top 10 % (engine confidences)",
    "deepconf-offline-90": "DeepConf offline, top 90 % (engine confidences)",
    "deepconf-low-online-simulated": "DeepConf-low online (simulated)",
    "deepconf-high-online-simulated": "DeepConf-high online (simulated)",
}


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
        diff, low, high = (0.0, 0.0, 0.0) if name == reference else paired_difference(correct, ref_correct, Z95)
        rows.append(
            {
                "name": name,
                "tokens": total,
                "tokens_vs_reference": total / ref_total if ref_total else math.nan,
                "accuracy": float(correct.mean()) if correct.size else math.nan,
                "accuracy_ci95": wilson_interval(int(correct.sum()), correct.size, Z95),
                "paired_difference": diff,
                "paired_difference_ci95": (low, high),
            }
        )
    return rows


def run_tokens_vs_accuracy(run: GradedRun, results: dict[str, MethodResult]) -> list[dict] | None:
    """Tokens generated against accuracy: for an online run, its own vote and self-consistency over its traces;
    for a full run with engine confidences, full self-consistency, DeepConf offline and DeepConf online
    simulated on the same traces. Each row pairs its accuracy with the first row's on the same problems
    (`tokens_vs_accuracy`). None for a run without either."""
    sc = picked_correct(run, results["self-consistency"].picks)
    if "deepconf-online" in results:
        online = picked_correct(run, results["deepconf-online"].picks)
        strategies = {
            "DeepConf online (this run)": (run.generated, online),
            "self-consistency (this run's traces)": (run.generated, sc),
        }
    elif run.engine_strategies:
        strategies = {"full self-consistency": (run.generated, sc)}
        for name, (tokens, picks) in run.engine_strategies.items():
            right = (picks >= 0) & run.values["correct"][run.offsets[:-1] + np.maximum(picks, 0)] & run.has_gold
            strategies[ENGINE_STRATEGY_NAMES[name]] = (tokens, right)
    else:
        return None
    return tokens_vs_accuracy(strategies, next(iter(strategies)))
