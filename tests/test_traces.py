"""The trace controller (actors/traces.py) against the replay (ray_pipeline/deepconf/), on a fake engine.

The fake engine holds a complete trace per (problem, trace index) and, asked for a trace with a threshold,
cuts it where the online rule says, as both real backends do. Whatever the controller then decides (the
threshold, which traces stop and where, which traces a consensus stop leaves out) must be what the replay of
the complete traces decides, whether the engine runs a batch per call or requests side by side.
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from actors.samples import LOW_CONFIDENCE, NOT_LAUNCHED, RequestRefused, Sample
from actors.traces import problem_traces, trace_seed, traced_problems
from ray_pipeline.answer_classes import group_answers
from ray_pipeline.config import RunConfig
from ray_pipeline.deepconf import (
    CONFIDENCE_SCALE,
    FINAL,
    SKIPPED,
    WARMUP,
    OnlineSettings,
    WindowMonitor,
    first_stop,
    replay_problem,
)

pytestmark = pytest.mark.fast

ONLINE = RunConfig(
    generation="deepconf-online",
    num_return_sequences=12,
    warmup_traces=4,
    deepconf_window=4,
    max_tokens=40,
    temperature=0.7,
    answer_extraction="boxed",
    consensus=None,
)


class FakeTraceEngine:
    """Complete traces per (key, trace): token 0 is the answer digit, confidences random on the 2^-16 grid."""

    def __init__(self, seed: int, answers: int = 3, refuse: set[str] = frozenset(), concurrent: bool = False):
        # concurrent: requests side by side, finishing in an order of their own (as vLLM); else a batch per call.
        self.concurrent_traces = concurrent
        self.rng = np.random.default_rng(seed)
        self.answers, self.refuse = answers, refuse
        self.full: dict[tuple[str, int], tuple[list[int], list[float]]] = {}
        self.calls: list[tuple[str, list[int], float | None]] = []

    def complete(self, key: str, k: int) -> tuple[list[int], list[float]]:
        if (key, k) not in self.full:
            length = int(self.rng.integers(1, 40))
            conf = np.rint(self.rng.uniform(0.5, 3.0, length) * CONFIDENCE_SCALE) / CONFIDENCE_SCALE
            self.full[(key, k)] = ([int(self.rng.integers(0, self.answers))] + [7] * (length - 1), conf.tolist())
        return self.full[(key, k)]

    async def generate_traces(self, prompt, key, traces, threshold):
        if key in self.refuse:
            raise RequestRefused(f"vLLM refused the request: {key} is too long")
        self.calls.append((key, list(traces), threshold))
        for _ in range(int(self.rng.integers(1, 4)) if self.concurrent_traces else 1):
            await asyncio.sleep(0)
        samples = []
        for k in traces:
            tokens, conf = self.complete(key, k)
            monitor = WindowMonitor(ONLINE.deepconf_window, threshold) if threshold is not None else None
            stop = next((t + 1 for t, c in enumerate(conf) if monitor and monitor.add(c)), None)
            cut = stop or len(tokens)
            sample = Sample(tokens[:cut], LOW_CONFIDENCE if stop else "stop", confidences=conf[:cut], stopped_at=stop)
            samples.append(sample)
        return samples


def decode(token_ids: list[int]) -> str:
    return f"so \\boxed{{{token_ids[0]}}}" if token_ids else ""


def classes(engine: FakeTraceEngine, key: str, n: int) -> np.ndarray:
    return group_answers([str(engine.complete(key, k)[0][0]) for k in range(n)], lambda a, b: a == b)


@pytest.mark.parametrize("concurrent", [False, True])
@pytest.mark.parametrize("consensus", [None, 0.5, 0.7, 0.99])
@pytest.mark.parametrize("seed", range(8))
def test_the_controller_decides_what_the_replay_of_the_complete_traces_decides(seed, consensus, concurrent):
    width = 3
    config = dataclasses.replace(ONLINE, consensus=consensus, consensus_wave=width)
    engine = FakeTraceEngine(seed, concurrent=concurrent)
    samples = asyncio.run(problem_traces(engine, [1, 2], "p", config, decode))
    n = config.num_return_sequences
    full = [np.asarray(engine.complete("p", k)[1]) for k in range(n)]
    replay = replay_problem(full, classes(engine, "p", n), OnlineSettings.from_config(config))
    assert [s.phase for s in samples] == replay.phase
    assert [len(s.token_ids) for s in samples] == replay.kept.tolist()
    assert [-1 if s.stopped_at is None else s.stopped_at for s in samples] == replay.stopped_at.tolist()
    assert all(s.threshold == replay.threshold for s in samples)
    # The warm-up ran without a threshold, every final trace with the problem's.
    assert engine.calls[0] == ("p", [0, 1, 2, 3], None)
    assert all(threshold == replay.threshold for _, _, threshold in engine.calls[1:])
    launched = [k for _, traces, _ in engine.calls for k in traces]
    voters = [k for k, phase in enumerate(replay.phase) if phase != SKIPPED]
    late = [k for k in launched if k not in voters]
    # Every voter was launched; past the last one, at most a wave's worth of traces more was in flight.
    assert launched[: len(voters)] == voters and len(set(launched)) == len(launched)
    assert len(late) <= (width - 1 if consensus is not None else 0) and all(k > voters[-1] for k in late)
    for k, s in enumerate(samples):
        if s.phase == SKIPPED:
            assert (s.token_ids, s.finish_reason) == ([], NOT_LAUNCHED)
            # A trace that finished after the stop counts the tokens it cost; one never run or cancelled none.
            conf = engine.complete("p", k)[1]
            cost = first_stop(conf, config.deepconf_window, replay.threshold) or len(conf)
            assert s.engine_tokens in ((0, cost) if k in late else (0,))


def test_a_consensus_stop_is_decided_in_trace_order_whatever_the_finishing_order():
    """Side by side, traces finish in any order; the check still follows trace order, so the same traces vote."""
    config = dataclasses.replace(ONLINE, consensus=0.7, consensus_wave=4)
    phases = set()
    for run in range(10):
        engine = FakeTraceEngine(3, concurrent=True)
        engine.rng = np.random.default_rng(3)
        for k in range(12):
            engine.complete("p", k)
        engine.rng = np.random.default_rng(100 + run)  # only the finishing order changes from run to run
        phases.add(tuple(s.phase for s in asyncio.run(problem_traces(engine, [1], "p", config, decode))))
    assert len(phases) == 1


def test_without_a_consensus_every_final_trace_starts_at_once():
    engine = FakeTraceEngine(0)
    samples = asyncio.run(problem_traces(engine, [1], "p", ONLINE, decode))
    assert [traces for _, traces, _ in engine.calls] == [[0, 1, 2, 3], list(range(4, 12))]
    assert [s.phase for s in samples] == [WARMUP] * 4 + [FINAL] * 8
    engine = FakeTraceEngine(0, concurrent=True)
    asyncio.run(problem_traces(engine, [1], "p", ONLINE, decode))
    assert [traces for _, traces, _ in engine.calls] == [[0, 1, 2, 3]] + [[k] for k in range(4, 12)]


def test_full_generation_runs_every_trace_without_a_threshold():
    engine = FakeTraceEngine(0)
    config = RunConfig(engine_confidence=True, num_return_sequences=5)
    samples = asyncio.run(problem_traces(engine, [1], "p", config, decode))
    assert engine.calls == [("p", [0, 1, 2, 3, 4], None)]
    assert all(s.phase is None and s.threshold is None and s.stopped_at is None for s in samples)


def test_every_problem_comes_out_once_and_a_refused_one_as_its_reason():
    engine = FakeTraceEngine(1, refuse={"p2"})
    keys = [f"p{i}" for i in range(5)]

    async def collect():
        return [r async for r in traced_problems(engine, [[1]] * 5, keys, ONLINE, decode)]

    results = dict(asyncio.run(collect()))
    assert sorted(results) == list(range(5))
    assert results[2] == "vLLM refused the request: p2 is too long"
    assert all(len(results[i]) == 12 for i in (0, 1, 3, 4))


def test_trace_seeds_depend_on_problem_and_trace_only():
    assert trace_seed(0, "p", 3) == trace_seed(0, "p", 3)
    assert len({trace_seed(0, "p", k) for k in range(64)} | {trace_seed(0, "q", 0), trace_seed(1, "p", 0)}) == 66
