"""One shard check for the resume and the reducer: every kind of untrustworthy shard, made by mutating a good one.

A run folder from `jobs.bench.reduce.synthesize_run` (manifest, fingerprint, two shards of 3 problems x 4
candidates) gets one of its shards replaced by a mutated copy. The resume's plan (`shard_faults`) must
distrust it, and `jobs.reduce` must refuse it in one line that names the shard and what is wrong,
instead of merging it.
"""

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.bench.reduce import synthesize_run
from jobs.reduce import main as reduce_main
from ray_pipeline.errors import PipelineError
from ray_pipeline.manifest import Manifest
from ray_pipeline.run_folder import choose_shards, shard_faults
from ray_pipeline.shards import FINGERPRINT_KEY, SHARD_SCHEMA, shard_path

pytestmark = pytest.mark.fast


def _with_fingerprint(table: pa.Table, fingerprint: bytes) -> pa.Table:
    return table.replace_schema_metadata({FINGERPRINT_KEY: fingerprint})


def _column(table: pa.Table, name: str, values) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))


def foreign(t):
    return _with_fingerprint(t, b"0123456789abcdef")


def unsigned(t):
    return t.replace_schema_metadata({})


def dropped_column(t):
    return t.drop_columns(["mean_entropy"])


def retyped_column(t):
    return t.set_column(t.schema.get_field_index("token_count"), "token_count", t["token_count"].cast(pa.int64()))


def extra_column(t):
    return t.append_column("surprise", pa.array(np.zeros(t.num_rows)))


def repeated_candidate(t):
    candidates = t["candidate_index"].to_pylist()
    candidates[2] = candidates[1]
    return _column(t, "candidate_index", candidates)


def candidate_beyond_n(t):
    candidates = t["candidate_index"].to_pylist()
    candidates[-1] = 4
    return _column(t, "candidate_index", candidates)


def problem_of_another_shard(t):
    problems = t["problem_index"].to_pylist()
    problems[0] = 0
    return _column(t, "problem_index", problems)


def row_missing(t):
    return t.slice(0, t.num_rows - 1)


def row_repeated(t):
    return pa.concat_tables([t, t.slice(0, 1)])


def mixed_problem_ids(t):
    ids = t["problem_id"].to_pylist()
    ids[1] = "synthetic/elsewhere"
    return _column(t, "problem_id", ids)


MUTATIONS = {
    foreign: "written by another configuration",
    unsigned: "written by another configuration (unknown",
    dropped_column: "schema differs",
    retyped_column: "schema differs",
    extra_column: "schema differs",
    repeated_candidate: "keys differ from the plan: problem 3 candidate 1 appears 2 times, problem 3 candidate 2 is",
    candidate_beyond_n: "outside the plan's problems 3-5 x candidates 0-3",
    problem_of_another_shard: "holds problem 0 candidate 0, outside the plan's problems 3-5",
    row_missing: "11 rows, expected 12",
    row_repeated: "13 rows, expected 12",
    mixed_problem_ids: "problem 3 holds rows of several problem ids",
}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    return synthesize_run(tmp_path_factory.mktemp("check") / "run", 6, 4, tokens=16, shard_size=3, seed=11)


@pytest.fixture
def run(good_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(good_run, copy)
    return copy


def test_a_good_run_passes_both(run, capsys):
    manifest = Manifest.load(run)
    assert shard_faults(manifest, run / "shards") == {0: None, 1: None}
    assert reduce_main([str(run), "--method", "self-consistency"]) == 0


@pytest.mark.parametrize("mutate", list(MUTATIONS), ids=lambda f: f.__name__)
def test_the_resume_and_the_reducer_refuse_a_mutated_shard_by_name(run, mutate, capsys):
    path = shard_path(run / "shards", 1)
    good = pq.read_table(path)
    pq.write_table(mutate(good), path)
    want = MUTATIONS[mutate]
    manifest = Manifest.load(run)

    fault = shard_faults(manifest, run / "shards")[1]
    assert fault is not None and want in fault, fault
    if want.startswith("written by another"):
        with pytest.raises(PipelineError, match="remove it, or pass --reprocess_shards 1"):
            choose_shards(manifest, {0: None, 1: fault}, run / "shards", [], False)
    else:
        assert choose_shards(manifest, {0: None, 1: fault}, run / "shards", [], False)[0] == [1]

    capsys.readouterr()
    for method in ("all", "baseline"):
        assert reduce_main([str(run), "--method", method]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and f"shard 1 in {run / 'shards'} cannot be used: " in lines[0], lines
        assert want in lines[0]
        redo = "--reprocess_shards 1" if want.startswith("written by another") else "the run resumes with:"
        assert redo in lines[0]
    # The refusal changed nothing: the mutated shard and the good one are as they were.
    assert pq.read_table(shard_path(run / "shards", 0)).num_rows == 12
    assert not (run / "best_baseline.jsonl").exists()


def test_a_run_without_manifest_names_a_shard_of_another_schema(run, capsys):
    (run / "manifest.json").unlink()
    path = shard_path(run / "shards", 1)
    pq.write_table(pa.table({"problem_index": [3], "text": [1.5]}), path)
    assert reduce_main([str(run), "--method", "baseline"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: shard ") and "shard-00001.parquet cannot be read (schema differs" in err
    assert SHARD_SCHEMA.get_field_index("text") >= 0


def test_a_shard_without_a_column_added_later_is_read_with_nulls(run, monkeypatch, capsys):
    """Columns added after a shard format existed (columns.Column.later) may be absent; any other may not."""
    import ray_pipeline.shards as shards

    for shard in (0, 1):
        path = shard_path(run / "shards", shard)
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["mean_logprob"]).replace_schema_metadata(table.schema.metadata), path)
    manifest = Manifest.load(run)
    assert shard_faults(manifest, run / "shards")[1] == "schema differs from the shard schema"
    monkeypatch.setattr(shards, "LATER_COLUMNS", frozenset({"mean_logprob"}))
    assert shard_faults(manifest, run / "shards") == {0: None, 1: None}
    assert reduce_main([str(run), "--method", "entropy"]) == 0
    assert shards.read_shards(run / "shards", ["mean_logprob"]).column("mean_logprob").null_count == 24
