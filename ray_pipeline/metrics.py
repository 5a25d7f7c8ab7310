"""Statistics of every selection method on one run's questions: accuracy, intervals, AUROC, the sweeps.

Accuracy is the share of questions whose chosen candidate is correct, with a 95 % Wilson
interval; pass@N the share with any correct candidate (the oracle). AUROC is that of a method's
per-candidate score for the candidate's correctness, pooled over all candidates of all questions.
With `answerless_last` on, each method also says on how many questions that rule changed its pick.

The accuracy-vs-N' curves average each method over `CURVE_DRAWS` random subsets of N' of each
question's candidates (seeded, so a comparison is reproducible), at the sizes `curve_sizes` names;
pass@N' is the unbiased estimator 1 - C(n - c, N') / C(n, N') (Chen et al., 2021). The first-N'
numbers (each question's first N' candidates, one draw) are kept beside them. Every subset reuses
the run's answer classes and grades: nothing is graded again per N', alpha or method.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np

from ray_pipeline.graded_run import GradedRun
from ray_pipeline.reduce import RunPicks, run_method
from ray_pipeline.selection import METHODS, Candidates, MethodUnavailable, SelectionParams, alpha_methods

# The alphas of the accuracy-vs-alpha sweep.
ALPHA_GRID = [round(0.1 * i, 1) for i in range(11)]
# Random subsets of N' candidates per question and N' < n, and the seed of their draws.
CURVE_DRAWS = 32
CURVE_SEED = 0
# z of a two-sided 95 % interval, exactly (the method table keeps z = 1.96).
Z95 = 1.959963984540054


def curve_sizes(n: int) -> list[int]:
    """The N' of the curves: every one up to 16, else the powers of two and n (so their cost grows like n, not n^2)."""
    if n <= 16:
        return list(range(1, n + 1))
    return sorted({2**i for i in range(n.bit_length()) if 2**i <= n} | {n})


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % for z = 1.96; the DeepConf table passes Z95)."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(correct_a, correct_b, z: float = 1.96) -> tuple[float, float, float]:
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


def auroc(scores, labels) -> float:
    """Probability that a random positive outscores a random negative (ties count half); NaN scores are dropped.

    NaN when either class is empty. Labels of None (no gold answer) are dropped too.
    """
    scores = np.asarray([math.nan if s is None else s for s in scores], dtype=np.float64)
    known = np.array([y is not None for y in labels], dtype=bool)
    positive = np.array([bool(y) for y in labels], dtype=bool)
    return auroc_arrays(scores, positive, known)


def auroc_arrays(scores: np.ndarray, positive: np.ndarray, known: np.ndarray) -> float:
    """`auroc` on arrays: Mann-Whitney U from average ranks, the rank sums added in score order."""
    keep = known & ~np.isnan(scores)
    values, positive = scores[keep], positive[keep]
    positives = int(positive.sum())
    negatives = len(values) - positives
    if positives == 0 or negatives == 0:
        return math.nan
    order = np.argsort(values, kind="stable")
    values, positive = values[order], positive[order]
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    average_rank = (starts + ends + 1) / 2
    in_group = np.add.reduceat(positive.astype(np.int64), starts)
    # A running sum in score order, as adding group by group does.
    rank_sum = float(np.cumsum(average_rank * in_group)[-1])
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def _none_if_nan(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value


def picked_correct(run: GradedRun, picks: RunPicks) -> np.ndarray:
    """Per problem, whether the pick is correct (False without a gold answer)."""
    return run.values["correct"][run.offsets[:-1] + picks.index] & run.has_gold


def _by(run: GradedRun, correct: np.ndarray, key: str) -> dict[str, dict]:
    """Accuracy per value of `key` over the graded problems."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for value, hit, graded in zip(run.column(key), correct.tolist(), run.has_gold.tolist()):
        if graded:
            groups["unknown" if value is None else str(value)].append(hit)
    return {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(groups.items())}


@dataclass
class MethodResult:
    picks: RunPicks
    summary: dict


def evaluate(run: GradedRun, name: str, params: SelectionParams) -> MethodResult:
    """One method on every question: its picks and the summary numbers of the report (curves: `curves`)."""
    picks = run_method(run, name, params)
    correct = picked_correct(run, picks)
    known = np.repeat(run.has_gold, run.sizes)
    changed = None
    if params.answerless_last:
        plain = run_method(run, name, replace(params, answerless_last=False))
        changed = int(np.sum(picks.index != plain.index))
    # Over the graded problems: one without a gold answer is neither right nor wrong.
    summary = {
        "accuracy": run.share(float(correct.sum())),
        "ci95": [_none_if_nan(x) for x in wilson_interval(int(correct.sum()), run.graded)],
        "auroc": _none_if_nan(auroc_arrays(picks.scores, run.values["correct"], known)),
        "by_level": _by(run, correct, "level"),
        "by_subject": _by(run, correct, "subject"),
        # Questions whose pick the answerless-last rule changed (None: the rule is off).
        "answerless_last_changed": changed,
    }
    return MethodResult(picks, summary)


def subset_columns(rng: np.random.Generator, questions: int, n: int, k: int, draws: int) -> np.ndarray:
    """`draws` random k-subsets of range(n) per question, each in candidate order: [draws * questions, k]."""
    keys = rng.random((draws * questions, n))
    return np.sort(np.argpartition(keys, k - 1, axis=1)[:, :k], axis=1)


def curves(run: GradedRun, names: list[str], params: SelectionParams) -> dict:
    """Accuracy vs N' of each method: the mean over random subsets, and each question's first N' candidates.

    Per size and block the subsets are drawn once and every method runs on the same ones; the
    answer classes and grades come from the run, so a subset costs array indexing, not grading.
    """
    rng = np.random.default_rng(CURVE_SEED)
    sizes = curve_sizes(int(run.sizes.max()))
    mean = {name: {} for name in names}
    first = {name: {} for name in names}
    blocks = run.blocks()
    for k in sizes:
        hits_mean = dict.fromkeys(names, 0.0)
        hits_first = dict.fromkeys(names, 0.0)
        for problems, block in blocks:
            questions, n = block.shape
            width = min(k, n)
            prefix = block.take(np.broadcast_to(np.arange(width), (questions, width)))
            subsets = None if width == n else block.take(subset_columns(rng, questions, n, width, CURVE_DRAWS))
            for name in names:
                hits = _hits(prefix, METHODS[name](prefix, params).index, run, problems, 1)
                hits_first[name] += hits
                # All n candidates: every subset is the whole question, so one draw is all of them.
                if subsets is not None:
                    hits = _hits(subsets, METHODS[name](subsets, params).index, run, problems, CURVE_DRAWS)
                hits_mean[name] += hits
        for name in names:
            mean[name][k] = run.share(hits_mean[name])
            first[name][k] = run.share(hits_first[name])
    return {"sizes": sizes, "accuracy_by_n": mean, "accuracy_by_first_n": first}


def _hits(block: Candidates, index: np.ndarray, run: GradedRun, problems: np.ndarray, draws: int) -> float:
    """Correct picks of a (draws-stacked) block, averaged over its draws."""
    correct = block.correct[np.arange(len(index)), index] & np.tile(run.has_gold[problems], draws)
    return float(correct.sum()) / draws


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one question with n candidates, c of them correct: 1 - C(n - c, k) / C(n, k)."""
    k = min(k, n)
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_curves(run: GradedRun) -> tuple[dict, dict]:
    """pass@N' at the curve sizes: the unbiased estimator, and over each question's first N' candidates."""
    sizes = curve_sizes(int(run.sizes.max()))
    correct = run.values["correct"]
    counts = [int(correct[a:b].sum()) if g else 0 for a, b, g in zip(run.offsets[:-1], run.offsets[1:], run.has_gold)]
    graded = [(int(n), c) for n, c, g in zip(run.sizes, counts, run.has_gold) if g]
    unbiased = {k: run.share(sum(pass_at_k(n, c, k) for n, c in graded)) for k in sizes}
    bounds = list(zip(run.offsets[:-1].tolist(), run.offsets[1:].tolist(), run.has_gold.tolist()))
    first = {k: run.share(sum(g and bool(correct[a : min(a + k, b)].any()) for a, b, g in bounds)) for k in sizes}
    return unbiased, first


def compare(run: GradedRun, params: SelectionParams) -> tuple[dict[str, MethodResult], dict, dict]:
    """Every available method on the run: results, the methods left out and why, and the alpha sweep."""
    results, unavailable = {}, {}
    for name in METHODS:
        try:
            results[name] = evaluate(run, name, params)
        except MethodUnavailable as exc:
            unavailable[name] = str(exc)
    sweep = {}
    for name in alpha_methods(params):
        if name in results:
            sweep[name] = {}
            for a in ALPHA_GRID:
                picks = run_method(run, name, replace(params, alpha=a))
                sweep[name][str(a)] = run.share(float(picked_correct(run, picks).sum()))
    return results, unavailable, sweep
