"""Run manifest, shard validation and exactly-once commits, on small fake shards (no model)."""

import dataclasses

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_pipeline.config import RunConfig
from ray_pipeline.config.stored import LATER_FIELDS
from ray_pipeline.data import load_problems
from ray_pipeline.errors import PipelineError
from ray_pipeline.manifest import COMMITTED, FAILED, Manifest, differences, fingerprint_hash
from ray_pipeline.run_folder import check_same_run, fingerprint, shards_to_run
from ray_pipeline.shards import (
    SHARD_SCHEMA,
    PlannedShard,
    ShardWriter,
    check_shard,
    remove_stale_temporaries,
    shard_path,
)


def rows(shard_id, problems, n=2):
    out = []
    for p in problems:
        for k in range(n):
            row = {name: None for name in SHARD_SCHEMA.names}
            row.update(problem_id=f"p{p}", problem_index=p, shard_id=shard_id, candidate_index=k, token_count=1)
            out.append(row)
    return pa.Table.from_pylist(out, schema=SHARD_SCHEMA)


@pytest.fixture
def problems():
    return load_problems("embedded:4", shard_size=2)


def test_fingerprint_changes_with_every_output_setting(problems, tmp_path):
    base = RunConfig(backend="hf")
    fp = fingerprint(base, problems, "some/hub-id")
    assert fp == fingerprint(base, problems, "some/hub-id")
    for change in (
        {"temperature": 0.7},
        {"seed": 1},
        {"num_return_sequences": 8},
        {"max_tokens": 64},
        {"prompt": "chat"},
        {"backend": "vllm"},
        {"dtype": "float32"},
        {"shard_size": 3},
        {"backend": "vllm", "reproducible": True},
    ):
        other = fingerprint(dataclasses.replace(base, **change), problems, "some/hub-id")
        assert [d.split(" ")[0] for d in differences(fp, other)] == list(change)
    assert differences(fp, fingerprint(base, problems.slice(0, 3), "some/hub-id"))[0].startswith("dataset ")
    # Execution settings do not change outputs and must not block a resume.
    same = dataclasses.replace(base, num_scorers=3, output_dir="elsewhere", method="entropy", alpha=0.9)
    assert fingerprint(same, problems, "some/hub-id") == fp


# The online settings, each with a value other than its earlier one.
ONLINE_OTHER = {"warmup_traces": 4, "deepconf_percentile": 10.0, "consensus": 0.9, "consensus_wave": 4}


@pytest.mark.parametrize("name", sorted(LATER_FIELDS))
def test_a_later_field_at_its_earlier_value_keeps_earlier_fingerprints(problems, name):
    """Runs made before the field existed resume: their fingerprint, and default folder, stay the same."""
    # vLLM with --reproducible, where every later field changes values (the online ones in an online run), holding
    # the earlier value of this one.
    base = RunConfig(backend="vllm", reproducible=True)
    if name in ONLINE_OTHER:
        base = dataclasses.replace(base, generation="deepconf-online", temperature=0.7, num_return_sequences=32)
    base = dataclasses.replace(base, **{name: LATER_FIELDS[name]})
    fp = fingerprint(base, problems, "x/y")
    assert name not in fp
    earlier = dict(fp)  # what such a run stored
    assert not differences(earlier, fingerprint(base, problems, "x/y"))
    other = ONLINE_OTHER.get(name, not LATER_FIELDS[name])
    changed = fingerprint(dataclasses.replace(base, **{name: other}), problems, "x/y")
    assert differences(earlier, changed) and fingerprint_hash(changed) != fingerprint_hash(fp)


def test_manifest_round_trip_and_refusal(problems, tmp_path):
    fp = fingerprint(RunConfig(backend="hf"), problems, "x/y")
    manifest = Manifest.plan("run", "20261128_000000", "M", fp, {0: 4, 1: 4}, 2)
    manifest.set_status(1, COMMITTED)
    manifest.save(tmp_path)
    loaded = Manifest.load(tmp_path)
    assert loaded == manifest and loaded.with_status(COMMITTED) == [1]
    other_config = RunConfig(backend="hf", temperature=0.5, seed=3)
    with pytest.raises(PipelineError) as err:
        check_same_run(loaded.fingerprint, fingerprint(other_config, problems, "x/y"), tmp_path, other_config)
    assert "seed 0 -> 3" in str(err.value) and "temperature 0.1 -> 0.5" in str(err.value)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(PipelineError, match="not a readable manifest"):
        Manifest.load(tmp_path)


def test_check_shard_trusts_only_complete_files_of_this_run(tmp_path):
    writer = ShardWriter(tmp_path, {0: 4}, fingerprint="abc")
    writer.add(rows(0, [0, 1]))
    path = shard_path(tmp_path, 0)
    planned = PlannedShard(first_problem=0, problems=2, candidates=2)
    assert check_shard(path, planned, "abc") is None
    assert check_shard(path, PlannedShard(0, 3, 2), "abc") == "4 rows, expected 6"
    assert check_shard(path, planned, "xyz").startswith("written by another configuration")
    assert check_shard(shard_path(tmp_path, 1), planned, "abc") == "missing"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert check_shard(path, planned, "abc").startswith("unreadable")
    pq.write_table(pa.table({"x": [1, 2, 3, 4]}), path)
    assert check_shard(path, planned, "abc") == "schema differs from the shard schema"


def test_writer_keeps_one_copy_of_a_retried_row(tmp_path):
    writer = ShardWriter(tmp_path, {0: 4})
    writer.add(rows(0, [0]))
    writer.add(rows(0, [0]))  # a retried task delivers problem 0 again
    assert writer.committed == []
    writer.add(rows(0, [1]))
    table = pq.read_table(shard_path(tmp_path, 0))
    assert table.num_rows == 4
    assert list(zip(table["problem_id"].to_pylist(), table["candidate_index"].to_pylist())) == [
        ("p0", 0),
        ("p0", 1),
        ("p1", 0),
        ("p1", 1),
    ]
    # Delivered again after its shard committed (a retry that raced the commit): dropped, the file stays.
    committed = shard_path(tmp_path, 0).read_bytes()
    assert writer.add(rows(0, [1])).num_rows == 0
    assert shard_path(tmp_path, 0).read_bytes() == committed


def test_shards_to_run(tmp_path, problems):
    fp = fingerprint(RunConfig(backend="hf"), problems, "x/y")
    manifest = Manifest.plan("run", "s", "M", fp, {0: 4, 1: 4, 2: 4}, 2)
    writer = ShardWriter(tmp_path, {0: 4, 1: 4, 2: 4}, fingerprint=fingerprint_hash(fp))
    writer.add(pa.concat_tables([rows(0, [0, 1]), rows(1, [2, 3])]))
    manifest.set_status(1, FAILED)
    assert shards_to_run(manifest, tmp_path, [], False) == ([2], [])
    assert shards_to_run(manifest, tmp_path, [], True)[0] == [1, 2]
    assert shards_to_run(manifest, tmp_path, [0], False)[0] == [0, 2]
    (tmp_path / ".shard-00002.parquet.tmp-123").write_bytes(b"partial")
    remove_stale_temporaries(tmp_path)
    assert not list(tmp_path.glob(".*"))
    shard_path(tmp_path, 0).write_bytes(b"PAR1 truncated")
    todo, notes = shards_to_run(manifest, tmp_path, [], False)
    assert todo == [0, 2] and notes[0].startswith("shard 0: unreadable")
    other = ShardWriter(tmp_path, {0: 4}, fingerprint="another")
    other.add(rows(0, [0, 1]))
    with pytest.raises(PipelineError, match="shard 0 .* written by another configuration"):
        shards_to_run(manifest, tmp_path, [], False)
    with pytest.raises(PipelineError, match=r"names shards \[7\]"):
        shards_to_run(manifest, tmp_path, [7], False)
