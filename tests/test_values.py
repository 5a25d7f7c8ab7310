"""Per-candidate values by declaration (ray_pipeline/values.py): `Candidates`, the reducer's loop, the columns it
reads and the block parameters all follow from `VALUES`, so a value of a stored column is one declaration."""

import json

import numpy as np
import pyarrow as pa
import pytest

from ray_pipeline import selection
from ray_pipeline.columns import COLUMNS
from ray_pipeline.graded_run import grade_run, reducer_columns
from ray_pipeline.reduce import reduce_run
from ray_pipeline.run_folder import ShardPlan
from ray_pipeline.selection import BLOCK_PARAMS, SelectionParams, best_scored, method
from ray_pipeline.shards import SHARD_SCHEMA, ShardWriter, planned_shards
from ray_pipeline.values import VALUES, value

pytestmark = pytest.mark.fast


def shard_rows(problem: int, logprobs: list[float], correct: int) -> pa.Table:
    rows = []
    for k, logprob in enumerate(logprobs):
        row = dict.fromkeys(SHARD_SCHEMA.names)
        row.update(
            problem_id=f"p{problem}", problem_index=problem, shard_id=0, problem=f"question {problem}", gold="1",
            candidate_index=k, text=f"so \\boxed{{{int(k == correct)}}}", token_count=3, mean_entropy=1.0,
            mean_self_certainty=2.0, mean_logprob=logprob, token_confidence=[1.0, 2.0, 3.0], vocab_size=100,
            step_self_certainty=[2.0], step_entropy=[1.0], step_texts=["one step"], backend="fake",
        )  # fmt: skip
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)


def write_two_problems(folder):
    # p0: candidate 0 is right and has the highest mean log-prob; p1: candidate 2 is right, candidate 1 the highest.
    ShardWriter(folder, {0: 6}).add(pa.concat_tables([shard_rows(0, [-1, -2, -3], 0), shard_rows(1, [-3, -1, -2], 2)]))


def test_candidates_the_reducer_and_its_columns_follow_the_declarations(tmp_path):
    write_two_problems(tmp_path)
    run = grade_run(tmp_path, SelectionParams())
    assert list(run.values) == list(VALUES)
    assert all(len(array) == 6 for array in run.values.values())
    ((_, block),) = run.blocks()
    assert {name: getattr(block, name).shape for name in VALUES} == dict.fromkeys(VALUES, (2, 3))
    assert {c for v in VALUES.values() for c in v.reads} - {"gold"} <= set(reducer_columns())
    assert BLOCK_PARAMS == ("answer_extraction", "lambda_weight", "deepconf_window")
    with pytest.raises(TypeError, match="declared values"):
        selection.Candidates(label=np.zeros((1, 1)))
    with pytest.raises(ValueError, match="declared twice"):
        value("tail")(lambda chunk: None)


@pytest.fixture
def mean_logprob():
    """What README's guide says a new value and its method take: one `@value` (of a column the scorer stores and
    the reducer did not read) and one `@method`, nothing else."""
    saved_values, saved_methods, saved_scored = dict(VALUES), dict(selection.METHODS), set(selection.SCORE_METHODS)

    @value("mean_logprob", reads=("mean_logprob",))
    def _mean_logprob(chunk):
        return chunk.floats("mean_logprob")

    @method("mean-logprob")
    def _by_mean_logprob(block, params):
        return best_scored(block, block.mean_logprob, params)

    yield
    VALUES.clear(), VALUES.update(saved_values)
    selection.METHODS.clear(), selection.METHODS.update(saved_methods)
    selection.SCORE_METHODS.clear(), selection.SCORE_METHODS.update(saved_scored)


def test_a_value_of_a_stored_column_is_one_declaration_and_its_method_one_function(tmp_path, mean_logprob):
    assert not next(c for c in COLUMNS if c.name == "mean_logprob").selection
    assert "mean_logprob" in reducer_columns()
    shards = tmp_path / "shards"
    write_two_problems(shards)
    out = tmp_path / "best.jsonl"
    summary = reduce_run(shards, out, method="mean-logprob", plan=ShardPlan(planned_shards({0: 2}, 3), ""))
    picks = [json.loads(line)["candidate_index"] for line in out.read_text().splitlines()]
    assert picks == [0, 1] and summary.accuracy == pytest.approx(0.5)
