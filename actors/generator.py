"""Generator actor: owns a model and returns N sampled candidates per problem."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import AsyncIterator
from typing import Protocol

import pyarrow as pa

from actors.samples import Sample
from actors.traces import traced_problems
from ray_pipeline.backends import get_backend, resolve_backend
from ray_pipeline.config import RunConfig
from ray_pipeline.model import ensure_pad_token, resolve_model
from ray_pipeline.prompts import build_prompt
from ray_pipeline.shards import GENERATED_SCHEMA
from ray_pipeline.timeline import mark, mark_process_start


class GenerationBackend(Protocol):
    """What the generator actor needs from a model: N samples per prompt, problems yielded as they finish; or,
    for runs that generate traces (`RunConfig.trace_requests`), a problem's traces (`actors.traces`)."""

    name: str
    # Errors after which the engine serves nothing more: the actor exits so Ray restarts it and retries the batch.
    fatal_errors: tuple[type[BaseException], ...]
    # Whether `generate_traces` calls run side by side in one engine (actors.traces.FinalTraces).
    concurrent_traces: bool

    def generate(self, prompts: list[list[int]], keys: list[str]) -> AsyncIterator[tuple[int, list[Sample] | str]]:
        """(index into `prompts`, its N samples or why it has none) per problem, in the order they finish.

        `keys` are the problem ids (sampling seeds). Several calls may run at once on one event loop.
        """
        ...

    async def generate_traces(
        self, prompt: list[int], key: str, traces: list[int], threshold: float | None
    ) -> list[Sample]:
        """One prompt's traces `traces` (indices), each sampled from `actors.traces.trace_seed`, with its engine
        confidences; with a threshold each stops as the online rule says (`actors.traces.TraceBackend`)."""
        ...


class GeneratorActor:
    """Ray Data callable class: a small batch of problems in, each problem with its N candidates out.

    Each output row is one problem with a `candidates` list (`GENERATED_SCHEMA`): Ray Data can cut a
    stream of rows anywhere, and a problem's candidates must reach one scorer batch together.

    `__call__` is an async generator, so one actor works on several batches at once (the pool's
    `generate_in_flight`) and its engine schedules all their requests together. It yields rows in
    pieces as problems finish (`stream_every`).
    """

    def __init__(self, config: RunConfig):
        mark_process_start("generator process started")
        mark("generator init")
        import torch
        from transformers import AutoConfig, AutoTokenizer

        mark("generator imported torch and transformers")

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(config.cpus_per_actor)))
        self.config = config
        path = resolve_model(config.model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.context = config.max_model_len or getattr(
            AutoConfig.from_pretrained(path), "max_position_embeddings", None
        )
        ensure_pad_token(self.tokenizer)
        self.backend_name = resolve_backend(config.backend, torch.cuda.is_available())
        self.backend = self.make_backend(path)
        mark("generator ready")

    def make_backend(self, path: str) -> GenerationBackend:
        module, name = get_backend(self.backend_name).engine.split(":")
        engine = getattr(importlib.import_module(module), name)
        return engine(path, self.config, self.tokenizer)

    async def __call__(self, batch: pa.Table) -> AsyncIterator[pa.Table]:
        problems = batch.to_pylist()
        prompts = [
            self.tokenizer(build_prompt(p["problem"], self.config.prompt, self.tokenizer))["input_ids"]
            for p in problems
        ]
        # A prompt that leaves no room for max_tokens fails the same way on every retry: it becomes error rows at
        # once (on every backend: transformers would run past the context, vLLM cut the response short).
        budget = self.config.max_tokens
        fits = [i for i, p in enumerate(prompts) if self.context is None or len(p) + budget <= self.context]
        rows, done = [], 0
        for i in sorted(set(range(len(problems))) - set(fits)):
            error = (
                f"prompt has {len(prompts[i])} tokens, {len(prompts[i]) + budget} with --max_tokens {budget}: over "
                f"the context length {self.context}"
            )
            rows += self._error_rows(problems[i], error)
            done += 1
        keys = [problems[i]["problem_id"] for i in fits]
        fitting = [prompts[i] for i in fits]
        if not fits:
            results = _nothing()
        elif self.config.trace_requests:
            results = traced_problems(self.backend, fitting, keys, self.config, self._decode)
        else:
            results = self.backend.generate(fitting, keys)
        try:
            async for j, result in results:
                i = fits[j]
                if isinstance(result, str):
                    rows += self._error_rows(problems[i], result)
                else:
                    rows += self._rows(problems[i], prompts[i], result)
                done += 1
                if done % self.config.stream_every == 0:
                    yield pa.Table.from_pylist(rows, schema=GENERATED_SCHEMA)
                    rows = []
        except self.backend.fatal_errors as exc:
            exit_for_restart(exc)
        if rows:
            yield pa.Table.from_pylist(rows, schema=GENERATED_SCHEMA)

    def _error_rows(self, problem: dict, error: str) -> list[dict]:
        """N candidates without text that name why: the shard stays complete and the report lists the problem."""
        candidates = [
            {
                "candidate_index": index,
                "prompt_token_ids": [],
                "token_ids": [],
                "text": "",
                "finish_reason": "error",
                "generator_logprobs": [],
                "backend": self.backend_name,
                "error": error,
                "engine_confidence": [],
                "engine_token_count": 0,
            }
            for index in range(self.config.num_return_sequences)
        ]
        return [problem | {"candidates": candidates}]

    def _rows(self, problem: dict, prompt_ids: list[int], samples: list[Sample]) -> list[dict]:
        candidates = [
            {
                "candidate_index": index,
                "prompt_token_ids": prompt_ids,
                "token_ids": sample.token_ids,
                "text": self._decode(sample.token_ids),
                "finish_reason": sample.finish_reason,
                "generator_logprobs": sample.logprobs,
                "backend": self.backend_name,
                "engine_confidence": sample.confidences,
                "phase": sample.phase,
                "stopped_at": sample.stopped_at,
                "stop_threshold": sample.threshold,
                "engine_token_count": len(sample.token_ids) if sample.engine_tokens is None else sample.engine_tokens,
            }
            for index, sample in enumerate(samples)
        ]
        return [problem | {"candidates": candidates}]

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


async def _nothing() -> AsyncIterator:
    return
    yield


def exit_for_restart(exc: BaseException) -> None:
    """Leave the process so Ray restarts the actor and retries its batches on a fresh engine.

    Re-raising would retry the batch on this same actor, whose engine is gone; `ray.actor.exit_actor`
    counts as an intended exit, after which Ray does not retry. A process exit is a system failure:
    Ray restarts the actor (max_restarts) and retries the task (max_task_retries).
    """
    print(f"generator: engine died ({type(exc).__name__}: {exc}); exiting so Ray restarts this actor", file=sys.stderr)
    sys.stderr.flush()
    os._exit(1)
