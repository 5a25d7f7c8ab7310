"""Selection methods: one registry from a method name to a function over one question's candidates.

A method takes the question's candidates (shard rows as dicts, in candidate order) and the
selection parameters, and returns a `Choice`: the index of the chosen candidate and the score it
won with. Missing scores (NaN, from an empty response) rank last.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ray_pipeline.errors import ConfigError
from ray_pipeline.scores import combined_self_certainty


@dataclass(frozen=True)
class SelectionParams:
    alpha: float = 0.4


@dataclass(frozen=True)
class Choice:
    index: int
    score: float


Method = Callable[[list[dict], SelectionParams], Choice]
METHODS: dict[str, Method] = {}


def method(name: str) -> Callable[[Method], Method]:
    def register(fn: Method) -> Method:
        METHODS[name] = fn
        return fn

    return register


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"method must be one of {', '.join(sorted(METHODS))}, got {name!r}") from None


def best_of(scores: list[float]) -> Choice:
    """The first candidate with the largest score; NaN counts as -inf."""
    keyed = [(-math.inf if v is None or math.isnan(v) else v) for v in scores]
    index = max(range(len(keyed)), key=lambda i: (keyed[i], -i))
    return Choice(index, scores[index])


def self_certainty_score(candidate: dict, alpha: float) -> float:
    """The combined token/step self-certainty of one candidate at this alpha."""
    if candidate["token_count"] == 0:
        return math.nan
    return combined_self_certainty(
        candidate["mean_self_certainty"], candidate["step_min_self_certainty"], alpha, candidate["vocab_size"]
    )


@method("baseline")
def baseline(candidates: list[dict], params: SelectionParams) -> Choice:
    """The first sampled candidate: what a single sample would have given."""
    return Choice(0, math.nan)


@method("entropy")
def lowest_entropy(candidates: list[dict], params: SelectionParams) -> Choice:
    """The candidate with the lowest mean token entropy (scored as negative entropy)."""
    return best_of([-c["mean_entropy"] for c in candidates])


@method("self-certainty")
def highest_self_certainty(candidates: list[dict], params: SelectionParams) -> Choice:
    """The candidate with the highest combined self-certainty (token and step level mixed by alpha)."""
    return best_of([self_certainty_score(c, params.alpha) for c in candidates])
