"""Statistics of every selection method on one run's questions: accuracy, intervals, AUROC, the sweeps.

Accuracy is the share of questions whose chosen candidate is correct, with a 95 % Wilson
interval; pass@N the share with any correct candidate (the oracle). AUROC is that of a method's
per-candidate score for the candidate's correctness, pooled over all candidates of all questions.
With `answerless_last` on, each method also says on how many questions that rule changed its pick.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace

from ray_pipeline.selection import METHODS, Choice, MethodUnavailable, SelectionParams, alpha_methods

# The alphas of the accuracy-vs-alpha sweep.
ALPHA_GRID = [round(0.1 * i, 1) for i in range(11)]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % for z = 1.96)."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def auroc(scores: list[float], labels: list[bool]) -> float:
    """Probability that a random positive outscores a random negative (ties count half); NaN scores are dropped.

    NaN when either class is empty.
    """
    pairs = [(s, bool(y)) for s, y in zip(scores, labels) if s is not None and not math.isnan(s) and y is not None]
    positives = sum(y for _, y in pairs)
    negatives = len(pairs) - positives
    if positives == 0 or negatives == 0:
        return math.nan
    # Mann-Whitney U from average ranks.
    ordered = sorted(pairs, key=lambda p: p[0])
    rank_sum, i = 0.0, 0
    while i < len(ordered):
        j = i
        while j < len(ordered) and ordered[j][0] == ordered[i][0]:
            j += 1
        average_rank = (i + j + 1) / 2
        rank_sum += average_rank * sum(y for _, y in ordered[i:j])
        i = j
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def select_all(questions: list[list[dict]], name: str, params: SelectionParams) -> list[Choice]:
    method = METHODS[name]
    return [method(q, params) for q in questions]


def accuracy(questions: list[list[dict]], choices: list[Choice]) -> float:
    return sum(bool(q[c.index]["correct"]) for q, c in zip(questions, choices)) / len(questions)


def pass_at(questions: list[list[dict]]) -> float:
    return sum(any(c["correct"] for c in q) for q in questions) / len(questions)


def _by(questions, choices, key) -> dict[str, dict]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for q, c in zip(questions, choices):
        value = q[0][key]
        groups["unknown" if value is None else str(value)].append(bool(q[c.index]["correct"]))
    return {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(groups.items())}


@dataclass
class MethodResult:
    choices: list[Choice]
    summary: dict


def evaluate(questions: list[list[dict]], name: str, params: SelectionParams) -> MethodResult:
    """One method on every question: its choices and the summary numbers of the report."""
    choices = select_all(questions, name, params)
    correct = sum(bool(q[c.index]["correct"]) for q, c in zip(questions, choices))
    scores = [s for c in choices for s in c.scores]
    labels = [cand["correct"] for q in questions for cand in q]
    by_n = {}
    for k in range(1, max(len(q) for q in questions) + 1):
        prefix = [q[:k] for q in questions]
        by_n[k] = accuracy(prefix, select_all(prefix, name, params))
    changed = None
    if params.answerless_last:
        plain = select_all(questions, name, replace(params, answerless_last=False))
        changed = sum(a.index != b.index for a, b in zip(choices, plain))
    summary = {
        "accuracy": correct / len(questions),
        "ci95": list(wilson_interval(correct, len(questions))),
        "auroc": _none_if_nan(auroc(scores, labels)),
        "by_level": _by(questions, choices, "level"),
        "by_subject": _by(questions, choices, "subject"),
        "accuracy_by_n": by_n,
        # Questions whose pick the answerless-last rule changed (None: the rule is off).
        "answerless_last_changed": changed,
    }
    return MethodResult(choices, summary)


def _none_if_nan(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value


def compare(questions: list[list[dict]], params: SelectionParams) -> tuple[dict[str, MethodResult], dict, dict]:
    """Every available method on `questions`: results, the methods left out and why, and the alpha sweep."""
    results, unavailable = {}, {}
    for name in METHODS:
        try:
            results[name] = evaluate(questions, name, params)
        except MethodUnavailable as exc:
            unavailable[name] = str(exc)
    sweep = {
        name: {str(a): accuracy(questions, select_all(questions, name, replace(params, alpha=a))) for a in ALPHA_GRID}
        for name in alpha_methods(params)
        if name in results
    }
    return results, unavailable, sweep
