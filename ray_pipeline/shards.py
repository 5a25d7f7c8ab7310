"""Shard layout and bookkeeping: one Parquet file per shard of problems, one row per candidate.

Ray Data's `write_parquet` names files by block and task and gives no way to know that a file
holds all candidates of a planned shard, so shards are written here: rows stream back from
the actor pools, are grouped by `shard_id`, and a shard's file is committed (temporary name,
then rename) only when all its `problems x N` rows have arrived. A retried task may deliver a
row twice; the writer keeps the first copy of each (problem_id, candidate_index).

Ray Data's CheckpointConfig (beta) was not used: it checkpoints by row id into a filesystem that
the whole cluster shares, and knows nothing of a shard being complete, which is what resuming
here needs. A shard appears whole or not at all: on a local disk or a shared mount by an atomic
rename, on an object store because an object exists only once its upload completes (storage.py).
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_pipeline.columns import CANDIDATE_FIELDS, LATER_COLUMNS, SCORE_FIELDS
from ray_pipeline.data import PROBLEM_SCHEMA
from ray_pipeline.errors import PipelineError
from ray_pipeline.storage import Location, StoragePath

# The columns, their types and which stage writes them: ray_pipeline/columns.py.
CANDIDATE_SCHEMA = pa.schema(list(PROBLEM_SCHEMA) + CANDIDATE_FIELDS)
# What the generators hand the scorers: one row per problem, its N candidates in one list, so that Ray
# Data (which may cut a stream of rows anywhere) never splits a problem between two scorer batches.
GENERATED_SCHEMA = pa.schema(list(PROBLEM_SCHEMA) + [("candidates", pa.list_(pa.struct(CANDIDATE_FIELDS)))])
SHARD_SCHEMA = pa.schema(list(CANDIDATE_SCHEMA) + SCORE_FIELDS)


# A shard path of the same kind as its folder: a local Path (tests, benchmarks) stays a Path.
_Dir = TypeVar("_Dir", StoragePath, Path)


def shard_path(shards_dir: _Dir, shard_id: int) -> _Dir:
    return shards_dir / f"shard-{shard_id:05d}.parquet"


def expected_rows(problems: pa.Table, num_candidates: int) -> dict[int, int]:
    """Rows each planned shard must hold: its problems times N."""
    counts: dict[int, int] = defaultdict(int)
    for shard_id in problems.column("shard_id").to_pylist():
        counts[shard_id] += num_candidates
    return dict(counts)


FINGERPRINT_KEY = b"bestofn.fingerprint"


class ShardWriter:
    """Buffers scored rows per shard and commits each shard once it is complete.

    `fingerprint` (the run's configuration hash) is stored in each file's metadata, so a shard
    copied from another run is recognised. `on_commit(shard_id, path, error_rows)` follows each
    commit, with the number of the shard's rows that hold an error (the writer has them at hand).
    """

    def __init__(
        self,
        shards_dir: Location,
        expected: dict[int, int],
        on_commit: Callable[[int, StoragePath, int], None] | None = None,
        fingerprint: str = "",
    ):
        self.shards_dir = StoragePath.parse(shards_dir)
        self.expected = expected
        self.on_commit = on_commit
        self.schema = SHARD_SCHEMA.with_metadata({FINGERPRINT_KEY: fingerprint.encode()})
        self.pending: dict[int, list[pa.Table]] = defaultdict(list)
        self.seen: dict[int, set[tuple[str, int]]] = defaultdict(set)
        self.committed: list[int] = []
        self.shards_dir.mkdir()

    def add(self, batch: pa.Table) -> pa.Table:
        """Takes a scored batch; returns its rows not seen before (a retried batch repeats rows)."""
        batch = batch.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
        keys = list(zip(batch.column("problem_id").to_pylist(), batch.column("candidate_index").to_pylist()))
        shard_ids = batch.column("shard_id").to_pylist()
        fresh = []
        for shard_id in sorted(set(shard_ids)):
            if shard_id not in self.expected:
                raise PipelineError(f"a row arrived for shard {shard_id}, which is not pending in the plan")
            seen = self.seen[shard_id]
            rows = []
            for i, (s, key) in enumerate(zip(shard_ids, keys)):
                if s == shard_id and key not in seen:
                    seen.add(key)
                    rows.append(i)
            if not rows:
                continue
            if shard_id in self.committed:
                # Every row of a committed shard was seen: a new one means the plan and the rows disagree.
                raise PipelineError(f"a row arrived for shard {shard_id}, which is already committed")
            self.pending[shard_id].append(batch.take(pa.array(rows, pa.int64())))
            fresh += rows
            if len(seen) == self.expected[shard_id]:
                self._commit(shard_id)
        return batch.take(pa.array(sorted(fresh), pa.int64()))

    def _commit(self, shard_id: int) -> None:
        table = pa.concat_tables(self.pending.pop(shard_id)).sort_by(
            [("problem_index", "ascending"), ("candidate_index", "ascending")]
        )
        final = shard_path(self.shards_dir, shard_id)
        final.write_parquet(table.replace_schema_metadata(self.schema.metadata))
        self.committed.append(shard_id)
        if self.on_commit:
            self.on_commit(shard_id, final, table.num_rows - table.column("error").null_count)

    def missing(self) -> list[int]:
        return sorted(set(self.expected) - set(self.committed))


@dataclass(frozen=True)
class PlannedShard:
    """What the plan puts in a shard: problems first_problem … first_problem + problems - 1, each with N candidates."""

    first_problem: int
    problems: int
    candidates: int
    # The id of each problem, in order, where the manifest lists them (runs planned before it did do not).
    problem_ids: tuple[str, ...] | None = None

    @property
    def rows(self) -> int:
        return self.problems * self.candidates


def planned_shards(
    problems: dict[int, int], num_candidates: int, problem_ids: dict[int, tuple[str, ...]] | None = None
) -> dict[int, PlannedShard]:
    """Each shard's problems from the plan's problems per shard: shards hold consecutive problems, in shard order."""
    planned, first = {}, 0
    for shard_id in sorted(problems):
        ids = (problem_ids or {}).get(shard_id)
        planned[shard_id] = PlannedShard(first, problems[shard_id], num_candidates, ids)
        first += problems[shard_id]
    return planned


def _is_float(kind: pa.DataType) -> bool:
    return pa.types.is_floating(kind.value_type if pa.types.is_list(kind) else kind)


def schema_fault(schema: pa.Schema) -> str | None:
    """Why a shard file's schema is not the shard schema, or None: only columns added later (LATER_COLUMNS) may lack."""
    expected = pa.schema([f for f in SHARD_SCHEMA if f.name in schema.names or f.name not in LATER_COLUMNS])
    return None if schema.remove_metadata().equals(expected) else "schema differs from the shard schema"


# How check_shard's reason for a shard of another run's configuration begins: such a shard is never redone unasked.
FOREIGN_SHARD = "written by another configuration"
# check_shard's reason for a folder where a shard file belongs: the resume refuses it (it could not write the shard).
NOT_A_FILE = "a folder, not a shard file"
KEY_COLUMNS = ["problem_id", "problem_index", "candidate_index"]


def check_shard(path: Location, planned: PlannedShard, fingerprint: str) -> str | None:
    """Why the committed shard at `path` cannot be trusted, or None when it can.

    Trusted means: its footer reads, its schema is the shard schema, it was written by this run's
    configuration, and its (problem, candidate) keys are exactly the plan's: every candidate of
    every planned problem once, one problem id per problem. Both the resume (`jobs.infer`) and the
    reducer (`jobs.reduce`) run this one check.
    """
    path = StoragePath.parse(path)
    if not path.is_file():
        # A folder of the shard's name is no shard, and no shard can be written in its place.
        return f"{NOT_A_FILE}: remove or rename it" if path.is_dir() else "missing"
    try:
        with path.open_input_file() as source:
            footer = pq.ParquetFile(source)
            meta, schema = footer.metadata, footer.schema_arrow
            if schema_fault(schema):
                return schema_fault(schema)
            written_by = (schema.metadata or {}).get(FINGERPRINT_KEY, b"").decode()
            if written_by != fingerprint:
                return f"{FOREIGN_SHARD} ({written_by or 'unknown'}, this run is {fingerprint})"
            if meta.num_rows != planned.rows:
                return f"{meta.num_rows} rows, expected {planned.rows}"
            keys = footer.read(columns=KEY_COLUMNS)
            fault = key_fault(keys, planned)
            if fault:
                return fault
            values = footer.read(columns=[n for n in FLOAT_COLUMNS if n in schema.names] + ["token_count"])
    except (OSError, pa.ArrowException) as exc:
        return f"unreadable ({type(exc).__name__})"
    return value_fault(values, keys)


# Every float a shard holds: the scorer's scores and per-token values, the generator's confidences and threshold.
FLOAT_COLUMNS = [f.name for f in SHARD_SCHEMA if _is_float(f.type)]


def value_fault(values: pa.Table, keys: pa.Table) -> str | None:
    """The first float that no stage writes, or None: NaN or an infinity anywhere but a scalar score of a candidate
    without response tokens (NaN there: "no score", columns.empty_scores). Such a value would become "no score" or
    an `Infinity` that is not JSON in the best-answer file."""
    if "token_count" in values.column_names:
        empty = pc.equal(pc.fill_null(values.column("token_count"), 0), 0)
    else:
        empty = pa.array([False] * values.num_rows)
    for name in FLOAT_COLUMNS:
        if name not in values.column_names:
            continue
        column = values.column(name)
        if pa.types.is_list(column.type):
            lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
            flat = pc.list_flatten(column)
            bad = ~pc.fill_null(pc.is_finite(flat), True).to_numpy(zero_copy_only=False)
            if not bad.any():
                continue
            row = int(np.searchsorted(np.cumsum(lengths), int(np.argmax(bad)), side="right"))
            value = flat[int(np.argmax(bad))].as_py()
        else:
            finite = pc.fill_null(pc.is_finite(column), True)
            allowed = pc.and_(pc.is_nan(pc.fill_null(column, 0.0)), empty)
            bad = ~pc.or_(finite, allowed).to_numpy(zero_copy_only=False)
            if not bad.any():
                continue
            row = int(np.argmax(bad))
            value = column[row].as_py()
        problem, candidate = keys.column("problem_index")[row].as_py(), keys.column("candidate_index")[row].as_py()
        return f"problem {problem} candidate {candidate} holds {value} in {name}"
    return None


def key_fault(keys: pa.Table, planned: PlannedShard) -> str | None:
    """What is wrong with a shard's (problem, candidate) keys against the plan, or None when they are exactly it."""
    problem = pc.fill_null(keys.column("problem_index"), -1).to_numpy().astype(np.int64) - planned.first_problem
    candidate = pc.fill_null(keys.column("candidate_index"), -1).to_numpy().astype(np.int64)
    outside = (problem < 0) | (problem >= planned.problems) | (candidate < 0) | (candidate >= planned.candidates)
    if outside.any():
        i = int(np.argmax(outside))
        first, last = planned.first_problem, planned.first_problem + planned.problems - 1
        return (
            f"holds problem {problem[i] + first} candidate {candidate[i]}, outside the plan's problems "
            f"{first}-{last} x candidates 0-{planned.candidates - 1}"
        )
    counts = np.bincount(problem * planned.candidates + candidate, minlength=planned.rows)
    if (counts != 1).any():
        # The row count is the plan's, so a key that repeats means another one is missing.
        twice, absent = int(np.flatnonzero(counts > 1)[0]), int(np.flatnonzero(counts == 0)[0])

        def key(k: int) -> str:
            return f"problem {k // planned.candidates + planned.first_problem} candidate {k % planned.candidates}"

        return f"keys differ from the plan: {key(twice)} appears {counts[twice]} times, {key(absent)} is missing"
    ids = pa.table({"problem": problem, "id": keys.column("problem_id")}).group_by("problem").aggregate(
        [("id", "count_distinct")]
    )
    mixed = pc.greater(ids.column("id_count_distinct"), 1)
    if pc.any(mixed).as_py():
        first = ids.filter(mixed).column("problem")[0].as_py() + planned.first_problem
        return f"problem {first} holds rows of several problem ids"
    if planned.problem_ids is not None:
        held = keys.column("problem_id").to_pylist()
        for row, local in enumerate(problem.tolist()):
            if held[row] != planned.problem_ids[local]:
                return (
                    f"problem {local + planned.first_problem} has id {held[row]!r}, "
                    f"the plan's is {planned.problem_ids[local]!r}"
                )
    return None


TEMPORARY_PATTERN = ".shard-*.tmp-*"


def unplanned_files(shards_dir: Location, planned: list[int]) -> list[str]:
    """Names of the files in the shard folder that are neither a planned shard nor a writer's temporary."""
    shards_dir = StoragePath.parse(shards_dir)
    known = {shard_path(shards_dir, s).name for s in planned}
    names = [f.name for f in shards_dir.files()]
    return [n for n in names if n not in known and not fnmatch.fnmatch(n, TEMPORARY_PATTERN)]


def check_no_unplanned_files(shards_dir: Location, planned: list[int]) -> None:
    """Refuse a shard folder holding files the plan does not know: they would be merged into the results."""
    extra = unplanned_files(shards_dir, planned)
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise PipelineError(
            f"{shards_dir} holds files that the run's shard plan (shards 0-{max(planned, default=0)}) does not know: "
            f"{shown}; move them out of that folder"
        )


def remove_stale_temporaries(shards_dir: Location) -> None:
    """Partial files left by a killed writer never become shards; clear them.

    Call it only while holding the run folder's lock: another job's temporary is its shard in the making.
    """
    shards_dir = StoragePath.parse(shards_dir)
    # Only a local writer uses temporary files; an unfinished upload leaves no object.
    if not shards_dir.is_local:
        return
    for tmp in shards_dir.files(TEMPORARY_PATTERN):
        tmp.delete()


def read_shards(shards_dir: Location, columns: list[str] | None = None) -> pa.Table:
    """All committed shards as one table (or just `columns` of it), ordered by problem and candidate."""
    shards_dir = StoragePath.parse(shards_dir)
    files = shards_dir.files("shard-*.parquet")
    if not files:
        raise PipelineError(f"no shards in {shards_dir}: run the generation stage first")
    if columns is not None:
        columns = list(dict.fromkeys(["problem_index", "candidate_index", *columns]))
    # Reading with the schema fills the later columns that older shards lack with nulls.
    tables = []
    for f in files:
        try:
            with f.open_input_file() as source:
                fault = schema_fault(pq.read_schema(source))
                if fault:
                    redo = "run jobs.infer with the same flags to redo it"
                    raise PipelineError(f"shard {f} cannot be read ({fault}): {redo}")
                table = pq.read_table(source, schema=SHARD_SCHEMA, columns=columns)
            # Checked here too: a folder without a manifest gets no shard check, and its values would reach the
            # methods (a NaN becomes "no score", an infinity a best-answer file that is not JSON).
            fault = value_fault(table, table)
            if fault:
                raise PipelineError(f"shard {f} cannot be used: {fault}; run jobs.infer with the same flags to redo it")
            tables.append(table)
        # A file of another schema can fail the cast with TypeError or ValueError, not only an Arrow error.
        except (OSError, pa.ArrowException, TypeError, ValueError) as exc:
            raise PipelineError(
                f"shard {f} cannot be read ({type(exc).__name__}): run jobs.infer with the same flags to redo it"
            ) from None
    table = pa.concat_tables(tables)
    return table.sort_by([("problem_index", "ascending"), ("candidate_index", "ascending")])
