"""End to end on real parts: the embedded problem set through jobs.main with a non-default answer extraction.

Real Ray, the real SmolLM2 weights, real Parquet (the session's shared `main_run`, tests/shared_runs.py: the chat
prompt, `--answer_extraction boxed-then-last-number`): the run's accuracy and pass@N must be what the shards' texts
give under the configured extraction, and jobs.reduce must re-read the answers with another one, no model.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from conftest import run_job
from ray_pipeline.answers import extract_answer, grade
from ray_pipeline.problem_set import embedded_records
from ray_pipeline.selection import METHODS

pytest_plugins = ["shared_runs"]


def _expected(run, run_dir, mode: str) -> tuple[float, float]:
    """pass@N and baseline (first candidate) accuracy recomputed from the shards' texts."""
    problems, n = run.problems, run.n
    rows = pq.read_table(run_dir / "shards", columns=["problem_id", "candidate_index", "text"]).to_pylist()
    gold = {row["unique_id"]: row["answer"] for row in embedded_records(run.dataset)}
    correct = {
        (r["problem_id"], r["candidate_index"]): grade(extract_answer(r["text"] or "", mode), gold[r["problem_id"]])
        for r in rows
    }
    assert len(correct) == problems * n
    any_right = sum(any(correct[(pid, i)] for i in range(n)) for pid in gold)
    first_right = sum(correct[(pid, 0)] for pid in gold)
    return any_right / problems, first_right / problems


def test_embedded_set_with_last_number_extraction_then_reread_boxed(main_run, tmp_path):
    extraction = main_run.answer_extraction
    assert extraction == "boxed-then-last-number"
    run_dir = main_run.run_dir
    out = main_run.stdout
    for name in METHODS:
        assert f"  {name} " in out or f"  {name:<22} " in out, name
    assert f"Plots: {run_dir / 'accuracy_vs_n.png'}" in out and out.rstrip().endswith(str(run_dir / "report.md"))
    assert json.loads((run_dir / "config.json").read_text())["answer_extraction"] == extraction
    assert f"answer_extraction {extraction}" in (run_dir / "report.md").read_text()

    comparison = json.loads((run_dir / "summary.json").read_text())["comparison"]
    pass_at_n, baseline = _expected(main_run, run_dir, extraction)
    assert comparison["pass_at_n"] == pass_at_n
    assert comparison["methods"]["baseline"]["accuracy"] == baseline

    # jobs.reduce rewrites summary.json and report.md: the shared run stays as the job left it.
    copy = main_run.copy(tmp_path)
    again = run_job("jobs.reduce", str(copy), "--method", "all", "--answer_extraction", "boxed", timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    reread = json.loads((copy / "summary.json").read_text())["comparison"]
    assert reread["params"]["answer_extraction"] == "boxed"
    assert (reread["pass_at_n"], reread["methods"]["baseline"]["accuracy"]) == _expected(main_run, copy, "boxed")
