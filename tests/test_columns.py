"""The shard's columns come from one list; the reducer derives what depends on grading settings."""

import math

import pyarrow as pa

from ray_pipeline.columns import COLUMNS, GENERATOR, SCORER, empty_scores
from ray_pipeline.data import PROBLEM_SCHEMA
from ray_pipeline.graded_run import grade_run, reducer_columns
from ray_pipeline.selection import SelectionParams
from ray_pipeline.shards import CANDIDATE_SCHEMA, SHARD_SCHEMA, ShardWriter


def test_schemas_are_the_column_list():
    assert SHARD_SCHEMA.names == PROBLEM_SCHEMA.names + [c.name for c in COLUMNS]
    assert CANDIDATE_SCHEMA.names == PROBLEM_SCHEMA.names + [c.name for c in COLUMNS if c.stage == GENERATOR]
    assert all(c.stage in (GENERATOR, SCORER) for c in COLUMNS)
    assert set(reducer_columns()) <= set(SHARD_SCHEMA.names)
    # Nothing that depends on selection settings or answer extraction is stored.
    assert not {"pred", "correct", "self_certainty_score", "lowest_step", "lowest_step_text"} & set(SHARD_SCHEMA.names)


def test_empty_scores_fill_every_scorer_column():
    row = empty_scores(100)
    assert set(row) == {c.name for c in COLUMNS if c.stage == SCORER}
    assert row["token_count"] == 0 and row["token_entropy"] == [] and math.isnan(row["mean_self_certainty"])
    # A fresh list each time: one row's list is never another's.
    assert empty_scores(100)["step_texts"] is not row["step_texts"]
    candidate = {name: None for name in CANDIDATE_SCHEMA.names} | {"problem_id": "p", "candidate_index": 0}
    pa.Table.from_pylist([candidate | row], schema=SHARD_SCHEMA)


def test_reducer_extracts_and_grades_with_the_chosen_mode(tmp_path):
    texts = ["so \\boxed{4}", "the answer is 4", "no answer", "\\boxed{5}"]
    rows = []
    for k, text in enumerate(texts):
        row = {name: None for name in SHARD_SCHEMA.names} | empty_scores(100)
        row |= {"problem_id": "p0", "problem_index": 0, "shard_id": 0, "gold": "4", "candidate_index": k, "text": text}
        rows.append(row)
    ShardWriter(tmp_path, {0: len(rows)}).add(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA))
    boxed = grade_run(tmp_path, SelectionParams())
    assert list(zip(boxed.preds, boxed.correct_of(0))) == [("4", True), (None, False), (None, False), ("5", False)]
    numbers = grade_run(tmp_path, SelectionParams(answer_extraction="boxed-then-last-number"))
    assert list(zip(numbers.preds, numbers.correct_of(0))) == [("4", True), ("4", True), (None, False), ("5", False)]
