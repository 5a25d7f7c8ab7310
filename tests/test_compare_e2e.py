"""End to end: jobs.main --method all --self_eval through real Ray with the real SmolLM2 weights (the session's
shared `main_run`, tests/shared_runs.py), then jobs.reduce on a copy of its run folder."""

import json

import pyarrow.parquet as pq

from conftest import run_job
from ray_pipeline.report import PLOTS
from ray_pipeline.selection import METHODS

pytest_plugins = ["shared_runs"]


def test_one_run_every_method_then_reselect(main_run, tmp_path):
    problems, candidates = main_run.problems, main_run.n
    assert candidates == 4, "DeepConf's top 10 % below is one candidate only at N 4"
    assert "✅ Done! Final results saved to: " in main_run.stdout and "Comparison saved to" in main_run.stdout
    run_dir = main_run.run_dir

    rows = [r for shard in sorted((run_dir / "shards").glob("*.parquet")) for r in pq.read_table(shard).to_pylist()]
    assert len(rows) == problems * candidates
    for r in rows:
        n, steps = r["token_count"], len(r["step_texts"])
        assert n == len(r["token_confidence"]) > 0 and min(r["token_confidence"]) > 0
        assert steps == len(r["step_self_eval"]) == len(r["step_entropy"]) >= 1
        assert all(0 < p < 1 for p in r["step_self_eval"])
        assert len(r["coe_magnitude"]) == len(r["coe_angle"]) == 30 and r["coe_span_magnitude"] > 0

    comparison = json.loads((run_dir / "summary.json").read_text())["comparison"]
    # deepconf-online is the vote an online run made while generating: a full run has none.
    full_run_methods = set(METHODS) - {"deepconf-online"}
    assert set(comparison["methods"]) == full_run_methods and set(comparison["unavailable"]) == {"deepconf-online"}
    assert (comparison["problems"], comparison["candidates_per_problem"]) == (problems, candidates)
    assert comparison["params"]["answerless_last"] is True and comparison["params"]["borda_score"] == "token"
    for m in comparison["methods"].values():
        assert 0 <= m["answerless_last_changed"] <= problems
        assert 0 <= m["ci95"][0] <= m["accuracy"] <= m["ci95"][1] <= 1
        assert m["accuracy"] <= comparison["pass_at_n"]
        assert sum(v["n"] for v in m["by_level"].values()) == sum(v["n"] for v in m["by_subject"].values()) == problems
    report = (run_dir / "report.md").read_text()
    for name in full_run_methods:
        assert f"\n| {name} | " in report
    assert all((run_dir / file).stat().st_size > 1000 for file in PLOTS.values())
    assert "answerless-last changed" in report
    debug = [json.loads(line) for line in (run_dir / "debug.jsonl").read_text().splitlines()]
    assert len(debug) == problems
    for record in debug:
        for choice in record["methods"].values():
            assert choice["key_step"]["text"] and choice["key_step"]["index"] >= 0
        # With N = 4, DeepConf's top 10 % is one candidate: the most confident one with an answer, the argmax's pick.
        methods, answered = record["methods"], any(p is not None for p in record["preds"])
        for kind in ("lowest-group", "tail"):
            if answered:
                assert methods[f"deepconf-{kind}-10"]["candidate_index"] == methods[kind]["candidate_index"]
            assert methods[kind]["pred"] is not None or not answered

    # jobs.reduce rewrites summary.json, report.md and the best files: the shared run stays as the job left it.
    run_dir = main_run.copy(tmp_path)
    reselect = run_job("jobs.reduce", str(run_dir), "--method", "all", "--num_return_sequences", "2")
    assert reselect.returncode == 0, reselect.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["comparison"]["candidates_per_problem"] == 2
    plain = run_job("jobs.reduce", str(run_dir), "--method", "all", "--no-answerless_last", "--borda_score", "combined")
    assert plain.returncode == 0, plain.stderr[-3000:]
    comparison = json.loads((run_dir / "summary.json").read_text())["comparison"]
    assert comparison["params"]["answerless_last"] is False and "borda" in comparison["accuracy_by_alpha"]
    assert all(m["answerless_last_changed"] is None for m in comparison["methods"].values())
    single = run_job("jobs.reduce", str(run_dir), "--method", "self-eval", "--num_return_sequences", "1")
    assert single.returncode == 0, single.stderr[-3000:]
    best = [json.loads(line) for line in (run_dir / "best_self-eval.jsonl").read_text().splitlines()]
    assert [b["candidate_index"] for b in best] == [0] * problems
