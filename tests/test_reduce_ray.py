"""Inside a Ray job (jobs.main compares after its actors ran, with Ray up) the grading runs as Ray tasks."""

import json
from pathlib import Path

import pyarrow as pa

from ray_pipeline.config import RunConfig
from ray_pipeline.report import compare_run
from ray_pipeline.selection import SelectionParams
from ray_pipeline.shards import SHARD_SCHEMA, ShardWriter

DATA = Path(__file__).resolve().parent / "data"


def test_ray_tasks_grade_as_the_local_pool_does(joined_ray, tmp_path):
    import ray

    rows = [json.loads(line) for line in (DATA / "reduce_golden_rows.jsonl").read_text().splitlines()]
    full = [{name: row.get(name) for name in SHARD_SCHEMA.names} | {"shard_id": 0} for row in rows]
    ShardWriter(tmp_path / "shards", {0: len(full)}).add(pa.Table.from_pylist(full, schema=SHARD_SCHEMA))
    RunConfig(num_return_sequences=8).save(tmp_path / "config.json")
    params = SelectionParams(answer_extraction="math-verify")
    local = compare_run(tmp_path, params, workers=1)
    calls = []
    original = ray.remote

    def counting_remote(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    ray.remote = counting_remote
    try:
        spread = compare_run(tmp_path, params)
    finally:
        ray.remote = original
    assert calls, "the grading did not go to Ray tasks"
    for comparison in (local, spread):
        comparison.pop("stage_s"), comparison.pop("reduce_s")
    assert spread == local
