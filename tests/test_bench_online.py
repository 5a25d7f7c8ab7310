"""jobs.bench.online's own parts, without a model: the flags it passes on, grading, and the comparison."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

import jobs.bench.online
from jobs.bench.online import _compare, _passed_flags, grade_problem, simulator_grid
from ray_pipeline.config import RunConfig
from ray_pipeline.deepconf import FINAL, SKIPPED, WARMUP, OnlineSettings

pytestmark = pytest.mark.fast


def test_each_run_gets_the_users_flags_without_this_jobs_own_or_a_mode():
    argv = ["--dataset", "embedded:4", "--runs", "full,online", "--raw", "--reuse", "--generation", "full"]
    argv += ["--record=r.json", "--engine_confidence", "--max_tokens", "5", "--deepconf_window", "2"]
    assert _passed_flags(argv) == ["--dataset", "embedded:4", "--max_tokens", "5", "--deepconf_window", "2"]


def test_a_consensus_goes_to_the_online_run_only(monkeypatch, tmp_path):
    """bench_online hands --consensus and its wave to the online run alone: a full run has no use for them."""
    commands = []

    class Ran(Exception):
        pass

    def run(command):
        commands.append(command)
        if len(commands) == 2:
            raise Ran
        (Path(command[command.index("--bench_dir") + 1])).mkdir(parents=True)
        (Path(command[command.index("--bench_dir") + 1]) / "bench.json").write_text(
            '{"pipeline_work_s": 1, "reduce_s": 0}'
        )
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(jobs.bench.online.subprocess, "run", run)
    argv = ["--dataset", "embedded:4", "--num_return_sequences", "4", "--warmup_traces", "2", "--max_tokens", "8"]
    argv += ["--deepconf_window", "2", "--consensus", "0.9", "--consensus_wave=2", "--runs", "full,online"]
    with pytest.raises(Ran):
        jobs.bench.online.main([*argv, "--bench_dir", str(tmp_path)])
    full, online = (command[command.index("--bench_dir") + 2 :] for command in commands)
    assert "--consensus" not in full and "--consensus_wave=2" not in full and full[-2:] == ["--generation", "full"]
    assert online[online.index("--consensus") + 1] == "0.9" and "--consensus_wave=2" in online


def test_grading_groups_equivalent_answers_once_and_grades_each_group():
    texts = ["so \\boxed{1/2}", "\\boxed{0.5}", "\\boxed{3}", "no answer here", "\\boxed{\\frac{1}{2}}"]
    classes, correct = grade_problem((texts, "\\frac12", "boxed"))
    assert classes.tolist() == [0, 0, 1, -1, 0] and correct.tolist() == [True, False]


def candidate(tokens, conf, phase=None, stopped=None, threshold=None):
    return {
        "token_count": tokens,
        "engine_confidence": conf,
        "engine_token_count": tokens,
        "phase": phase,
        "stopped_at": stopped,
        "stop_threshold": threshold,
    }


def test_the_comparison_replays_the_full_run_and_scores_the_online_one():
    config = RunConfig(num_return_sequences=3, warmup_traces=1, deepconf_window=2, max_tokens=8, consensus=None)
    online_config = RunConfig(**{**config.__dict__, "generation": "deepconf-online"})
    full = [[candidate(4, [3.0] * 4), candidate(4, [1.0] * 4), candidate(4, [3.0] * 4)]]
    online = [
        [
            candidate(4, [3.0] * 4, WARMUP, None, 3.0),
            candidate(2, [1.0] * 2, FINAL, 2, 3.0),
            candidate(0, [], SKIPPED, None, 3.0),
        ]
    ]
    grades = {
        "full-confidence": [(np.array([0, 1, 0]), np.array([True, False]))],
        "online": [(np.array([0, -1, -1]), np.array([True]))],
    }
    timings = {"full-confidence": {"generate_score_s": 10.0}, "online": {"generate_score_s": 4.0}}
    runs = {"full-confidence": full, "online": online}
    result = _compare(config, online_config, [90.0], runs, grades, timings, 0.6)
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["full self-consistency"]["tokens"] == 12 and rows["full self-consistency"]["accuracy"] == 1.0
    simulated = rows["DeepConf-low online, simulated"]
    # Warm-up trace 0 sets s = 3.0; trace 1 stops after its first window (mean 1.0); trace 2 runs (3.0 >= s).
    assert (simulated["tokens"], simulated["stopped"], simulated["accuracy"]) == (10, 1, 1.0)
    measured = rows["DeepConf online run (percentile 90)"]
    assert (measured["tokens"], measured["stopped"], measured["skipped"]) == (6, 1, 1)
    assert measured["generate_score_s"] == 4.0
    targets = result["targets"]
    assert targets["online_tokens_share"] == 0.5 and targets["work_share"] == 0.4
    assert targets["work_target_met (<= 0.6)"] and targets["tokens_target_met (<= 0.50)"]
    # The engine generated 6 of the full run's 12 tokens; work 0.4 <= 0.5 + 0.05: the saved tokens became time.
    follows = "work_follows_tokens (work <= engine tokens + 0.05)"
    assert targets["online_engine_tokens_share"] == 0.5 and targets[follows]
    slower = _compare(config, online_config, [90.0], runs, grades, timings | {"online": {"generate_score_s": 7.0}}, 0.6)
    assert not slower["targets"][follows]
    assert not slower["targets"]["work_target_met (<= 0.6)"]


def test_the_simulator_grid_replays_every_setting_and_leaves_out_warm_ups_that_leave_no_final_trace():
    rng = np.random.default_rng(7)
    n, problems = 20, 6
    lengths = rng.integers(40, 80, size=(problems, n))
    confidences = [[rng.uniform(0.5, 3.0, size=int(length)).tolist() for length in row] for row in lengths]
    grades = [(rng.integers(0, 3, size=n), np.array([True, False, False])) for _ in range(problems)]
    full = ([sum(len(c) for c in conf) for conf in confidences], [bool(k[0] == 0) for k, _ in grades])
    base = OnlineSettings(window=8, warmup=16, percentile=90.0)
    rows = {r["name"]: r for r in simulator_grid(confidences, grades, base, full)}
    assert len(rows) == 1 + 3 * 3 * 2 and rows["full self-consistency"]["tokens_vs_reference"] == 1.0
    for warmup in (4, 8, 16):
        for percentile in (90, 10):
            off = rows[f"warm-up {warmup}, consensus off, percentile {percentile}"]
            assert (off["warmup"], off["consensus"], off["percentile"]) == (warmup, None, percentile)
            # A consensus stop only ever launches fewer final traces; DeepConf-high (10th percentile) stops fewer.
            for consensus in (0.9, 0.95):
                stopped = rows[f"warm-up {warmup}, consensus {consensus}, percentile {percentile}"]
                assert stopped["tokens"] <= off["tokens"]
        low, high = (rows[f"warm-up {warmup}, consensus off, percentile {p}"]["tokens"] for p in (90, 10))
        assert low <= high < sum(full[0])
    short = simulator_grid([conf[:6] for conf in confidences], [(k[:6], ok) for k, ok in grades], base, full)
    assert {r.get("warmup") for r in short} == {None, 4}
