"""Shard layout and bookkeeping: one Parquet file per shard of problems, one row per candidate.

Ray Data's `write_parquet` names files by block and task and gives no way to know that a file
holds all candidates of a planned shard, so shards are written here: rows stream back from
the actor pools, are grouped by `shard_id`, and a shard's file is committed (temporary name,
then rename) only when all its `problems x N` rows have arrived.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_pipeline.data import PROBLEM_SCHEMA
from ray_pipeline.errors import PipelineError

_floats = pa.list_(pa.float32())
_doubles = pa.list_(pa.float64())
_ints = pa.list_(pa.int32())

CANDIDATE_FIELDS = [
    ("candidate_index", pa.int32()),
    ("prompt_token_ids", _ints),
    ("token_ids", _ints),
    ("text", pa.string()),
    ("finish_reason", pa.string()),
    ("generator_logprobs", _floats),
    ("backend", pa.string()),
]
CANDIDATE_SCHEMA = pa.schema(list(PROBLEM_SCHEMA) + CANDIDATE_FIELDS)

SCORE_FIELDS = [
    ("token_count", pa.int32()),
    ("pred", pa.string()),
    ("correct", pa.bool_()),
    ("token_entropy", _floats),
    ("token_self_certainty", _floats),
    ("token_logprob", _floats),
    ("token_confidence", _floats),
    ("step_self_certainty", _floats),
    ("step_entropy", _floats),
    ("step_texts", pa.list_(pa.string())),
    # One probability per step from the self-evaluation passes; null when the run had no --self_eval.
    ("step_self_eval", _doubles),
    # Chain-of-Embedding: per layer transition of the response-mean hidden states, and the
    # first-to-last-layer change that normalizes them (scores.CoeTransitions).
    ("coe_magnitude", _doubles),
    ("coe_angle", _doubles),
    ("coe_span_magnitude", pa.float64()),
    ("coe_span_angle", pa.float64()),
    ("mean_entropy", pa.float64()),
    ("mean_self_certainty", pa.float64()),
    ("mean_logprob", pa.float64()),
    ("step_min_self_certainty", pa.float64()),
    ("step_mean_self_certainty", pa.float64()),
    ("self_certainty_score", pa.float64()),
    ("lowest_step", pa.int32()),
    ("lowest_step_text", pa.string()),
    ("vocab_size", pa.int32()),
]
SHARD_SCHEMA = pa.schema(list(CANDIDATE_SCHEMA) + SCORE_FIELDS)


def shard_path(shards_dir: Path, shard_id: int) -> Path:
    return shards_dir / f"shard-{shard_id:05d}.parquet"


def expected_rows(problems: pa.Table, num_candidates: int) -> dict[int, int]:
    """Rows each planned shard must hold: its problems times N."""
    counts: dict[int, int] = defaultdict(int)
    for shard_id in problems.column("shard_id").to_pylist():
        counts[shard_id] += num_candidates
    return dict(counts)


class ShardWriter:
    """Buffers scored rows per shard and commits each shard once it is complete."""

    def __init__(
        self, shards_dir: Path, expected: dict[int, int], on_commit: Callable[[int, Path], None] | None = None
    ):
        self.shards_dir = shards_dir
        self.expected = expected
        self.on_commit = on_commit
        self.pending: dict[int, list[pa.Table]] = defaultdict(list)
        self.received: dict[int, int] = defaultdict(int)
        self.committed: list[int] = []
        shards_dir.mkdir(parents=True, exist_ok=True)

    def add(self, batch: pa.Table) -> None:
        batch = batch.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
        ids = batch.column("shard_id")
        for shard_id in sorted(set(ids.to_pylist())):
            if shard_id not in self.expected:
                raise PipelineError(f"a row arrived for shard {shard_id}, which is not in the plan")
            part = batch.filter(pc.equal(ids, shard_id))
            self.pending[shard_id].append(part)
            self.received[shard_id] += part.num_rows
            if self.received[shard_id] == self.expected[shard_id]:
                self._commit(shard_id)
            elif self.received[shard_id] > self.expected[shard_id]:
                raise PipelineError(
                    f"shard {shard_id} received {self.received[shard_id]} rows, expected {self.expected[shard_id]}"
                )

    def _commit(self, shard_id: int) -> None:
        table = pa.concat_tables(self.pending.pop(shard_id)).sort_by(
            [("problem_index", "ascending"), ("candidate_index", "ascending")]
        )
        final = shard_path(self.shards_dir, shard_id)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        pq.write_table(table, tmp)
        os.replace(tmp, final)
        self.committed.append(shard_id)
        if self.on_commit:
            self.on_commit(shard_id, final)

    def missing(self) -> list[int]:
        return sorted(set(self.expected) - set(self.committed))


def read_shards(shards_dir: Path, columns: list[str] | None = None) -> pa.Table:
    """All committed shards as one table (or just `columns` of it), ordered by problem and candidate."""
    files = sorted(shards_dir.glob("shard-*.parquet"))
    if not files:
        raise PipelineError(f"no shards in {shards_dir}: run the generation stage first")
    if columns is not None:
        columns = list(dict.fromkeys(["problem_index", "candidate_index", *columns]))
    # Reading with the schema fills columns that older shards lack with nulls.
    table = pa.concat_tables(pq.read_table(f, schema=SHARD_SCHEMA, columns=columns) for f in files)
    return table.sort_by([("problem_index", "ascending"), ("candidate_index", "ascending")])
