"""The reducer: shards in, the best-answer JSONL and an accuracy summary out."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path

from ray_pipeline.errors import PipelineError
from ray_pipeline.selection import SelectionParams, get_method
from ray_pipeline.shards import read_shards, shard_path


@dataclass
class Summary:
    method: str
    alpha: float
    problems: int
    candidates: int
    accuracy: float
    pass_at_n: float
    partial: bool
    missing_shards: list[int]
    output: str


def group_by_problem(rows: list[dict]) -> list[list[dict]]:
    """Candidates of each problem, problems in data set order (rows come sorted)."""
    return [list(group) for _, group in groupby(rows, key=lambda r: r["problem_index"])]


def reduce_run(
    shards_dir: Path,
    output: Path,
    *,
    method: str = "self-certainty",
    params: SelectionParams | None = None,
    expected_shards: list[int] | None = None,
    allow_partial: bool = False,
) -> Summary:
    """Pick one candidate per problem with `method` and write `{"question", "answer", ...}` lines."""
    select = get_method(method)
    params = params or SelectionParams()
    missing = [s for s in expected_shards or [] if not shard_path(shards_dir, s).is_file()]
    if missing and not allow_partial:
        raise PipelineError(
            f"shards {', '.join(map(str, missing))} are missing from {shards_dir}: "
            "rerun the job to finish them, or pass --allow_partial"
        )
    problems = group_by_problem(read_shards(shards_dir).to_pylist())
    output.parent.mkdir(parents=True, exist_ok=True)
    correct = any_correct = candidates = 0
    tmp = output.with_name(output.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for group in problems:
            choice = select(group, params)
            best = group[choice.index]
            correct += bool(best["correct"])
            any_correct += any(c["correct"] for c in group)
            candidates += len(group)
            record = {
                "question": best["problem"],
                "answer": best["text"],
                "unique_id": best["problem_id"],
                "pred": best["pred"],
                "gold": best["gold"],
                "correct": best["correct"],
                "score": None if math.isnan(choice.score) else choice.score,
                "candidate_index": best["candidate_index"],
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(output)
    n = len(problems)
    return Summary(
        method=method,
        alpha=params.alpha,
        problems=n,
        candidates=candidates,
        accuracy=correct / n,
        pass_at_n=any_correct / n,
        partial=bool(missing),
        missing_shards=missing,
        output=str(output),
    )


def summary_json(summary: Summary) -> str:
    return json.dumps(asdict(summary), indent=2)
