"""Selection methods: one registry from a method name to a function over one question's candidates.

A method takes the question's candidates (shard rows as dicts, in candidate order) and the
selection parameters, and returns a `Choice`: the index of the chosen candidate, the score it
won with, and every candidate's score under the method (for AUROC and histograms). Missing
scores (NaN, e.g. from an empty response) rank last, and by default (`answerless_last`) so does a
candidate without an extracted answer, as in the Self-Certainty code: on MATH it cannot be right.
Nothing here needs a model: every input is a column of the shards.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ray_pipeline.aggregates import (
    coe_scores,
    combined_self_certainty,
    lowest_group_confidence,
    mixed_certainty,
    tail_confidence,
)
from ray_pipeline.answers import answers_equivalent
from ray_pipeline.config import RunConfig, config_fields
from ray_pipeline.errors import ConfigError, PipelineError

# A selection parameter is declared once, as a RunConfig field of role "selection" (its default, flag, help and
# range); every such field but `method`, which names the method they parameterize, is a SelectionParams field.
PARAM_FIELDS = [f for f in config_fields("selection") if f.name != "method"]


def _from_config(cls, config: RunConfig) -> SelectionParams:
    return cls(**{f.name: getattr(config, f.name) for f in PARAM_FIELDS})


SelectionParams = dataclasses.make_dataclass(
    "SelectionParams",
    [(f.name, f.type, dataclasses.field(default=f.default, default_factory=f.default_factory)) for f in PARAM_FIELDS],
    frozen=True,
    namespace={
        "__doc__": "What the methods read besides the candidates: RunConfig's selection parameters (see PARAM_FIELDS).",
        "__module__": __name__,
        "from_config": classmethod(_from_config),
    },
)


@dataclass(frozen=True)
class Choice:
    index: int
    score: float
    scores: tuple[float, ...]


class MethodUnavailable(PipelineError):
    """The shards lack what a method needs (e.g. self-eval without --self_eval)."""


Method = Callable[[list[dict], SelectionParams], Choice]
METHODS: dict[str, Method] = {}
# Methods whose choice can depend on alpha, each with the rule saying when it does.
ALPHA_METHODS: dict[str, Callable[[SelectionParams], bool]] = {}
# Methods that rank candidates by a score, so `answerless_last` can change their pick.
SCORE_METHODS: set[str] = set()


def method(
    name: str, *, uses_alpha: bool | Callable[[SelectionParams], bool] = False, scored: bool = True
) -> Callable[[Method], Method]:
    def register(fn: Method) -> Method:
        METHODS[name] = fn
        if uses_alpha:
            ALPHA_METHODS[name] = uses_alpha if callable(uses_alpha) else lambda params: True
        if scored:
            SCORE_METHODS.add(name)
        return fn

    return register


def alpha_methods(params: SelectionParams) -> list[str]:
    """The methods whose choice depends on alpha under these parameters (the alpha sweep's rows)."""
    return [name for name, depends in ALPHA_METHODS.items() if depends(params)]


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"method must be one of {', '.join(sorted(METHODS))}, got {name!r}") from None


def _key(value: float | None) -> float:
    return -math.inf if value is None or math.isnan(value) else value


def best_of(scores: list[float], answered: list[bool] | None = None) -> Choice:
    """The first candidate with the largest score; NaN counts as -inf.

    With `answered`, a candidate with an answer beats every candidate without one.
    """
    keyed = [_key(v) for v in scores]
    tier = answered or [True] * len(scores)
    index = max(range(len(keyed)), key=lambda i: (tier[i], keyed[i], -i))
    return Choice(index, scores[index], tuple(scores))


def answered(candidates: list[dict], params: SelectionParams) -> list[bool] | None:
    """Which candidates have an extracted answer, when `answerless_last` ranks the others last."""
    return [c["pred"] is not None for c in candidates] if params.answerless_last else None


def best_scored(candidates: list[dict], scores: list[float], params: SelectionParams) -> Choice:
    """The candidate with the highest score, answerless ones last when `params.answerless_last`."""
    return best_of(scores, answered(candidates, params))


def certainty_levels(candidate: dict, lambda_weight: float) -> tuple[float, list[float]]:
    """Token-level certainty and the certainty of each step (`aggregates.mixed_certainty`) of one candidate."""
    vocab = candidate["vocab_size"]
    token = mixed_certainty(candidate["mean_self_certainty"], candidate["mean_entropy"], lambda_weight, vocab)
    # Plain floats: a few dozen steps, and the reducer calls this for every candidate, N' and alpha.
    steps = [
        mixed_certainty(sc, h, lambda_weight, vocab)
        for sc, h in zip(candidate["step_self_certainty"], candidate["step_entropy"])
    ]
    return token, steps


def self_certainty_score(candidate: dict, alpha: float, lambda_weight: float = 1.0) -> float:
    """The combined token/step certainty of one candidate at this alpha and lambda."""
    if candidate["token_count"] == 0:
        return math.nan
    token, steps = certainty_levels(candidate, lambda_weight)
    return combined_self_certainty(token, min(steps), alpha)


def key_step(candidate: dict, lambda_weight: float = 1.0) -> dict | None:
    """The candidate's least certain step (the original's "key step"): index, text and certainty."""
    if candidate["token_count"] == 0:
        return None
    _, steps = certainty_levels(candidate, lambda_weight)
    index = min(range(len(steps)), key=steps.__getitem__)
    texts = candidate.get("step_texts") or []
    return {"index": index, "text": texts[index] if index < len(texts) else None, "score": steps[index]}


@method("baseline", scored=False)
def baseline(candidates: list[dict], params: SelectionParams) -> Choice:
    """The first sampled candidate: what a single sample would have given."""
    return Choice(0, math.nan, (math.nan,) * len(candidates))


@method("entropy")
def lowest_entropy(candidates: list[dict], params: SelectionParams) -> Choice:
    """The candidate with the lowest mean token entropy (scored as negative entropy)."""
    return best_scored(candidates, [-c["mean_entropy"] for c in candidates], params)


@method("self-certainty", uses_alpha=True)
def highest_self_certainty(candidates: list[dict], params: SelectionParams) -> Choice:
    """The candidate with the highest combined certainty (token and step level mixed by alpha)."""
    scores = [self_certainty_score(c, params.alpha, params.lambda_weight) for c in candidates]
    return best_scored(candidates, scores, params)


@method("self-certainty-token")
def highest_token_self_certainty(candidates: list[dict], params: SelectionParams) -> Choice:
    """Token level only: the combined score at alpha = 1."""
    return best_scored(candidates, [self_certainty_score(c, 1.0, params.lambda_weight) for c in candidates], params)


@method("self-certainty-step")
def highest_step_self_certainty(candidates: list[dict], params: SelectionParams) -> Choice:
    """Step level only: the combined score at alpha = 0 (the certainty of the weakest step)."""
    return best_scored(candidates, [self_certainty_score(c, 0.0, params.lambda_weight) for c in candidates], params)


def coe_candidate_scores(candidate: dict) -> tuple[float, float]:
    """CoE-R and CoE-C of one candidate from its stored layer transitions (NaN when it has none)."""
    if not candidate["token_count"] or candidate["coe_magnitude"] is None:
        return math.nan, math.nan
    return coe_scores(
        candidate["coe_magnitude"],
        candidate["coe_angle"],
        candidate["coe_span_magnitude"],
        candidate["coe_span_angle"],
    )


@method("coe-r")
def highest_coe_r(candidates: list[dict], params: SelectionParams) -> Choice:
    """The candidate with the highest CoE-R (mean magnitude change minus mean angle change)."""
    return best_scored(candidates, [coe_candidate_scores(c)[0] for c in candidates], params)


@method("coe-c")
def highest_coe_c(candidates: list[dict], params: SelectionParams) -> Choice:
    """The candidate with the highest CoE-C (length of the mean complex layer change)."""
    return best_scored(candidates, [coe_candidate_scores(c)[1] for c in candidates], params)


@method("self-eval")
def highest_self_eval(candidates: list[dict], params: SelectionParams) -> Choice:
    """The candidate whose weakest step the model itself finds most likely correct (min over steps)."""
    if any(c["token_count"] and c["step_self_eval"] is None for c in candidates):
        raise MethodUnavailable("method self-eval needs shards scored with jobs.infer or jobs.main --self_eval")
    scores = [min(c["step_self_eval"]) if c["token_count"] else math.nan for c in candidates]
    return best_scored(candidates, scores, params)


@method("lowest-group")
def highest_lowest_group_confidence(candidates: list[dict], params: SelectionParams) -> Choice:
    """DeepConf: the candidate whose least confident window of tokens is most confident."""
    scores = [_token_confidence(c, lowest_group_confidence, params.deepconf_window) for c in candidates]
    return best_scored(candidates, scores, params)


@method("tail")
def highest_tail_confidence(candidates: list[dict], params: SelectionParams) -> Choice:
    """DeepConf: the candidate whose last window of tokens is most confident."""
    scores = [_token_confidence(c, tail_confidence, params.deepconf_window) for c in candidates]
    return best_scored(candidates, scores, params)


def _token_confidence(candidate: dict, reduce: Callable, window: int) -> float:
    return reduce(np.asarray(candidate["token_confidence"], dtype=np.float32), window)


@lru_cache(maxsize=1 << 16)
def _equivalent(a: str, b: str) -> bool:
    return answers_equivalent(a, b)


def answer_groups(preds: list[str | None]) -> list[int | None]:
    """Group label of each answer: answers math-verify finds equivalent share a label, None has none.

    Each answer joins the first earlier group whose first answer is equivalent, so the labels of
    the first N' answers do not depend on the answers after them.
    """
    firsts: list[str] = []
    labels: list[int | None] = []
    for pred in preds:
        if pred is None:
            labels.append(None)
            continue
        label = next((g for g, first in enumerate(firsts) if _equivalent(first, pred)), None)
        if label is None:
            firsts.append(pred)
            label = len(firsts) - 1
        labels.append(label)
    return labels


def weighted_vote(
    candidates: list[dict],
    weights: list[float],
    tie_break: list[float] | None = None,
    voters: list[bool] | None = None,
) -> Choice:
    """The answer with the largest total weight of its voters, and its best voting member.

    Every candidate votes unless `voters` says which do. Ties go to the answer whose first voter
    comes first. A candidate's score is its answer's share of the voters' total weight (0 without
    an answer); within the winning answer the voter with the largest `tie_break` (default: the
    first) wins. Without any answer among the voters, the first candidate.
    """
    labels = answer_groups([c["pred"] for c in candidates])
    voters = voters or [True] * len(candidates)
    totals: dict[int, float] = {}
    first_voter: dict[int, int] = {}
    for i, (label, weight) in enumerate(zip(labels, weights)):
        if label is not None and voters[i]:
            totals[label] = totals.get(label, 0.0) + weight
            first_voter.setdefault(label, i)
    total = sum(w for w, votes in zip(weights, voters) if votes) or 1.0
    scores = tuple(totals.get(label, 0.0) / total if label is not None else 0.0 for label in labels)
    if not totals:
        return Choice(0, scores[0], scores)
    winner = max(totals, key=lambda g: (totals[g], -first_voter[g]))
    members = [i for i, label in enumerate(labels) if label == winner and voters[i]]
    order = tie_break or [0.0] * len(candidates)
    index = max(members, key=lambda i: (_key(order[i]), -i))
    return Choice(index, scores[index], scores)


@method("self-consistency", scored=False)
def majority_vote(candidates: list[dict], params: SelectionParams) -> Choice:
    """Majority over extracted answers (equivalent answers vote together); the first of the majority wins."""
    return weighted_vote(candidates, [1.0] * len(candidates))


def borda_ranking_score(candidate: dict, params: SelectionParams) -> float:
    """What borda ranks by: mean token self-certainty (the paper's), or the combined score."""
    if params.borda_score == "combined":
        return self_certainty_score(candidate, params.alpha, params.lambda_weight)
    return candidate["mean_self_certainty"] if candidate["token_count"] else math.nan


@method("borda", uses_alpha=lambda params: params.borda_score == "combined", scored=False)
def borda_vote(candidates: list[dict], params: SelectionParams) -> Choice:
    """Votes weighted by certainty rank: rank r (0 = most certain) of N votes (N - r)^p.

    As in the Self-Certainty code, every candidate holds a rank, one without an answer too
    (its votes go to no answer).
    """
    certainty = [borda_ranking_score(c, params) for c in candidates]
    ranking = sorted(range(len(candidates)), key=lambda i: (-_key(certainty[i]), i))
    weights = [0.0] * len(candidates)
    for rank, i in enumerate(ranking):
        weights[i] = (len(candidates) - rank) ** params.borda_power
    return weighted_vote(candidates, weights, tie_break=certainty)


@method("weighted-vote", uses_alpha=True, scored=False)
def certainty_weighted_vote(candidates: list[dict], params: SelectionParams) -> Choice:
    """Majority weighted by each candidate's combined certainty (the self-certainty method's score)."""
    certainty = [self_certainty_score(c, params.alpha, params.lambda_weight) for c in candidates]
    weights = [max(0.0, _key(v)) for v in certainty]
    return weighted_vote(candidates, weights, tie_break=certainty)


# DeepConf's offline filtering: the percentages of most confident traces kept (the paper's eta).
DEEPCONF_KEEP_PERCENTS = (10, 90)


def deepconf_kept(confidences: list[float], eligible: list[bool], keep_percent: float) -> list[bool]:
    """DeepConf's filter: the eligible candidates whose confidence is at least the (100 - eta)th percentile.

    The percentile is numpy's (linear interpolation) over the eligible candidates' confidences,
    as in DeepConf's `filter_top_confidence`; so of N distinct confidences
    N - ceil((1 - eta/100)(N - 1)) are kept (at least one), and ties at the threshold are all kept.
    """
    pool = [c for c, ok in zip(confidences, eligible) if ok]
    if not pool:
        return [False] * len(confidences)
    threshold = np.percentile(pool, 100 - keep_percent)
    return [ok and c >= threshold for c, ok in zip(confidences, eligible)]


def deepconf_filtered_vote(
    candidates: list[dict], confidences: list[float], keep_percent: float, params: SelectionParams
) -> Choice:
    """Keep the most confident `keep_percent` % of candidates, then a confidence-weighted vote among them.

    Candidates without a confidence (empty responses) never take part; with `answerless_last`,
    neither do candidates without an answer (DeepConf votes over traces with an answer only).
    """
    eligible = [not math.isnan(v) for v in confidences]
    if params.answerless_last:
        eligible = [ok and c["pred"] is not None for ok, c in zip(eligible, candidates)]
    kept = deepconf_kept(confidences, eligible, keep_percent)
    return weighted_vote(candidates, [v if k else 0.0 for v, k in zip(confidences, kept)], confidences, kept)


def _register_deepconf_filtered(kind: str, reduce: Callable, keep_percent: int) -> None:
    @method(f"deepconf-{kind}-{keep_percent}")
    def filtered(candidates: list[dict], params: SelectionParams) -> Choice:
        confidences = [_token_confidence(c, reduce, params.deepconf_window) for c in candidates]
        return deepconf_filtered_vote(candidates, confidences, keep_percent, params)

    filtered.__doc__ = (
        f"DeepConf offline: the {keep_percent} % most {kind} confident candidates vote, weighted by that confidence."
    )


for _kind, _reduce in (("lowest-group", lowest_group_confidence), ("tail", tail_confidence)):
    for _keep in DEEPCONF_KEEP_PERCENTS:
        _register_deepconf_filtered(_kind, _reduce, _keep)
