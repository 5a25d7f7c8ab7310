"""The shard's columns: name, Arrow type, the stage that writes it, and what it holds.

The shard schema (`shards.SHARD_SCHEMA`), the row of a candidate that has no response, and the
reducer's column list all come from here. The scorer stores only what the model measures;
what depends on selection settings (the combined self-certainty score, the key step) or on
answer extraction (`pred`, `correct`) is the reducer's, so a re-reduce needs no model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa

GENERATOR = "generator"
SCORER = "scorer"

_floats = pa.list_(pa.float32())
_doubles = pa.list_(pa.float64())
_ints = pa.list_(pa.int32())


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    stage: str
    doc: str
    # Whether the reducer reads it for its records, votes and tables (the per-token lists, but for DeepConf's
    # confidence, are already aggregated); it also reads every column a per-candidate value reads (values.py).
    selection: bool = True
    # Its value for a candidate with no response tokens (an empty response or an error row).
    empty: object = None
    # Added after shards of this format existed: a shard without it is read with nulls (shards.schema_fault).
    later: bool = False


COLUMNS = (
    Column("candidate_index", pa.int32(), GENERATOR, "the candidate's index among its problem's N"),
    Column("prompt_token_ids", _ints, GENERATOR, "the prompt's token ids", selection=False),
    Column("token_ids", _ints, GENERATOR, "the response's token ids", selection=False),
    Column("text", pa.string(), GENERATOR, "the response text"),
    Column(
        "finish_reason",
        pa.string(),
        GENERATOR,
        "stop, length, low-confidence (deepconf-online stopped it) or skipped (a consensus stop never launched it)",
        selection=False,
    ),
    Column(
        "generator_logprobs",
        _floats,
        GENERATOR,
        "the sampler's log-probability of each token (--generator_logprobs; else empty)",
        selection=False,
    ),
    Column("backend", pa.string(), GENERATOR, "vllm or hf", selection=False),
    Column("error", pa.string(), GENERATOR, "why the candidate has no text (e.g. a prompt too long); else null"),
    Column(
        "engine_confidence",
        _doubles,
        GENERATOR,
        "DeepConf's confidence of each token as the generator saw it: -mean of its top-k log-probs, a multiple of "
        "2^-16 nat (--engine_confidence, deepconf-online; else empty)",
        # Null unless asked for: the reducer reads it for the online vote and the tokens-vs-accuracy table.
        later=True,
    ),
    Column("phase", pa.string(), GENERATOR, "deepconf-online: warmup, final or skipped; null otherwise", later=True),
    Column(
        "stopped_at",
        pa.int32(),
        GENERATOR,
        "deepconf-online: tokens kept when the trace was stopped for low confidence; null when it was not",
        later=True,
    ),
    Column("stop_threshold", pa.float64(), GENERATOR, "deepconf-online: the problem's threshold s", later=True),
    Column(
        "engine_token_count",
        pa.int32(),
        GENERATOR,
        "tokens the engine generated for the trace: its tokens, plus any after an early stop that were dropped "
        "(vLLM aborts a request a step or more after the stopping token)",
        later=True,
    ),
    Column("token_count", pa.int32(), SCORER, "response tokens", empty=0),
    Column("token_entropy", _floats, SCORER, "H_t per response token", selection=False, empty=[]),
    Column("token_self_certainty", _floats, SCORER, "KL(U || p) per response token", selection=False, empty=[]),
    Column("token_logprob", _floats, SCORER, "log p of each response token", selection=False, empty=[]),
    Column("token_confidence", _floats, SCORER, "DeepConf: -mean top-k log p per token", empty=[]),
    Column("step_self_certainty", _floats, SCORER, "mean self-certainty of each reasoning step", empty=[]),
    Column("step_entropy", _floats, SCORER, "mean entropy of each reasoning step", empty=[]),
    Column("step_texts", pa.list_(pa.string()), SCORER, "the text of each reasoning step", empty=[]),
    Column("step_self_eval", _doubles, SCORER, "P(correct) per step from --self_eval passes; null without it"),
    Column("coe_magnitude", _doubles, SCORER, "CoE: |h_{l+1} - h_l| of the response-mean hidden states"),
    Column("coe_angle", _doubles, SCORER, "CoE: angle(h_{l+1}, h_l) per layer transition"),
    Column("coe_span_magnitude", pa.float64(), SCORER, "CoE: |h_L - h_0|, normalizes magnitudes", empty=math.nan),
    Column("coe_span_angle", pa.float64(), SCORER, "CoE: angle(h_L, h_0), normalizes angles", empty=math.nan),
    Column("mean_entropy", pa.float64(), SCORER, "mean token entropy", empty=math.nan),
    Column("mean_self_certainty", pa.float64(), SCORER, "mean token self-certainty", empty=math.nan),
    Column("mean_logprob", pa.float64(), SCORER, "mean token log-probability", selection=False, empty=math.nan),
    Column("step_min_self_certainty", pa.float64(), SCORER, "least step self-certainty", empty=math.nan),
    Column("step_mean_self_certainty", pa.float64(), SCORER, "mean step self-certainty", empty=math.nan),
    Column("vocab_size", pa.int32(), SCORER, "the model's vocabulary size V"),
)

CANDIDATE_FIELDS = [(c.name, c.type) for c in COLUMNS if c.stage == GENERATOR]
LATER_COLUMNS = frozenset(c.name for c in COLUMNS if c.later)
SCORE_FIELDS = [(c.name, c.type) for c in COLUMNS if c.stage == SCORER]


def empty_scores(vocab_size: int) -> dict:
    """The scorer's columns for a candidate without response tokens: NaN scores rank it last in every method."""
    values = {c.name: (list(c.empty) if isinstance(c.empty, list) else c.empty) for c in COLUMNS if c.stage == SCORER}
    return values | {"vocab_size": vocab_size}


def selection_columns(problem_columns: list[str], value_reads: list[str]) -> list[str]:
    """What the reducer reads from the shards: the problem's columns, each selection column and each column a
    per-candidate value reads (`values.VALUES`), in the shard's order."""
    return [*problem_columns, *(c.name for c in COLUMNS if c.selection or c.name in value_reads)]


def candidate_rows(batch: pa.Table) -> list[dict]:
    """One dict per candidate: problem rows (with the generators' `candidates` lists) spread out; others kept."""
    if "candidates" not in batch.column_names:
        return batch.to_pylist()
    rows = []
    for problem in batch.to_pylist():
        candidates = problem.pop("candidates")
        rows += [problem | candidate for candidate in candidates]
    return rows
