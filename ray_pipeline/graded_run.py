"""The reducer's first two stages: a run's shards read (only the columns the reducer uses, `reducer_columns`) and
graded and grouped into a `GradedRun`, what every method, curve and record reads.

Per problem, each candidate's answer is extracted, each distinct answer graded once and every candidate given its
answer class (`grading.grade_and_group`); with it, each declared per-candidate value (`values.VALUES`). Problems
are independent, so chunks of them run on every core (a process pool) or, inside a Ray job, as Ray tasks over the
cluster; the result does not depend on how many run at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_pipeline.answers import extract_answer, timeouts
from ray_pipeline.columns import selection_columns
from ray_pipeline.data import PROBLEM_SCHEMA
from ray_pipeline.deepconf import OnlineSettings
from ray_pipeline.deepconf.strategies import engine_strategies
from ray_pipeline.errors import PipelineError
from ray_pipeline.grading import grade_and_group
from ray_pipeline.run_folder import ShardPlan, check_planned_shards
from ray_pipeline.selection import Candidates, SelectionParams
from ray_pipeline.shards import read_shards
from ray_pipeline.storage import Location, StoragePath
from ray_pipeline.values import VALUES, Chunk


def reducer_columns() -> list[str]:
    """What the methods, the records and the report read: the problem's columns, those columns.py marks and those
    the per-candidate values declared now read (`values.VALUES`); not the token ids nor the per-token lists that are
    already aggregated."""
    return selection_columns(
        [n for n in PROBLEM_SCHEMA.names if n != "shard_id"], [c for value in VALUES.values() for c in value.reads]
    )


# What a best-answer or debug record reads of its candidate: no per-token values.
RECORD_COLUMNS = [
    "problem_id", "problem", "gold", "candidate_index", "text", "error", "token_count", "vocab_size",
    "step_self_certainty", "step_entropy", "step_texts",
]  # fmt: skip


# Problems per chunk of the grade-and-group stage: small enough to spread 100 problems over many cores,
# large enough that a chunk's scheduling is a small share of its work.
CHUNK_PROBLEMS = 8


def candidate_values(
    chunk: pa.Table,
    params: SelectionParams,
    preds: list[str | None] | None = None,
    online: OnlineSettings | None = None,
) -> dict:
    """Grade and group one chunk of whole problems, and compute every per-candidate value a method reads.

    Returns the flat [candidates] arrays of `values.VALUES` (in the chunk's row order),
    each candidate's extracted answer (`preds`; given, they are taken as they are), and per problem
    its distinct answers, the math-verify comparisons that ran and the timeouts. With `online`
    settings, per problem of a full run with engine confidences what DeepConf would have done
    (`engine_strategies`).
    """
    started_timeouts = timeouts()
    if preds is None:
        preds = [extract_answer(t or "", params.answer_extraction) for t in chunk.column("text").to_pylist()]
    problem_index = chunk.column("problem_index").to_numpy()
    starts = np.flatnonzero(np.r_[True, problem_index[1:] != problem_index[:-1]]) if len(problem_index) else []
    ends = np.r_[starts[1:], len(problem_index)] if len(starts) else []
    golds = chunk.column("gold").to_pylist()
    n = chunk.num_rows
    label = np.full(n, -1, dtype=np.int32)
    correct = np.zeros(n, dtype=bool)
    distinct, symbolic = [], 0
    for start, end in zip(starts, ends):
        graded = grade_and_group(preds[start:end], golds[start])
        label[start:end] = graded.labels
        correct[start:end] = [bool(c) for c in graded.correct]
        distinct.append(graded.distinct)
        symbolic += graded.symbolic

    view = Chunk(chunk, params, label, correct)
    values = {name: value.compute(view) for name, value in VALUES.items()}
    generated = pc.fill_null(pc.coalesce(chunk.column("engine_token_count"), chunk.column("token_count")), 0)
    return {
        "values": values,
        "preds": preds,
        "distinct": distinct,
        "symbolic": symbolic,
        "timeouts": timeouts() - started_timeouts,
        "confidences": (len(view.engine_rows), len(view.answered)),
        "generated": [int(generated[a:b].to_numpy().sum()) for a, b in zip(starts, ends)],
        "engine_strategies": engine_strategies(
            view.pylist("engine_confidence"),
            values["engine_lowest_group"],
            view.pylist("phase"),
            label,
            view.token_count,
            starts,
            ends,
            online,
            params.deepconf_window,
        ),
    }


def _grade_chunk(args: tuple) -> dict:
    return candidate_values(*args)


def _workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def map_chunks(fn: Callable, chunks: list, *, workers: int | None = None) -> list:
    """`[fn(c) for c in chunks]`, spread out: Ray tasks over the cluster inside a Ray job, else a process pool.

    `workers` 1 runs in this process. Without it: Ray tasks when this process is connected to Ray
    (jobs.main after its actors), else one process per core (jobs.reduce starts no Ray); small
    inputs stay in this process.
    """
    workers = workers or (1 if len(chunks) < 2 else None)
    if workers == 1:
        return [fn(c) for c in chunks]
    import ray

    if workers is None and ray.is_initialized():
        task = ray.remote(num_cpus=1, max_retries=1)(fn)
        return ray.get([task.remote(c) for c in chunks])
    from concurrent.futures import ProcessPoolExecutor

    workers = min(workers or _workers(), len(chunks))
    if workers <= 1:
        return [fn(c) for c in chunks]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, chunks))


@dataclass
class GradedRun:
    """A run's candidates after the grade-and-group stage: what every method, curve and record reads.

    `table` holds the shard rows (`reducer_columns`, problem then candidate order), `offsets [P + 1]`
    each problem's rows, `values` the flat per-candidate arrays of `values.VALUES`, `preds` each
    candidate's answer; `has_gold [P]` whether a problem has a gold answer.
    """

    table: pa.Table
    offsets: np.ndarray
    values: dict[str, np.ndarray]
    preds: list[str | None]
    has_gold: np.ndarray
    distinct: list[int]
    symbolic: int
    timeouts: int
    missing: list[int] = field(default_factory=list)
    params: SelectionParams = field(default_factory=SelectionParams)
    # Tokens each problem's traces generated, and, for a full run with engine confidences graded with online
    # settings, what DeepConf would have done (`engine_strategies`: name -> tokens [P], pick [P]).
    generated: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    engine_strategies: dict | None = None
    # (candidates whose DeepConf confidences came from the engine, candidates with tokens): `confidence_source`.
    confidences: tuple[int, int] = (0, 0)
    _rows: dict = field(default_factory=dict, repr=False)

    @property
    def graded(self) -> int:
        """Problems with a gold answer: what accuracy, its interval, pass@N and AUROC count."""
        return int(np.sum(self.has_gold))

    @property
    def confidence_source(self) -> str:
        """Which confidences the confidence methods (lowest-group, tail, deepconf-*) read: `engine` (the sampling
        engine's raw top-k log-probs, stored by online runs and --engine_confidence), `scorer` (its
        teacher-forced pass), or `engine where stored, else scorer` for a mix."""
        used, scored = self.confidences
        if used == scored and scored:
            return "engine"
        return "scorer" if not used else f"engine where stored ({used} of {scored} candidates), else scorer"

    def share(self, hits: float) -> float | None:
        """`hits` correct picks as a share of the graded problems; None (JSON's null) when none is graded."""
        return hits / self.graded if self.graded else None

    @property
    def problems(self) -> int:
        return len(self.offsets) - 1

    @property
    def sizes(self) -> np.ndarray:
        """Candidates per problem."""
        return np.diff(self.offsets)

    def column(self, name: str) -> list:
        """A problem-level column (e.g. problem_id, level), one value per problem."""
        return self.table.column(name).take(pa.array(self.offsets[:-1])).to_pylist()

    def blocks(self) -> list[tuple[np.ndarray, Candidates]]:
        """The problems grouped by their number of candidates n: (problem numbers [B], their [B, n] block)."""
        sizes = self.sizes
        out = []
        for n in sorted(set(sizes.tolist())):
            problems = np.flatnonzero(sizes == n)
            rows = self.offsets[problems][:, None] + np.arange(n)[None, :]
            out.append((problems, Candidates(**{k: self.values[k][rows] for k in VALUES})))
        return out

    def row(self, problem: int, candidate: int) -> dict:
        """One candidate's record columns as a dict, with its `pred` and `correct` (None without a gold answer)."""
        key = (problem, candidate)
        if key not in self._rows:
            i = int(self.offsets[problem]) + candidate
            row = self.table.select(RECORD_COLUMNS).slice(i, 1).to_pylist()[0]
            row["pred"] = self.preds[i]
            row["correct"] = bool(self.values["correct"][i]) if self.has_gold[problem] else None
            self._rows[key] = row
        return self._rows[key]

    def correct_of(self, problem: int) -> list:
        """Each candidate's grade of one problem (None without a gold answer)."""
        if not self.has_gold[problem]:
            return [None] * int(self.sizes[problem])
        return [bool(c) for c in self.values["correct"][self.offsets[problem] : self.offsets[problem + 1]]]


def grade_run(
    shards_dir: Location,
    params: SelectionParams,
    *,
    plan: ShardPlan | None = None,
    allow_partial: bool = False,
    num_candidates: int | None = None,
    workers: int | None = None,
    timings: dict | None = None,
    online: OnlineSettings | None = None,
) -> GradedRun:
    """Check, read, grade and group a run's shards (each problem's first `num_candidates` when given).

    With the run's `plan` every planned shard passes the resume's shard check first (fingerprint,
    schema, exactly the planned keys); without one (no manifest) nothing proves the shards complete.
    `timings`, when given, receives the seconds of the read and grade-and-group stages.
    """
    import time

    started = time.perf_counter()
    shards_dir = StoragePath.parse(shards_dir)
    missing = check_planned_shards(shards_dir, plan, allow_partial) if plan is not None else []
    table = read_shards(shards_dir, reducer_columns())
    offsets = problem_offsets(table)
    if num_candidates is not None:
        fewest = int(np.diff(offsets).min())
        if not 1 <= num_candidates <= fewest:
            raise PipelineError(
                f"num_return_sequences must be in [1, {fewest}] (the run's candidates per problem), "
                f"got {num_candidates}"
            )
        # Rows come in candidate order: each problem's first K rows are its first K candidates.
        keep = (np.arange(offsets[-1]) - np.repeat(offsets[:-1], np.diff(offsets))) < num_candidates
        table = table.filter(pa.array(keep))
        offsets = np.r_[0, np.cumsum(np.minimum(np.diff(offsets), num_candidates))].astype(np.int64)
    if timings is not None:
        timings["read"] = time.perf_counter() - started
    started = time.perf_counter()
    run = grade_table(table, params, offsets=offsets, workers=workers, online=online)
    run.missing = missing
    if timings is not None:
        timings["grade_and_group"] = time.perf_counter() - started
    return run


def problem_offsets(table: pa.Table) -> np.ndarray:
    """Where each problem's rows start in a table sorted by problem, and its end: [P + 1]."""
    problem_index = table.column("problem_index").to_numpy()
    starts = np.flatnonzero(np.r_[True, problem_index[1:] != problem_index[:-1]])
    return np.r_[starts, len(problem_index)].astype(np.int64)


def grade_table(
    table: pa.Table,
    params: SelectionParams,
    *,
    offsets: np.ndarray | None = None,
    workers: int | None = None,
    preds: list[str | None] | None = None,
    online: OnlineSettings | None = None,
) -> GradedRun:
    """Grade and group the problems of a table of shard rows (sorted by problem, then candidate).

    Chunks of CHUNK_PROBLEMS problems go to `map_chunks`; `preds`, when given, are the candidates'
    answers as they are (no extraction); `online`, DeepConf's settings to simulate (`engine_strategies`).
    """
    offsets = problem_offsets(table) if offsets is None else offsets
    bounds = list(range(0, len(offsets) - 1, CHUNK_PROBLEMS)) + [len(offsets) - 1]
    chunks = [
        (
            table.slice(offsets[a], offsets[b] - offsets[a]),
            params,
            None if preds is None else preds[offsets[a] : offsets[b]],
            online,
        )
        for a, b in zip(bounds, bounds[1:])
    ]
    results = map_chunks(_grade_chunk, chunks, workers=workers)
    values = {name: np.concatenate([r["values"][name] for r in results]) for name in VALUES}
    golds = table.column("gold").take(pa.array(offsets[:-1])).to_pylist()
    return GradedRun(
        table=table,
        offsets=offsets,
        values=values,
        preds=[p for r in results for p in r["preds"]],
        has_gold=np.array([g is not None for g in golds], dtype=bool),
        distinct=[d for r in results for d in r["distinct"]],
        symbolic=sum(r["symbolic"] for r in results),
        timeouts=sum(r["timeouts"] for r in results),
        params=params,
        generated=np.array([g for r in results for g in r["generated"]], dtype=np.int64),
        engine_strategies=_merged_strategies([r["engine_strategies"] for r in results]),
        confidences=tuple(sum(r["confidences"][k] for r in results) for k in (0, 1)),
    )


def _merged_strategies(parts: list[dict | None]) -> dict | None:
    """The chunks' engine strategies joined in problem order; None unless every chunk has them."""
    if not parts or any(p is None for p in parts):
        return None
    return {
        name: (np.concatenate([p[name][0] for p in parts]), np.concatenate([p[name][1] for p in parts]))
        for name in parts[0]
    }


def question_rows_table(questions: list[list[dict]]) -> pa.Table:
    """Shard rows of hand-made questions (dicts with any of the shard columns, plus `pred`) as a table.

    Each question gets its own problem_index; missing columns are null. For tests and notebooks that
    select on a few candidates without writing shards.
    """
    from ray_pipeline.shards import SHARD_SCHEMA

    rows = []
    for p, question in enumerate(questions):
        for k, candidate in enumerate(question):
            row = {name: candidate.get(name) for name in SHARD_SCHEMA.names}
            row["problem_index"], row["candidate_index"] = p, k
            row["problem_id"] = candidate.get("problem_id", f"q{p}")
            row["token_count"] = candidate.get("token_count", 0)
            rows.append(row)
    return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA).select(reducer_columns())
