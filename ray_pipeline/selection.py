"""Selection methods: one registry from a method name to a function over one question's candidates.

A method takes the question's candidates (shard rows as dicts, in candidate order) and the
selection parameters, and returns a `Choice`: the index of the chosen candidate, the score it
won with, and every candidate's score under the method (for AUROC and histograms). Missing
scores (NaN, e.g. from an empty response) rank last. Nothing here needs a model: every input is
a column of the shards.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch

from ray_pipeline.answers import answers_equivalent
from ray_pipeline.errors import ConfigError, PipelineError
from ray_pipeline.scores import (
    coe_scores,
    combined_self_certainty,
    lowest_group_confidence,
    mixed_certainty,
    tail_confidence,
)


@dataclass(frozen=True)
class SelectionParams:
    alpha: float = 0.4
    lambda_weight: float = 1.0
    borda_power: float = 0.5
    deepconf_window: int = 2048

    @classmethod
    def from_config(cls, config) -> SelectionParams:
        return cls(config.alpha, config.lambda_weight, config.borda_power, config.deepconf_window)


@dataclass(frozen=True)
class Choice:
    index: int
    score: float
    scores: tuple[float, ...]


class MethodUnavailable(PipelineError):
    """The shards lack what a method needs (e.g. self-eval without --self_eval)."""


Method = Callable[[list[dict], SelectionParams], Choice]
METHODS: dict[str, Method] = {}
# Methods whose choice depends on alpha (the accuracy-vs-alpha plot sweeps these).
ALPHA_METHODS: set[str] = set()


def method(name: str, *, uses_alpha: bool = False) -> Callable[[Method], Method]:
    def register(fn: Method) -> Method:
        METHODS[name] = fn
        if uses_alpha:
            ALPHA_METHODS.add(name)
        return fn

    return register


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"method must be one of {', '.join(sorted(METHODS))}, got {name!r}") from None


def _key(value: float | None) -> float:
    return -math.inf if value is None or math.isnan(value) else value


def best_of(scores: list[float]) -> Choice:
    """The first candidate with the largest score; NaN counts as -inf."""
    keyed = [_key(v) for v in scores]
    index = max(range(len(keyed)), key=lambda i: (keyed[i], -i))
    return Choice(index, scores[index], tuple(scores))


def certainty_levels(candidate: dict, lambda_weight: float) -> tuple[float, list[float]]:
    """Token-level certainty and the certainty of each step (`scores.mixed_certainty`) of one candidate."""
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


@method("baseline")
def baseline(candidates: list[dict], params: SelectionParams) -> Choice:
    """The first sampled candidate: what a single sample would have given."""
    return Choice(0, math.nan, (math.nan,) * len(candidates))


@method("entropy")
def lowest_entropy(candidates: list[dict], params: SelectionParams) -> Choice:
    """The candidate with the lowest mean token entropy (scored as negative entropy)."""
    return best_of([-c["mean_entropy"] for c in candidates])


@method("self-certainty", uses_alpha=True)
def highest_self_certainty(candidates: list[dict], params: SelectionParams) -> Choice:
    """The candidate with the highest combined certainty (token and step level mixed by alpha)."""
    return best_of([self_certainty_score(c, params.alpha, params.lambda_weight) for c in candidates])


@method("self-certainty-token")
def highest_token_self_certainty(candidates: list[dict], params: SelectionParams) -> Choice:
    """Token level only: the combined score at alpha = 1."""
    return best_of([self_certainty_score(c, 1.0, params.lambda_weight) for c in candidates])


@method("self-certainty-step")
def highest_step_self_certainty(candidates: list[dict], params: SelectionParams) -> Choice:
    """Step level only: the combined score at alpha = 0 (the certainty of the weakest step)."""
    return best_of([self_certainty_score(c, 0.0, params.lambda_weight) for c in candidates])


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
    return best_of([coe_candidate_scores(c)[0] for c in candidates])


@method("coe-c")
def highest_coe_c(candidates: list[dict], params: SelectionParams) -> Choice:
    """The candidate with the highest CoE-C (length of the mean complex layer change)."""
    return best_of([coe_candidate_scores(c)[1] for c in candidates])


@method("self-eval")
def highest_self_eval(candidates: list[dict], params: SelectionParams) -> Choice:
    """The candidate whose weakest step the model itself finds most likely correct (min over steps)."""
    if any(c["token_count"] and c["step_self_eval"] is None for c in candidates):
        raise MethodUnavailable("method self-eval needs shards scored with --self_eval")
    return best_of([min(c["step_self_eval"]) if c["token_count"] else math.nan for c in candidates])


@method("lowest-group")
def highest_lowest_group_confidence(candidates: list[dict], params: SelectionParams) -> Choice:
    """DeepConf: the candidate whose least confident window of tokens is most confident."""
    return best_of([_token_confidence(c, lowest_group_confidence, params.deepconf_window) for c in candidates])


@method("tail")
def highest_tail_confidence(candidates: list[dict], params: SelectionParams) -> Choice:
    """DeepConf: the candidate whose last window of tokens is most confident."""
    return best_of([_token_confidence(c, tail_confidence, params.deepconf_window) for c in candidates])


def _token_confidence(candidate: dict, reduce: Callable, window: int) -> float:
    return reduce(torch.as_tensor(candidate["token_confidence"], dtype=torch.float32), window)


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


def weighted_vote(candidates: list[dict], weights: list[float], tie_break: list[float] | None = None) -> Choice:
    """The answer with the largest total weight (ties: the answer seen first), and its best member.

    A candidate's score is its answer's share of the total weight (0 without an answer); within
    the winning answer the candidate with the largest `tie_break` (default: the first) wins.
    Without any answer, the first candidate.
    """
    labels = answer_groups([c["pred"] for c in candidates])
    totals: dict[int, float] = {}
    for label, weight in zip(labels, weights):
        if label is not None:
            totals[label] = totals.get(label, 0.0) + weight
    total = sum(weights) or 1.0
    scores = tuple(0.0 if label is None else totals[label] / total for label in labels)
    if not totals:
        return Choice(0, scores[0], scores)
    winner = max(totals, key=lambda g: (totals[g], -g))
    members = [i for i, label in enumerate(labels) if label == winner]
    order = tie_break or [0.0] * len(candidates)
    index = max(members, key=lambda i: (_key(order[i]), -i))
    return Choice(index, scores[index], scores)


@method("self-consistency")
def majority_vote(candidates: list[dict], params: SelectionParams) -> Choice:
    """Majority over extracted answers (equivalent answers vote together); the first of the majority wins."""
    return weighted_vote(candidates, [1.0] * len(candidates))


@method("borda", uses_alpha=True)
def borda_vote(candidates: list[dict], params: SelectionParams) -> Choice:
    """Votes weighted by self-certainty rank: rank r (0 = most certain) of N votes (N - r)^p."""
    certainty = [self_certainty_score(c, params.alpha, params.lambda_weight) for c in candidates]
    ranking = sorted(range(len(candidates)), key=lambda i: (-_key(certainty[i]), i))
    weights = [0.0] * len(candidates)
    for rank, i in enumerate(ranking):
        weights[i] = (len(candidates) - rank) ** params.borda_power
    return weighted_vote(candidates, weights, tie_break=certainty)


@method("weighted-vote", uses_alpha=True)
def certainty_weighted_vote(candidates: list[dict], params: SelectionParams) -> Choice:
    """Majority weighted by each candidate's combined certainty (the self-certainty method's score)."""
    certainty = [self_certainty_score(c, params.alpha, params.lambda_weight) for c in candidates]
    weights = [max(0.0, _key(v)) for v in certainty]
    return weighted_vote(candidates, weights, tie_break=certainty)
