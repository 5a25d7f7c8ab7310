"""Shard commits and the reducer, on small fake score rows (no model)."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_pipeline.errors import PipelineError
from ray_pipeline.graded_run import grade_run
from ray_pipeline.reduce import reduce_run
from ray_pipeline.run_folder import ShardPlan
from ray_pipeline.selection import SelectionParams
from ray_pipeline.shards import SHARD_SCHEMA, ShardWriter, planned_shards, read_shards, shard_path

# Shard 0 plans problems 0 and 1, shard 1 problem 2, three candidates each; the writers here sign with "".
PLAN = ShardPlan(planned_shards({0: 2, 1: 1}, 3), "")


def fake_rows(problem_index, shard_id, n, correct_index, best_index):
    rows = []
    for k in range(n):
        row = {name: None for name in SHARD_SCHEMA.names}
        row.update(
            problem_id=f"p{problem_index}",
            problem_index=problem_index,
            shard_id=shard_id,
            problem=f"question {problem_index}",
            gold="1",
            candidate_index=k,
            # The reducer extracts the answer and grades it: gold is "1", so only correct_index is right.
            text=f"answer \\boxed{{{int(k == correct_index)}}}",
            token_count=3,
            mean_entropy=1.0,
            mean_self_certainty=2.0 + (k == best_index),
            step_min_self_certainty=2.0 + (k == best_index),
            step_self_certainty=[3.5, 2.0 + (k == best_index)],
            step_entropy=[1.0, 1.0],
            step_texts=[f"step one of {k}", f"weak step of {k}"],
            token_confidence=[1.0, 2.0, 3.0 + k],
            vocab_size=100,
            backend="fake",
        )
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)


def test_shard_is_committed_only_when_complete(tmp_path):
    commits = []
    writer = ShardWriter(tmp_path, {0: 4, 1: 2}, on_commit=lambda s, p, errors: commits.append((s, p.name, errors)))
    writer.add(fake_rows(0, 0, 2, 0, 0))
    assert not shard_path(tmp_path, 0).exists() and writer.missing() == [0, 1]
    failed = fake_rows(2, 1, 2, 0, 0).set_column(
        SHARD_SCHEMA.get_field_index("error"), "error", pa.array(["prompt too long", None], pa.string())
    )
    writer.add(pa.concat_tables([failed, fake_rows(1, 0, 2, 0, 0)]))
    # Each commit names the shard's error rows, counted from the rows the writer holds (the manifest marks it failed).
    assert commits == [(0, shard_path(tmp_path, 0).name, 0), (1, shard_path(tmp_path, 1).name, 1)]
    assert writer.missing() == []
    assert pq.read_table(shard_path(tmp_path, 0)).num_rows == 4
    assert not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(PipelineError, match="not pending in the plan"):
        writer.add(fake_rows(9, 7, 1, 0, 0))


def test_rows_delivered_again_are_kept_once_even_after_their_shard_committed(tmp_path):
    """A retried batch may repeat rows, also rows of a shard already committed: dropped, never an error."""
    writer = ShardWriter(tmp_path, {0: 4, 1: 2})
    first = fake_rows(0, 0, 2, 0, 0)
    assert writer.add(first).num_rows == 2
    assert writer.add(first).num_rows == 0
    shard0 = pa.concat_tables([fake_rows(1, 0, 2, 0, 0), first])
    assert writer.add(shard0).num_rows == 2 and writer.missing() == [1]
    committed = shard_path(tmp_path, 0).read_bytes()
    again = writer.add(pa.concat_tables([shard0, fake_rows(2, 1, 2, 0, 0)]))
    assert again.column("shard_id").to_pylist() == [1, 1] and writer.missing() == []
    assert shard_path(tmp_path, 0).read_bytes() == committed
    assert writer.add(shard0).num_rows == 0
    with pytest.raises(PipelineError, match="already committed"):
        writer.add(fake_rows(5, 0, 1, 0, 0))


def test_reducer_picks_by_method_and_reports(tmp_path):
    shards = tmp_path / "shards"
    writer = ShardWriter(shards, {0: 6, 1: 3})
    # p0: the confident candidate (1) is right; p1: confident (2) wrong, 0 right; p2: none right.
    writer.add(pa.concat_tables([fake_rows(0, 0, 3, 1, 1), fake_rows(1, 0, 3, 0, 2), fake_rows(2, 1, 3, -1, 0)]))
    out = tmp_path / "best.jsonl"
    summary = reduce_run(
        shards, out, method="self-certainty", params=SelectionParams(alpha=0.4), plan=PLAN
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [list(line)[:2] for line in lines] == [["question", "answer"]] * 3
    assert [line["candidate_index"] for line in lines] == [1, 2, 0]
    assert lines[0]["key_step"] == {"index": 1, "text": "weak step of 1", "score": pytest.approx(3.0 / math.log(100))}
    assert summary.accuracy == pytest.approx(1 / 3) and summary.pass_at_n == pytest.approx(2 / 3)
    assert (summary.problems, summary.candidates, summary.candidates_per_problem) == (3, 9, 3)
    baseline = reduce_run(shards, out, method="baseline")
    assert baseline.accuracy == pytest.approx(1 / 3) and math.isnan(baseline.alpha) is False
    # The first two candidates only: p1 loses its confident pick (2), p0 keeps 1.
    first_two = reduce_run(shards, out, method="self-certainty", num_candidates=2)
    assert [json.loads(line)["candidate_index"] for line in out.read_text().splitlines()] == [1, 0, 0]
    assert (first_two.candidates, first_two.accuracy) == (6, pytest.approx(2 / 3))
    with pytest.raises(PipelineError, match=r"num_return_sequences must be in \[1, 3\]"):
        reduce_run(shards, out, num_candidates=4)


def test_token_confidence_is_read_back_per_candidate(tmp_path):
    ShardWriter(tmp_path, {0: 3}).add(fake_rows(0, 0, 3, 0, 0))
    run = grade_run(tmp_path, SelectionParams(deepconf_window=2))
    assert run.missing == [] and run.problems == 1
    # Each candidate's own confidences (1, 2, 3 + k): the lowest window of two is (1 + 2) / 2, the tail (2 + 3 + k) / 2.
    assert run.values["lowest_group"].tolist() == [1.5, 1.5, 1.5]
    assert run.values["tail"].tolist() == [2.5, 3.0, 3.5]
    for k in range(3):
        row = run.row(0, k)
        assert "token_ids" not in row and "token_confidence" not in row and row["step_texts"][1] == f"weak step of {k}"


def test_reducer_refuses_missing_shards(tmp_path):
    shards = tmp_path / "shards"
    ShardWriter(shards, {0: 3, 1: 3}).add(fake_rows(0, 0, 3, 0, 0))
    with pytest.raises(PipelineError, match="shards 1 are missing"):
        reduce_run(shards, tmp_path / "best.jsonl", plan=ShardPlan(planned_shards({0: 1, 1: 1}, 3), ""))
    partial = reduce_run(
        shards, tmp_path / "best.jsonl", plan=ShardPlan(planned_shards({0: 1, 1: 1}, 3), ""), allow_partial=True
    )
    assert partial.partial and partial.missing_shards == [1]
    assert read_shards(shards).num_rows == 3
