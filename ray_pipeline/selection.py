"""Selection methods: one registry from a method name to a function over many questions' candidates at once.

A method takes a `Candidates` block (B questions x n candidates: every per-candidate value a method
reads, as [B, n] numpy arrays, answers already graded and grouped into classes) and the selection
parameters, and returns `Picks`: per question the index of the chosen candidate, the score it won
with, and every candidate's score under the method (for AUROC and histograms). Votes are counts
over answer-class ids (`numpy.bincount`), so the same block serves every method, every random
subset of the accuracy curves (`Candidates.take`) and every alpha of the sweep, and nothing is
re-graded. Missing scores (NaN, e.g. from an empty response) rank last, and by default
(`answerless_last`) so does a candidate without an extracted answer, as in the Self-Certainty
code: on MATH it cannot be right. Nothing here needs a model: every input is a column of the shards.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ray_pipeline.aggregates import combined_self_certainty, mixed_certainty
from ray_pipeline.config import RunConfig, config_fields
from ray_pipeline.errors import ConfigError, PipelineError
from ray_pipeline.values import VALUES

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

# The parameters a `Candidates` block is built for: they shape its per-candidate values (each value declares
# those it reads), so a block answers only for them. The others (alpha, answerless_last, borda_*) are read by the
# methods and may vary freely.
BLOCK_PARAMS = tuple(dict.fromkeys(p for value in VALUES.values() for p in value.params))


@dataclass(frozen=True)
class Choice:
    """One question's pick: the chosen candidate, the score it won with, every candidate's score."""

    index: int
    score: float
    scores: tuple[float, ...]


@dataclass
class Picks:
    """A method's picks on a block: `index [B]`, `score [B]` (the winner's), `scores [B, n]` (every candidate's)."""

    index: np.ndarray
    score: np.ndarray
    scores: np.ndarray

    def choice(self, row: int) -> Choice:
        return Choice(int(self.index[row]), float(self.score[row]), tuple(float(s) for s in self.scores[row]))


class Candidates:
    """B questions x n candidates: every value a method reads, as a [B, n] array, one attribute per declared value
    (`values.VALUES`, e.g. `label`: the answer class, -1 without an answer; `correct`: the grade, False without a
    gold answer; float values NaN where a candidate has none)."""

    def __init__(self, **arrays: np.ndarray):
        if arrays.keys() != VALUES.keys():
            raise TypeError(f"Candidates takes the declared values {list(VALUES)}, got {list(arrays)}")
        self.__dict__.update(arrays)

    @property
    def shape(self) -> tuple[int, int]:
        return self.label.shape

    @property
    def answered(self) -> np.ndarray:
        return self.label >= 0

    def take(self, columns: np.ndarray) -> Candidates:
        """The block of the candidates `columns [B', k]` names per question (B' a multiple of B: draws stacked)."""
        rows = np.arange(columns.shape[0])[:, None] % self.shape[0]
        return Candidates(**{name: getattr(self, name)[rows, columns] for name in VALUES})

    def combined(self, alpha: float) -> np.ndarray:
        """The combined token/step certainty at this alpha (NaN for empty responses)."""
        return combined_self_certainty(self.token_certainty, self.step_certainty_min, alpha)


class MethodUnavailable(PipelineError):
    """The shards lack what a method needs (e.g. self-eval without --self_eval)."""


Method = Callable[[Candidates, SelectionParams], Picks]
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


def _keyed(scores: np.ndarray) -> np.ndarray:
    """Scores as the methods order them: NaN (no score) as -inf."""
    return np.where(np.isnan(scores), -np.inf, scores)


def _first_best(keys: np.ndarray, among: np.ndarray) -> np.ndarray:
    """Per row, the first column of `among` with the largest key there (rows with none in `among`: column 0)."""
    best = np.where(among, keys, -np.inf).max(axis=1, initial=-np.inf)
    return np.argmax(among & (keys == best[:, None]), axis=1)


def _picked(scores: np.ndarray, index: np.ndarray) -> Picks:
    return Picks(index, scores[np.arange(len(index)), index], scores)


def best_scored(block: Candidates, scores: np.ndarray, params: SelectionParams) -> Picks:
    """The first candidate with the highest score (NaN as -inf); with `answerless_last`, one with an answer if any."""
    keys = _keyed(scores)
    among = np.ones(scores.shape, dtype=bool)
    if params.answerless_last:
        answered = block.answered
        among = np.where(answered.any(axis=1)[:, None], answered, among)
    return _picked(scores, _first_best(keys, among))


@method("baseline", scored=False)
def baseline(block: Candidates, params: SelectionParams) -> Picks:
    """The first sampled candidate: what a single sample would have given."""
    return _picked(np.full(block.shape, np.nan), np.zeros(block.shape[0], dtype=np.intp))


@method("entropy")
def lowest_entropy(block: Candidates, params: SelectionParams) -> Picks:
    """The candidate with the lowest mean token entropy (scored as negative entropy)."""
    return best_scored(block, -block.mean_entropy, params)


@method("self-certainty", uses_alpha=True)
def highest_self_certainty(block: Candidates, params: SelectionParams) -> Picks:
    """The candidate with the highest combined certainty (token and step level mixed by alpha)."""
    return best_scored(block, block.combined(params.alpha), params)


@method("self-certainty-token")
def highest_token_self_certainty(block: Candidates, params: SelectionParams) -> Picks:
    """Token level only: the combined score at alpha = 1."""
    return best_scored(block, block.combined(1.0), params)


@method("self-certainty-step")
def highest_step_self_certainty(block: Candidates, params: SelectionParams) -> Picks:
    """Step level only: the combined score at alpha = 0 (the certainty of the weakest step)."""
    return best_scored(block, block.combined(0.0), params)


@method("coe-r")
def highest_coe_r(block: Candidates, params: SelectionParams) -> Picks:
    """The candidate with the highest CoE-R (mean magnitude change minus mean angle change)."""
    return best_scored(block, block.coe_r, params)


@method("coe-c")
def highest_coe_c(block: Candidates, params: SelectionParams) -> Picks:
    """The candidate with the highest CoE-C (length of the mean complex layer change)."""
    return best_scored(block, block.coe_c, params)


@method("self-eval")
def highest_self_eval(block: Candidates, params: SelectionParams) -> Picks:
    """The candidate whose weakest step the model itself finds most likely correct (min over steps)."""
    if block.self_eval_missing.any():
        raise MethodUnavailable("method self-eval needs shards scored with jobs.infer or jobs.main --self_eval")
    return best_scored(block, block.self_eval_min, params)


@method("lowest-group")
def highest_lowest_group_confidence(block: Candidates, params: SelectionParams) -> Picks:
    """DeepConf: the candidate whose least confident window of tokens is most confident."""
    return best_scored(block, block.lowest_group, params)


@method("tail")
def highest_tail_confidence(block: Candidates, params: SelectionParams) -> Picks:
    """DeepConf: the candidate whose last window of tokens is most confident."""
    return best_scored(block, block.tail, params)


def weighted_vote(
    labels: np.ndarray,
    weights: np.ndarray,
    tie_break: np.ndarray | None = None,
    voters: np.ndarray | None = None,
) -> Picks:
    """Per row, the answer class with the largest total weight of its voters, and its best voting member.

    Every candidate votes unless `voters` says which do. Ties go to the class whose first voter comes
    first. A candidate's score is its class's share of the voters' total weight (0 without an
    answer); within the winning class the voter with the largest `tie_break` (default: the first)
    wins. A row without any answer among its voters picks its first candidate.
    """
    rows, n = labels.shape
    voters = np.ones(labels.shape, dtype=bool) if voters is None else voters
    counted = voters & (labels >= 0)
    # At least one class slot, so a block without any answer still indexes.
    classes = int(labels.max(initial=0)) + 1
    slots = (labels + np.arange(rows)[:, None] * classes)[counted]
    # bincount adds each row's weights in candidate order, as a running sum would.
    totals = np.bincount(slots, weights=weights[counted], minlength=rows * classes).reshape(rows, classes)
    # A running sum in candidate order (cumsum), as a plain Python sum would add them.
    total = np.cumsum(np.where(voters, weights, 0.0), axis=1)[:, -1] if n else np.zeros(rows)
    total = np.where(total == 0, 1.0, total)
    own = np.where(labels >= 0, totals[np.arange(rows)[:, None], np.maximum(labels, 0)], 0.0)
    scores = own / total[:, None]
    best_total = np.where(counted, own, -np.inf).max(axis=1, initial=-np.inf)
    first_winner = np.argmax(counted & (own == best_total[:, None]), axis=1)
    winner = labels[np.arange(rows), first_winner]
    members = voters & (labels == winner[:, None])
    order = np.zeros(labels.shape) if tie_break is None else _keyed(tie_break)
    index = np.where(counted.any(axis=1), _first_best(order, members), 0)
    return _picked(scores, index)


@method("self-consistency", scored=False)
def majority_vote(block: Candidates, params: SelectionParams) -> Picks:
    """Majority over extracted answers (equivalent answers vote together); the first of the majority wins."""
    return weighted_vote(block.label, np.ones(block.shape))


def borda_ranking_score(block: Candidates, params: SelectionParams) -> np.ndarray:
    """What borda ranks by: mean token self-certainty (the paper's), or the combined score."""
    if params.borda_score == "combined":
        return block.combined(params.alpha)
    return np.where(block.token_count > 0, block.mean_self_certainty, np.nan)


def _power_table(n: int, power: float) -> np.ndarray:
    """`k ** power` for k = 0 … n, by Python's float power (the votes of every rank, computed once)."""
    return np.array([float(k) ** power for k in range(n + 1)])


@method("borda", uses_alpha=lambda params: params.borda_score == "combined", scored=False)
def borda_vote(block: Candidates, params: SelectionParams) -> Picks:
    """Votes weighted by certainty rank: rank r (0 = most certain) of N votes (N - r)^p.

    As in the Self-Certainty code, every candidate holds a rank, one without an answer too
    (its votes go to no answer).
    """
    certainty = borda_ranking_score(block, params)
    rows, n = block.shape
    # A stable sort of -certainty: the most certain first, ties in candidate order.
    ranking = np.argsort(-_keyed(certainty), axis=1, kind="stable")
    rank = np.empty_like(ranking)
    np.put_along_axis(rank, ranking, np.broadcast_to(np.arange(n), ranking.shape), axis=1)
    weights = _power_table(n, params.borda_power)[n - rank]
    return weighted_vote(block.label, weights, tie_break=certainty)


@method("weighted-vote", uses_alpha=True, scored=False)
def certainty_weighted_vote(block: Candidates, params: SelectionParams) -> Picks:
    """Majority weighted by each candidate's combined certainty (the self-certainty method's score)."""
    certainty = block.combined(params.alpha)
    return weighted_vote(block.label, np.maximum(0.0, _keyed(certainty)), tie_break=certainty)


def step_certainties(candidate: dict, lambda_weight: float) -> list[float]:
    """The certainty of each step of one candidate (`aggregates.mixed_certainty` of its mean SC and H)."""
    vocab = candidate["vocab_size"]
    return [
        mixed_certainty(sc, h, lambda_weight, vocab)
        for sc, h in zip(candidate["step_self_certainty"], candidate["step_entropy"])
    ]


def self_certainty_score(candidate: dict, alpha: float, lambda_weight: float = 1.0) -> float:
    """The combined token/step certainty of one candidate (a shard row) at this alpha and lambda."""
    if candidate["token_count"] == 0:
        return math.nan
    token = mixed_certainty(
        candidate["mean_self_certainty"], candidate["mean_entropy"], lambda_weight, candidate["vocab_size"]
    )
    return combined_self_certainty(token, min(step_certainties(candidate, lambda_weight)), alpha)


def key_step(candidate: dict, lambda_weight: float = 1.0) -> dict | None:
    """The candidate's least certain step (the original's "key step"): index, text and certainty."""
    if candidate["token_count"] == 0:
        return None
    steps = step_certainties(candidate, lambda_weight)
    index = min(range(len(steps)), key=steps.__getitem__)
    texts = candidate.get("step_texts") or []
    return {"index": index, "text": texts[index] if index < len(texts) else None, "score": steps[index]}


# DeepConf's methods live with DeepConf (ray_pipeline/deepconf/methods.py). Imported here, after every name they use
# is defined, so that they register whenever the registry is imported, and last, as every table lists them.
import ray_pipeline.deepconf.methods  # noqa: E402, F401
