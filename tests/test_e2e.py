"""End to end through local Ray with the real SmolLM2 weights (transformers backend)."""

import json

import pyarrow.parquet as pq

from conftest import run_job
from ray_pipeline.problem_set import embedded_records
from ray_pipeline.shards import SHARD_SCHEMA

DATASET = "embedded:4"

PROGRESS = (
    "[1/2] Generating candidates -> ",
    "[2/2] Evaluating and selecting best answers -> ",
    "✅ Done! Final results saved to: ",
)


def run_small(tmp_path, backend, *extra):
    out = tmp_path / "results"
    args = [
        "--dataset",
        DATASET,
        "--num_return_sequences",
        "2",
        "--max_tokens",
        "48",
        "--shard_size",
        "2",
        "--backend",
        backend,
        "--output_dir",
        str(out),
        "--run_id",
        "run",
        *extra,
    ]
    proc = run_job("jobs.infer", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def check_outputs(out, proc, backend):
    """Assertions shared by the end-to-end runs of every backend."""
    lines = proc.stdout.splitlines()
    positions = [next(i for i, line in enumerate(lines) if line.startswith(p)) for p in PROGRESS]
    assert positions == sorted(positions)
    best = out / lines[positions[2]].split("saved to: ")[1].rsplit("/", 1)[1]
    assert best.name.startswith("embedded4_best_SmolLM2-135M-Instruct_") and best.suffix == ".jsonl"

    shards = sorted((out / "run" / "shards").glob("*.parquet"))
    assert [s.name for s in shards] == ["shard-00000.parquet", "shard-00001.parquet"]
    rows = []
    for shard in shards:
        table = pq.read_table(shard)
        assert table.schema.remove_metadata() == SHARD_SCHEMA
        assert table.num_rows == 4
        rows += table.to_pylist()
    assert sorted((r["problem_index"], r["candidate_index"]) for r in rows) == [
        (i, k) for i in range(4) for k in (0, 1)
    ]
    for r in rows:
        assert r["backend"] == backend
        assert r["token_count"] == len(r["token_ids"]) == len(r["token_entropy"]) == len(r["token_logprob"]) > 0
        assert min(r["token_entropy"]) >= 0 and min(r["token_self_certainty"]) >= 0
        assert r["mean_entropy"] >= 0 and r["mean_self_certainty"] >= 0 and r["step_min_self_certainty"] >= 0
        assert r["token_count"] <= 48 and r["finish_reason"] in ("stop", "length")

    records = [json.loads(line) for line in best.read_text().splitlines()]
    assert len(records) == 4
    gold = embedded_records(DATASET)
    for record, want in zip(records, gold):
        assert list(record)[:2] == ["question", "answer"]
        assert {"unique_id", "pred", "gold", "correct", "score"} <= set(record)
        assert record["question"] == want["problem"] and record["unique_id"] == want["unique_id"]
        assert record["gold"] == want["answer"]
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert (summary["problems"], summary["candidates"], summary["backend"]) == (4, 8, backend)
    assert 0 <= summary["accuracy"] <= summary["pass_at_n"] <= 1
    assert json.loads((out / "run" / "config.json").read_text())["num_return_sequences"] == 2
    return rows


def test_pipeline_end_to_end_hf(tmp_path):
    out, proc = run_small(tmp_path, "hf")
    check_outputs(out, proc, "hf")
