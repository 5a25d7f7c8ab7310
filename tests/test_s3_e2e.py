"""End to end onto S3 (a local moto server): real Ray (the session's), resume after a lost shard object.

The job's driver writes every object (the shards through its ShardWriter, the manifest, the reports): the actors
only generate and score, so the moto credentials need to reach the driver alone, and the tiny model serves (what is
checked is the storage, not the model's answers).
"""

import json

from conftest import S3, run_job
from ray_pipeline.shards import shard_path


def test_run_resume_and_reduce_on_s3(ray_cluster, tiny_model, s3):
    run_uri = s3.uri("results/s3run")
    args = [
        "--dataset", "embedded:4", "--shard_size", "2", "--num_return_sequences", "2",
        "--max_tokens", "16", "--backend", "hf", "--seed", "5", "--score_batch_size", "4", "--model_path", tiny_model,
        "--output_dir", s3.uri("results"), "--run_id", "s3run",
    ]  # fmt: skip
    first = run_job("jobs.infer", *args, env=S3.ENV, cluster=ray_cluster)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "[1/2] Generating candidates -> s3://bucket/results/s3run/ (4 problems x 2 candidates" in first.stdout
    best_uri = first.stdout.split("Final results saved to: ")[1].splitlines()[0].strip()
    assert best_uri.startswith("s3://bucket/results/embedded4_best_") and "?" not in best_uri
    best = s3.path(best_uri.removeprefix("s3://bucket/"))
    before = best.read_text()
    shards = s3.path("results/s3run/shards")
    assert [p.name for p in shards.files()] == ["shard-00000.parquet", "shard-00001.parquet"]
    kept = shard_path(shards, 0).read_bytes()

    shard_path(shards, 1).delete()
    again = run_job("jobs.infer", *args, env=S3.ENV, cluster=ray_cluster)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 of 2 shards to do" in again.stdout
    assert shard_path(shards, 0).read_bytes() == kept and shard_path(shards, 1).is_file()
    # Seeds per problem and one scorer batch per shard: the redone shard scores exactly as before.
    assert best.read_text() == before
    manifest = json.loads(s3.path("results/s3run/manifest.json").read_text())
    assert {s["status"] for s in manifest["shards"].values()} == {"committed"}

    report = run_job("jobs.reduce", run_uri, "--method", "all", env=S3.ENV)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "Comparison saved to: s3://bucket/results/s3run/report.md" in report.stdout
    run_files = {p.name for p in s3.path("results/s3run").files()}
    assert {"report.md", "debug.jsonl", "summary.json", "config.json", "accuracy_vs_n.png"} <= run_files
    assert json.loads(s3.path("results/s3run/summary.json").read_text())["comparison"]["problems"] == 4
