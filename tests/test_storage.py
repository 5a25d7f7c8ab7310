"""Run-folder storage through pyarrow.fs: local paths, file:// URIs, and S3 on a local moto server."""

import json
import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from test_shards_reduce import fake_rows

from ray_pipeline.config import RunConfig
from ray_pipeline.errors import PipelineError
from ray_pipeline.manifest import Manifest
from ray_pipeline.reduce import reduce_run
from ray_pipeline.run_folder import ShardPlan, shards_to_run
from ray_pipeline.shards import (
    PlannedShard,
    ShardWriter,
    check_shard,
    planned_shards,
    read_shards,
    remove_stale_temporaries,
    shard_path,
)
from ray_pipeline.storage import StorageError, StoragePath


def test_plain_paths_are_local_and_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = StoragePath.parse("results")
    assert isinstance(relative.fs, pafs.LocalFileSystem) and relative.path == str(tmp_path / "results")
    assert str(relative) == str(tmp_path / "results")
    assert StoragePath.parse("~/x").path == os.path.expanduser("~/x")
    child = relative / "run" / "shards"
    assert (child.name, child.parent.name, str(child.parent)) == ("shards", "run", str(tmp_path / "results" / "run"))
    assert StoragePath.parse(child) is child and StoragePath.parse(tmp_path).path == str(tmp_path)


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_local_operations(tmp_path, as_uri):
    root = StoragePath.parse(f"file://{tmp_path}" if as_uri else str(tmp_path))
    assert isinstance(root.fs, pafs.LocalFileSystem) and str(root) == str(tmp_path)
    folder = root / "run"
    note = folder / "note.txt"
    assert not note.exists() and not folder.is_dir() and folder.files() == []
    note.write_text("first")
    note.write_text("second ✓")
    assert note.read_text() == "second ✓" and note.is_file() and folder.is_dir()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["note.txt"]  # no temporary left
    (folder / "shard-00001.parquet").write_parquet(pa.table({"a": [1, 2]}))
    (folder / "shard-00000.parquet").write_bytes(b"x")
    (folder / "sub").mkdir()
    assert [p.name for p in folder.files("shard-*.parquet")] == ["shard-00000.parquet", "shard-00001.parquet"]
    assert [p.name for p in folder.files()] == ["note.txt", "shard-00000.parquet", "shard-00001.parquet"]
    with (folder / "shard-00001.parquet").open_input_file() as source:
        assert pq.read_table(source).column("a").to_pylist() == [1, 2]
    note.delete()
    note.delete()  # a missing file is no error
    assert not note.exists()
    folder.delete_contents()
    assert folder.is_dir() and list((tmp_path / "run").iterdir()) == []
    (root / "absent").delete_contents()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = StoragePath.parse(tmp_path) / "data.bin"
    target.write_bytes(b"old")

    def broken(out):
        out.write(b"half")
        raise OSError(5, "disk gone")

    with pytest.raises(StorageError, match="cannot write .*data.bin: Input/output error"):
        target._write_atomically(broken)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_missing_file_and_unwritable_folder_are_one_line_errors(tmp_path):
    missing = StoragePath.parse(tmp_path) / "missing.json"
    with pytest.raises(PipelineError) as err:
        missing.read_text()
    assert str(err.value) == (f"cannot read {missing}: No such file or directory; check the path and its permissions")
    (tmp_path / "blocker").write_text("")
    with pytest.raises(PipelineError, match="cannot write .*blocker/sub/x: Not a directory"):
        (StoragePath.parse(tmp_path) / "blocker" / "sub" / "x").write_text("")


@pytest.mark.parametrize("uri", ["ftp://host/x", "s3://", "s3://?region=us-east-1"])
def test_malformed_uris_are_refused(uri):
    with pytest.raises(PipelineError, match="is not a usable location"):
        StoragePath.parse(uri)


def test_unreachable_store_is_a_one_line_error_naming_location_and_what_to_check():
    # Nothing listens on port 1; one attempt keeps the test fast (from_uri takes the SDK's 3).
    fs = pafs.S3FileSystem(
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        endpoint_override="127.0.0.1:1",
        scheme="http",
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    )
    run = StoragePath(fs, "bucket/results/run", "s3://")
    for action in (lambda: (run / "x.json").write_text("{}"), run.files, (run / "manifest.json").is_file):
        with pytest.raises(PipelineError) as err:
            action()
        message = str(err.value)
        assert "\n" not in message and "s3://bucket/results/run" in message
        assert message.endswith("the endpoint and that the bucket exists") and "check the credentials" in message


def test_s3_paths_and_operations(s3):
    root = s3.path("ops")
    assert str(root) == "s3://bucket/ops" and str(root / "a.txt") == "s3://bucket/ops/a.txt"
    assert root.files() == [] and not (root / "a.txt").exists()
    (root / "a.txt").write_text("hello")
    (root / "b.bin").write_bytes(b"\x00\x01")
    root.mkdir()
    assert (root / "a.txt").is_file() and root.is_dir() and (root / "b.bin").read_bytes() == b"\x00\x01"
    assert [p.name for p in root.files()] == ["a.txt", "b.bin"] and [p.name for p in root.files("*.txt")] == ["a.txt"]
    (root / "a.txt").delete()
    (root / "a.txt").delete()
    assert [p.name for p in root.files()] == ["b.bin"]
    root.delete_contents()
    assert root.files() == []
    with pytest.raises(PipelineError, match="cannot write s3://nobucket/x/y: .*NO_SUCH_BUCKET.*the bucket exists"):
        StoragePath.parse(s3.uri("x/y").replace("s3://bucket/", "s3://nobucket/")).write_text("")


def test_shards_manifest_and_reducer_on_s3(s3, tmp_path):
    run = s3.path("unit/run")
    shards = run / "shards"
    commits = []
    writer = ShardWriter(shards, {0: 6, 1: 3}, on_commit=lambda s, p, e: commits.append(str(p)), fingerprint="abc")
    writer.add(pa.concat_tables([fake_rows(0, 0, 3, 1, 1), fake_rows(1, 0, 3, 0, 2), fake_rows(2, 1, 3, -1, 0)]))
    assert commits == [
        "s3://bucket/unit/run/shards/shard-00000.parquet",
        "s3://bucket/unit/run/shards/shard-00001.parquet",
    ]
    assert [p.name for p in shards.files()] == ["shard-00000.parquet", "shard-00001.parquet"]  # no temporaries
    assert check_shard(shard_path(shards, 0), PlannedShard(0, 2, 3), "abc") is None
    assert check_shard(shard_path(shards, 0), PlannedShard(0, 2, 3), "other").startswith("written by another")
    assert check_shard(shard_path(shards, 2), PlannedShard(3, 1, 3), "abc") == "missing"
    remove_stale_temporaries(shards)
    assert read_shards(shards, ["problem_id"]).column("problem_id").to_pylist() == ["p0"] * 3 + ["p1"] * 3 + ["p2"] * 3

    manifest = Manifest.plan("run", "0", "model", {"seed": 0}, {0: 6, 1: 3}, 3)
    manifest.save(run)
    assert Manifest.load(run) == manifest and Manifest.load(s3.path("unit/absent")) is None
    RunConfig(limit=3).save(run / "config.json")
    assert RunConfig.load(run / "config.json") == RunConfig(limit=3)

    shard_path(shards, 1).delete()
    with pytest.raises(PipelineError, match="shards 1 are missing from s3://bucket/unit/run/shards"):
        reduce_run(shards, run / "best.jsonl", plan=ShardPlan(planned_shards({0: 2, 1: 1}, 3), "abc"))
    summary = reduce_run(
        shards, run / "best.jsonl", plan=ShardPlan(planned_shards({0: 2, 1: 1}, 3), "abc"), allow_partial=True
    )
    assert summary.output == "s3://bucket/unit/run/best.jsonl" and summary.missing_shards == [1]
    lines = [json.loads(line) for line in (run / "best.jsonl").read_text().splitlines()]
    assert [line["candidate_index"] for line in lines] == [1, 2]
    assert "best.jsonl" in [p.name for p in run.files()]

    with pytest.raises(PipelineError, match="shard 0 in s3://bucket/unit/run/shards was written by another"):
        shards_to_run(manifest, s3.path("unit/run/shards"), [], False)
    ShardWriter(shards, {0: 6}, fingerprint=manifest.fingerprint_hash).add(
        pa.concat_tables([fake_rows(0, 0, 3, 1, 1), fake_rows(1, 0, 3, 0, 2)])
    )
    assert shards_to_run(manifest, shards, [], False) == ([1], [])
    shard_path(shards, 0).write_bytes(b"PAR1 truncated")
    assert shards_to_run(manifest, shards, [], False) == ([0, 1], ["shard 0: unreadable (ArrowInvalid): redo"])
