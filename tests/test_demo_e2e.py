"""End to end on real parts: the embedded problem set through jobs.main with a non-default answer extraction.

Real Ray, the real SmolLM2 weights, real Parquet: the run's accuracy and pass@N must be what the shards' texts
give under the configured extraction, and jobs.reduce must re-read the answers with another one, no model.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from conftest import run_job
from ray_pipeline.answers import extract_answer, grade
from ray_pipeline.problem_set import embedded_records
from ray_pipeline.selection import METHODS

PROBLEMS, N = 3, 2


def _expected(run_dir, mode: str) -> tuple[float, float]:
    """pass@N and baseline (first candidate) accuracy recomputed from the shards' texts."""
    rows = pq.read_table(run_dir / "shards", columns=["problem_id", "candidate_index", "text"]).to_pylist()
    gold = {row["unique_id"]: row["answer"] for row in embedded_records(f"embedded:{PROBLEMS}")}
    correct = {
        (r["problem_id"], r["candidate_index"]): grade(extract_answer(r["text"] or "", mode), gold[r["problem_id"]])
        for r in rows
    }
    assert len(correct) == PROBLEMS * N
    any_right = sum(any(correct[(pid, i)] for i in range(N)) for pid in gold)
    first_right = sum(correct[(pid, 0)] for pid in gold)
    return any_right / PROBLEMS, first_right / PROBLEMS


def test_embedded_set_with_last_number_extraction_then_reread_boxed(tmp_path):
    args = ["--dataset", f"embedded:{PROBLEMS}", "--num_return_sequences", str(N), "--max_tokens", "24"]
    args += ["--prompt", "chat", "--answer_extraction", "boxed-then-last-number", "--method", "all", "--backend", "hf"]
    proc = run_job("jobs.main", *args, "--output_dir", str(tmp_path), "--run_id", "demo", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "demo"
    out = proc.stdout
    for name in METHODS:
        assert f"  {name} " in out or f"  {name:<22} " in out, name
    assert f"Plots: {run_dir / 'accuracy_vs_n.png'}" in out and out.rstrip().endswith(str(run_dir / "report.md"))
    assert json.loads((run_dir / "config.json").read_text())["answer_extraction"] == "boxed-then-last-number"
    assert "answer_extraction boxed-then-last-number" in (run_dir / "report.md").read_text()

    comparison = json.loads((run_dir / "summary.json").read_text())["comparison"]
    pass_at_n, baseline = _expected(run_dir, "boxed-then-last-number")
    assert comparison["pass_at_n"] == pass_at_n
    assert comparison["methods"]["baseline"]["accuracy"] == baseline

    again = run_job("jobs.reduce", str(run_dir), "--method", "all", "--answer_extraction", "boxed", timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    reread = json.loads((run_dir / "summary.json").read_text())["comparison"]
    assert reread["params"]["answer_extraction"] == "boxed"
    assert (reread["pass_at_n"], reread["methods"]["baseline"]["accuracy"]) == _expected(run_dir, "boxed")
