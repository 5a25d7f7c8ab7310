"""The reducer: shards in, the best-answer JSONL and an accuracy summary out.

Every input of every method is a shard column, so the reducer re-selects with any method, alpha
or number of candidates N' <= N (each question's first N') without a model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from itertools import groupby

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_pipeline.answers import extract_answer, grade
from ray_pipeline.columns import selection_columns
from ray_pipeline.data import PROBLEM_SCHEMA
from ray_pipeline.errors import PipelineError
from ray_pipeline.selection import Choice, SelectionParams, get_method, key_step
from ray_pipeline.shards import read_shards, shard_path
from ray_pipeline.storage import Location, StoragePath

# What the methods, the records and the report read (columns.py marks them): every column but the
# token ids and the per-token lists that are already aggregated.
SELECTION_COLUMNS = selection_columns([n for n in PROBLEM_SCHEMA.names if n != "shard_id"])


@dataclass
class Summary:
    method: str
    alpha: float
    problems: int
    candidates: int
    candidates_per_problem: int
    accuracy: float
    pass_at_n: float
    partial: bool
    missing_shards: list[int]
    output: str
    # Problems whose candidates could not be generated (their shard rows name why).
    error_problems: dict[str, str]


def group_by_problem(rows: list[dict]) -> list[list[dict]]:
    """Candidates of each problem, problems in data set order (rows come sorted)."""
    return [list(group) for _, group in groupby(rows, key=lambda r: r["problem_index"])]


def _rows(table: pa.Table, answer_extraction: str = "boxed") -> list[dict]:
    """Table rows as dicts, with `token_confidence` as float32 numpy arrays (the one long per-token list).

    Each row gains `pred` (its answer under `answer_extraction`) and `correct` (graded against
    `gold`; None without a gold answer): the reducer's, not the scorer's, so a re-reduce can re-grade.
    """
    confidence = table.column("token_confidence").combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(confidence), 0).to_numpy()
    values = pc.list_flatten(confidence).to_numpy(zero_copy_only=False).astype(np.float32)
    per_row = np.split(values, np.cumsum(lengths)[:-1])
    rows = table.drop_columns(["token_confidence"]).to_pylist()
    for row, values_of_row in zip(rows, per_row):
        row["token_confidence"] = values_of_row
        row["pred"] = extract_answer(row["text"] or "", answer_extraction)
        row["correct"] = None if row["gold"] is None else grade(row["pred"], row["gold"])
    return rows


def load_questions(
    shards_dir: Location,
    *,
    expected_shards: list[int] | None = None,
    allow_partial: bool = False,
    num_candidates: int | None = None,
    answer_extraction: str = "boxed",
) -> tuple[list[list[dict]], list[int]]:
    """Each question's candidates (its first `num_candidates` when given) and the missing shard ids."""
    shards_dir = StoragePath.parse(shards_dir)
    missing = [s for s in expected_shards or [] if not shard_path(shards_dir, s).is_file()]
    if missing and not allow_partial:
        raise PipelineError(
            f"shards {', '.join(map(str, missing))} are missing from {shards_dir}: "
            "rerun the job to finish them, or pass --allow_partial"
        )
    questions = group_by_problem(_rows(read_shards(shards_dir, SELECTION_COLUMNS), answer_extraction))
    if num_candidates is not None:
        fewest = min(len(q) for q in questions)
        if not 1 <= num_candidates <= fewest:
            raise PipelineError(
                f"num_return_sequences must be in [1, {fewest}] (the run's candidates per problem), "
                f"got {num_candidates}"
            )
        questions = [q[:num_candidates] for q in questions]
    return questions, missing


def best_record(question: list[dict], choice: Choice, params: SelectionParams) -> dict:
    """The best-answer line of one question: the original's keys first, then its key step."""
    best = question[choice.index]
    return {
        "question": best["problem"],
        "answer": best["text"],
        "unique_id": best["problem_id"],
        "pred": best["pred"],
        "gold": best["gold"],
        "correct": best["correct"],
        "score": None if math.isnan(choice.score) else choice.score,
        "candidate_index": best["candidate_index"],
        "key_step": key_step(best, params.lambda_weight),
        "error": best["error"],
    }


def reduce_run(
    shards_dir: Location,
    output: Location,
    *,
    method: str = "self-certainty",
    params: SelectionParams | None = None,
    expected_shards: list[int] | None = None,
    allow_partial: bool = False,
    num_candidates: int | None = None,
) -> Summary:
    """Pick one candidate per problem with `method` and write `{"question", "answer", ...}` lines."""
    select = get_method(method)
    params = params or SelectionParams()
    questions, missing = load_questions(
        shards_dir,
        expected_shards=expected_shards,
        allow_partial=allow_partial,
        num_candidates=num_candidates,
        answer_extraction=params.answer_extraction,
    )
    correct = any_correct = 0
    errors = {q[0]["problem_id"]: q[0]["error"] for q in questions if q[0]["error"]}
    lines = []
    for group in questions:
        record = best_record(group, select(group, params), params)
        correct += bool(record["correct"])
        any_correct += any(c["correct"] for c in group)
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    output = StoragePath.parse(output)
    output.write_text("".join(lines))
    n = len(questions)
    return Summary(
        method=method,
        alpha=params.alpha,
        problems=n,
        candidates=sum(len(q) for q in questions),
        candidates_per_problem=max(len(q) for q in questions),
        accuracy=correct / n,
        pass_at_n=any_correct / n,
        # Without a plan (no manifest) nothing proves the shards complete: never claim they are.
        partial=bool(missing) or expected_shards is None,
        missing_shards=missing,
        output=str(output),
        error_problems=errors,
    )


def summary_json(summary: Summary) -> str:
    return json.dumps(asdict(summary), indent=2)
