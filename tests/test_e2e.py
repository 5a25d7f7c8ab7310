"""End to end through real Ray with the real SmolLM2 weights (transformers backend), and the in-process seam's
shards against the Ray job's.

The run is the session's shared `main_run` (tests/shared_runs.py: jobs.main --method all, which runs what
jobs.infer runs and then compares the methods).
"""

import json
from hashlib import sha256

import pyarrow.parquet as pq

from conftest import run_in_process
from ray_pipeline.problem_set import embedded_records
from ray_pipeline.shards import SHARD_SCHEMA

pytest_plugins = ["shared_runs"]

# Both end-to-end runs (this module's and test_vllm_e2e's): 4 problems in 2 shards, run_id RUN_ID.
DATASET, RUN_ID = "embedded:4", "run"

PROGRESS = (
    "[1/2] Generating candidates -> ",
    "[2/2] Evaluating and selecting best answers -> ",
    "✅ Done! Final results saved to: ",
)


def check_outputs(out, proc, backend, n=2, max_tokens=48):
    """Assertions shared by the end-to-end runs of every backend (`proc`: what has the job's `stdout`)."""
    lines = proc.stdout.splitlines()
    positions = [next(i for i, line in enumerate(lines) if line.startswith(p)) for p in PROGRESS]
    assert positions == sorted(positions)
    best = out / lines[positions[2]].split("saved to: ")[1].rsplit("/", 1)[1]
    assert best.name.startswith("embedded4_best_SmolLM2-135M-Instruct_") and best.suffix == ".jsonl"

    shards = sorted((out / RUN_ID / "shards").glob("*.parquet"))
    assert [s.name for s in shards] == ["shard-00000.parquet", "shard-00001.parquet"]
    rows = []
    for shard in shards:
        table = pq.read_table(shard)
        assert table.schema.remove_metadata() == SHARD_SCHEMA
        assert table.num_rows == 2 * n
        rows += table.to_pylist()
    assert sorted((r["problem_index"], r["candidate_index"]) for r in rows) == [
        (i, k) for i in range(4) for k in range(n)
    ]
    for r in rows:
        assert r["backend"] == backend
        assert r["token_count"] == len(r["token_ids"]) == len(r["token_entropy"]) == len(r["token_logprob"]) > 0
        assert min(r["token_entropy"]) >= 0 and min(r["token_self_certainty"]) >= 0
        assert r["mean_entropy"] >= 0 and r["mean_self_certainty"] >= 0 and r["step_min_self_certainty"] >= 0
        assert r["token_count"] <= max_tokens and r["finish_reason"] in ("stop", "length")

    records = [json.loads(line) for line in best.read_text().splitlines()]
    assert len(records) == 4
    gold = embedded_records(DATASET)
    for record, want in zip(records, gold):
        assert list(record)[:2] == ["question", "answer"]
        assert {"unique_id", "pred", "gold", "correct", "score"} <= set(record)
        assert record["question"] == want["problem"] and record["unique_id"] == want["unique_id"]
        assert record["gold"] == want["answer"]
    summary = json.loads((out / RUN_ID / "summary.json").read_text())
    assert (summary["problems"], summary["candidates"], summary["backend"]) == (4, 4 * n, backend)
    assert 0 <= summary["accuracy"] <= summary["pass_at_n"] <= 1
    assert json.loads((out / RUN_ID / "config.json").read_text())["num_return_sequences"] == n
    return rows


def test_pipeline_end_to_end_hf(main_run):
    assert (main_run.dataset, main_run.run_dir.name) == (DATASET, RUN_ID)
    check_outputs(main_run.out, main_run, "hf", main_run.n, main_run.max_tokens)


def test_the_in_process_seam_writes_the_ray_jobs_shards_bit_for_bit(main_run, tmp_path):
    """run.execute(..., in_process=True) on the shared run's configuration, as jobs.infer takes it: every shard file
    equals the Ray job's byte for byte (samples, scores, self-eval, CoE, the fingerprint in its metadata). This is
    what lets a test check on the seam what is not Ray's behaviour."""
    printed = run_in_process("jobs.infer", *main_run.infer_args, "--output_dir", str(tmp_path))
    assert "✅ Done! Final results saved to: " in printed

    ray_shards = sorted((main_run.run_dir / "shards").glob("*.parquet"))
    seam_shards = sorted((tmp_path / main_run.run_dir.name / "shards").glob("*.parquet"))
    assert [s.name for s in seam_shards] == [s.name for s in ray_shards] == [f"shard-0000{i}.parquet" for i in (0, 1)]
    assert [sha256(s.read_bytes()).hexdigest() for s in seam_shards] == [
        sha256(s.read_bytes()).hexdigest() for s in ray_shards
    ]
