"""The reducer: shards in, the best-answer JSONL and an accuracy summary out.

Every input of every method is a shard column, so the reducer re-selects with any method, alpha
or number of candidates N' <= N (each question's first N') without a model. It works in three
stages that every method, curve and sweep then share:

1. read: only the columns the reducer uses (`graded_run.reducer_columns`);
2. grade and group (`graded_run.grade_run`): each candidate's answer graded, its answer class and every
   per-candidate value a method reads;
3. select (here): the methods on [questions x candidates] arrays (`selection.Candidates`), the best-answer file
   and the summary.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np

from ray_pipeline.graded_run import GradedRun, grade_run, grade_table, question_rows_table
from ray_pipeline.run_folder import ShardPlan
from ray_pipeline.selection import (
    BLOCK_PARAMS,
    Choice,
    Picks,
    SelectionParams,
    get_method,
    key_step,
)
from ray_pipeline.storage import Location, StoragePath


@dataclass
class Summary:
    method: str
    alpha: float
    problems: int
    candidates: int
    candidates_per_problem: int
    accuracy: float | None
    pass_at_n: float | None
    partial: bool
    missing_shards: list[int]
    output: str
    # Problems whose candidates could not be generated (their shard rows name why).
    error_problems: dict[str, str]
    # Problems without a gold answer: not graded, so accuracy and pass@N are over the others (None when none is).
    ungraded: int = 0


@dataclass
class RunPicks:
    """One method on every problem: `index [P]` and `score [P]` of the picks, `scores [C]` of every candidate."""

    index: np.ndarray
    score: np.ndarray
    scores: np.ndarray

    def choice(self, run: GradedRun, problem: int) -> Choice:
        rows = slice(run.offsets[problem], run.offsets[problem + 1])
        return Choice(int(self.index[problem]), float(self.score[problem]), tuple(self.scores[rows].tolist()))


def run_method(run: GradedRun, name: str, params: SelectionParams) -> RunPicks:
    """One method on every problem of the run (block by block), picks in problem order."""
    method = get_method(name)
    _check_block_params(run, params)
    index = np.zeros(run.problems, dtype=np.intp)
    score = np.full(run.problems, np.nan)
    scores = np.full(len(run.preds), np.nan)
    for problems, block in run.blocks():
        picks: Picks = method(block, params)
        index[problems], score[problems] = picks.index, picks.score
        rows = run.offsets[problems][:, None] + np.arange(block.shape[1])[None, :]
        scores[rows] = picks.scores
    return RunPicks(index, score, scores)


def _check_block_params(run: GradedRun, params: SelectionParams) -> None:
    changed = [p for p in BLOCK_PARAMS if getattr(run.params, p) != getattr(params, p)]
    if changed:
        raise ValueError(f"the run was graded for other {', '.join(changed)}: grade it again with these parameters")


def select_questions(questions: list[list[dict]], name: str, params: SelectionParams) -> list[Choice]:
    """One method on hand-made questions whose candidates carry their answer as `pred` (no extraction)."""
    preds = [c.get("pred") for q in questions for c in q]
    run = grade_table(question_rows_table(questions), params, workers=1, preds=preds)
    picks = run_method(run, name, params)
    return [picks.choice(run, p) for p in range(run.problems)]


def best_record(run: GradedRun, problem: int, choice: Choice, params: SelectionParams) -> dict:
    """The best-answer line of one question: the original's keys first, then its key step."""
    best = run.row(problem, choice.index)
    return {
        "question": best["problem"],
        "answer": best["text"],
        "unique_id": best["problem_id"],
        "pred": best["pred"],
        "gold": best["gold"],
        "correct": best["correct"],
        # JSON has no NaN or infinity: a score that is not a number is no score.
        "score": choice.score if math.isfinite(choice.score) else None,
        "candidate_index": best["candidate_index"],
        "key_step": key_step(best, params.lambda_weight),
        "error": best["error"],
    }


def error_problems(run: GradedRun) -> dict[str, str]:
    """Problems whose candidates could not be generated, and why (their first row's error)."""
    ids, errors = run.column("problem_id"), run.column("error")
    return {pid: error for pid, error in zip(ids, errors) if error}


def pass_at_n(run: GradedRun) -> float | None:
    """The share of problems with at least one correct candidate (the oracle)."""
    hits = np.add.reduceat(run.values["correct"], run.offsets[:-1]) > 0 if len(run.preds) else np.zeros(0)
    return run.share(float(np.sum(hits & run.has_gold)))


def reduce_run(
    shards_dir: Location,
    output: Location,
    *,
    method: str = "self-certainty",
    params: SelectionParams | None = None,
    plan: ShardPlan | None = None,
    allow_partial: bool = False,
    num_candidates: int | None = None,
) -> Summary:
    """Pick one candidate per problem with `method` and write `{"question", "answer", ...}` lines."""
    get_method(method)
    params = params or SelectionParams()
    run = grade_run(shards_dir, params, plan=plan, allow_partial=allow_partial, num_candidates=num_candidates)
    return write_best(run, output, method, params, verified=plan is not None)


def write_best(run: GradedRun, output: Location, method: str, params: SelectionParams, *, verified: bool) -> Summary:
    """One method's best-answer lines from a graded run; `verified`: a shard plan proved the shards complete."""
    picks = run_method(run, method, params)
    lines, correct = [], 0
    for p in range(run.problems):
        record = best_record(run, p, picks.choice(run, p), params)
        correct += bool(record["correct"])
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    output = StoragePath.parse(output)
    output.write_text("".join(lines))
    return Summary(
        method=method,
        alpha=params.alpha,
        problems=run.problems,
        candidates=len(run.preds),
        candidates_per_problem=int(run.sizes.max()),
        accuracy=run.share(correct),
        pass_at_n=pass_at_n(run),
        # Without a plan (no manifest) nothing proves the shards complete: never claim they are.
        partial=bool(run.missing) or not verified,
        missing_shards=run.missing,
        output=str(output),
        error_problems=error_problems(run),
        ungraded=run.problems - run.graded,
    )


def summary_json(summary: Summary) -> str:
    return json.dumps(asdict(summary), indent=2)
