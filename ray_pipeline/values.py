"""Every per-candidate value a selection method reads, declared once: the shard columns it comes from, the
selection settings it depends on, and the reducer's function that computes it.

`selection.Candidates` holds one [B, n] array per declared value, the reducer (`graded_run.candidate_values`) fills
one flat array of each for a chunk of whole problems, and it reads the columns the values name
(`graded_run.reducer_columns`): all three follow from `VALUES`. A value of a column the shards already store is
one `@value` function here; a method then reads it as `candidates.<name>`.

Each function takes a `Chunk` and returns a [candidates] array in the chunk's row order. What several values
share (the grades, the confidences DeepConf reads, CoE's pair) a `Chunk` computes once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_pipeline.aggregates import coe_scores, mixed_certainty
from ray_pipeline.deepconf import SKIPPED, lowest_group_confidence, tail_confidence


@dataclass(frozen=True)
class Value:
    name: str
    # Shard columns it reads (the reducer reads every one some value names).
    reads: tuple[str, ...]
    # Selection settings it depends on (`selection.BLOCK_PARAMS`: a block of values answers only for them).
    params: tuple[str, ...]
    compute: Callable[[Chunk], np.ndarray]
    doc: str


VALUES: dict[str, Value] = {}


def value(name: str, *, reads: tuple[str, ...] = (), params: tuple[str, ...] = ()) -> Callable:
    """Declare the per-candidate value `name`: the decorated function computes it for a `Chunk`."""

    def register(compute: Callable[[Chunk], np.ndarray]) -> Callable[[Chunk], np.ndarray]:
        if name in VALUES:
            raise ValueError(f"value {name!r} is declared twice")
        VALUES[name] = Value(name, reads, params, compute, (compute.__doc__ or "").strip())
        return compute

    return register


# CoE's four columns, in `aggregates.coe_scores`'s order.
_COE = ("coe_magnitude", "coe_angle", "coe_span_magnitude", "coe_span_angle")


class Chunk:
    """A chunk of whole problems as the values read it: its shard rows, the selection settings and the grades
    (`label`: each candidate's answer class, -1 without an answer; `correct`: its grade)."""

    def __init__(self, table: pa.Table, params, label: np.ndarray, correct: np.ndarray):
        self.table, self.params, self.label, self.correct = table, params, label, correct
        self.rows = table.num_rows
        self._lists: dict[str, list] = {}
        self._floats: dict[str, np.ndarray] = {}

    def floats(self, name: str) -> np.ndarray:
        """A float column as float64 numpy, nulls as NaN (read once; values share it, none writes to it)."""
        if name not in self._floats:
            self._floats[name] = pc.fill_null(self.table.column(name).cast(pa.float64()), math.nan).to_numpy()
        return self._floats[name]

    def pylist(self, name: str) -> list:
        if name not in self._lists:
            self._lists[name] = self.table.column(name).to_pylist()
        return self._lists[name]

    def nans(self) -> np.ndarray:
        return np.full(self.rows, np.nan)

    @cached_property
    def token_count(self) -> np.ndarray:
        return pc.fill_null(self.table.column("token_count"), 0).to_numpy()

    @cached_property
    def answered(self) -> list[int]:
        """Rows with response tokens: the others keep NaN in every score."""
        return np.flatnonzero(self.token_count).tolist()

    @cached_property
    def vocab(self) -> np.ndarray:
        return pc.fill_null(self.table.column("vocab_size"), 0).to_numpy()

    @cached_property
    def engine_rows(self) -> set[int]:
        """Answered rows whose run stored the sampling engine's confidence of every token."""
        engine = self.pylist("engine_confidence")
        return {i for i in self.answered if engine[i] is not None and len(engine[i]) == self.token_count[i]}

    @cached_property
    def confidences(self) -> dict[int, np.ndarray]:
        """Per answered row, the token confidences DeepConf's methods read: the sampling engine's where the run
        stored them (`engine_rows`), else the scorer's teacher-forced ones (bf16, up to 0.43 nat per token away
        from the engine's)."""
        scorer = _per_row_floats(self.table.column("token_confidence"))
        engine = self.pylist("engine_confidence")
        rows = self.engine_rows
        return {i: np.asarray(engine[i], dtype=np.float64) if i in rows else scorer[i] for i in self.answered}

    def of_confidences(self, measure: Callable[[np.ndarray, int], float]) -> np.ndarray:
        """`measure(confidences, deepconf_window)` of each answered row's DeepConf confidences; NaN elsewhere."""
        out = self.nans()
        for i, own in self.confidences.items():
            out[i] = measure(own, self.params.deepconf_window)
        return out

    @cached_property
    def coe(self) -> tuple[np.ndarray, np.ndarray]:
        """CoE-R and CoE-C per row, from one pass over the four CoE columns."""
        columns = [self.pylist(c) for c in _COE]
        r, c = self.nans(), self.nans()
        for i in self.answered:
            if columns[0][i] is not None:
                r[i], c[i] = coe_scores(*(column[i] for column in columns))
        return r, c


def _per_row_floats(column: pa.ChunkedArray) -> list[np.ndarray]:
    """A list<float> column as one float32 array per row (empty for a null), without Python floats."""
    column = column.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy()
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float32)
    return np.split(values, np.cumsum(lengths)[:-1]) if len(lengths) else []


# Plain floats through the scalar functions below: a candidate's value must not depend on its batch.


@value("label", reads=("text", "gold"), params=("answer_extraction",))
def _label(chunk: Chunk) -> np.ndarray:
    """The candidate's answer class among its problem's candidates (-1: no answer)."""
    return chunk.label


@value("correct", reads=("text", "gold"), params=("answer_extraction",))
def _correct(chunk: Chunk) -> np.ndarray:
    """Whether its answer equals the gold one (False without a gold answer)."""
    return chunk.correct


@value("token_count", reads=("token_count",))
def _token_count(chunk: Chunk) -> np.ndarray:
    """Response tokens (0 for an empty response or an error row)."""
    return chunk.token_count.astype(np.int64)


@value("mean_entropy", reads=("mean_entropy",))
def _mean_entropy(chunk: Chunk) -> np.ndarray:
    """Mean token entropy."""
    return chunk.floats("mean_entropy")


@value("mean_self_certainty", reads=("mean_self_certainty",))
def _mean_self_certainty(chunk: Chunk) -> np.ndarray:
    """Mean token self-certainty."""
    return chunk.floats("mean_self_certainty")


@value("token_certainty", reads=("mean_self_certainty", "mean_entropy", "vocab_size"), params=("lambda_weight",))
def _token_certainty(chunk: Chunk) -> np.ndarray:
    """Self-certainty mixed with entropy by lambda (`aggregates.mixed_certainty`); NaN without a vocabulary."""
    sc, h, out = chunk.floats("mean_self_certainty"), chunk.floats("mean_entropy"), chunk.nans()
    for i in chunk.answered:
        v = int(chunk.vocab[i])
        # Rows without a vocabulary (no scorer columns) have no certainty to mix.
        if v > 1:
            out[i] = mixed_certainty(float(sc[i]), float(h[i]), chunk.params.lambda_weight, v)
    return out


@value("step_certainty_min", reads=("step_self_certainty", "step_entropy", "vocab_size"), params=("lambda_weight",))
def _step_certainty_min(chunk: Chunk) -> np.ndarray:
    """The least mixed certainty over the response's reasoning steps (NaN without steps or a vocabulary)."""
    step_sc, step_h, out = chunk.pylist("step_self_certainty"), chunk.pylist("step_entropy"), chunk.nans()
    lam = chunk.params.lambda_weight
    for i in chunk.answered:
        v = int(chunk.vocab[i])
        if v > 1:
            steps = [mixed_certainty(sc, h, lam, v) for sc, h in zip(step_sc[i] or [], step_h[i] or [])]
            out[i] = min(steps) if steps else math.nan
    return out


@value("coe_r", reads=_COE)
def _coe_r(chunk: Chunk) -> np.ndarray:
    """CoE-R: the hidden states' chain of embedding, by magnitude (NaN without the CoE columns)."""
    return chunk.coe[0]


@value("coe_c", reads=_COE)
def _coe_c(chunk: Chunk) -> np.ndarray:
    """CoE-C: the chain of embedding, by magnitude and angle together."""
    return chunk.coe[1]


@value("self_eval_min", reads=("step_self_eval",))
def _self_eval_min(chunk: Chunk) -> np.ndarray:
    """The least P(correct) the model gave a step of the response (--self_eval)."""
    self_eval, out = chunk.pylist("step_self_eval"), chunk.nans()
    for i in chunk.answered:
        if self_eval[i] is not None:
            out[i] = min(self_eval[i])
    return out


@value("self_eval_missing", reads=("step_self_eval",))
def _self_eval_missing(chunk: Chunk) -> np.ndarray:
    """A response the self-eval passes did not score (the run had no --self_eval)."""
    self_eval, out = chunk.pylist("step_self_eval"), np.zeros(chunk.rows, dtype=bool)
    for i in chunk.answered:
        out[i] = self_eval[i] is None
    return out


@value("lowest_group", reads=("token_confidence", "engine_confidence"), params=("deepconf_window",))
def _lowest_group(chunk: Chunk) -> np.ndarray:
    """DeepConf's lowest group confidence: the least mean over a window of token confidences."""
    return chunk.of_confidences(lowest_group_confidence)


@value("tail", reads=("token_confidence", "engine_confidence"), params=("deepconf_window",))
def _tail(chunk: Chunk) -> np.ndarray:
    """DeepConf's tail confidence: the mean over the last window of token confidences."""
    return chunk.of_confidences(tail_confidence)


@value("engine_lowest_group", reads=("engine_confidence",), params=("deepconf_window",))
def _engine_lowest_group(chunk: Chunk) -> np.ndarray:
    """DeepConf online: the lowest group confidence over the generator's own confidences (NaN without them)."""
    window = chunk.params.deepconf_window
    return np.array(
        [math.nan if c is None or not len(c) else lowest_group_confidence(c, window)
         for c in chunk.pylist("engine_confidence")]
    )  # fmt: skip


@value("online", reads=("phase",))
def _online(chunk: Chunk) -> np.ndarray:
    """Whether the candidate is a trace of a DeepConf online run."""
    return np.array([p is not None for p in chunk.pylist("phase")], dtype=bool)


@value("launched", reads=("phase",))
def _launched(chunk: Chunk) -> np.ndarray:
    """Whether the trace was launched (a consensus stop skips the rest)."""
    return np.array([p != SKIPPED for p in chunk.pylist("phase")], dtype=bool)


@value("stop_threshold", reads=("stop_threshold",))
def _stop_threshold(chunk: Chunk) -> np.ndarray:
    """DeepConf online: the problem's stop threshold s."""
    return chunk.floats("stop_threshold")
