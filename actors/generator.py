"""Generator actor: owns a model and returns N sampled candidates per problem."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Protocol

import pyarrow as pa

from actors.samples import Sample
from ray_pipeline.backends import resolve_backend, stable_seed
from ray_pipeline.config import RunConfig
from ray_pipeline.model import ensure_pad_token, resolve_model
from ray_pipeline.prompts import build_prompt
from ray_pipeline.shards import GENERATED_SCHEMA


class GenerationBackend(Protocol):
    """What the generator actor needs from a model: N samples per prompt, problems yielded as they finish."""

    name: str
    # Errors after which the engine serves nothing more: the actor exits so Ray restarts it and retries the batch.
    fatal_errors: tuple[type[BaseException], ...]

    def generate(self, prompts: list[list[int]], keys: list[str]) -> AsyncIterator[tuple[int, list[Sample] | str]]:
        """(index into `prompts`, its N samples or why it has none) per problem, in the order they finish.

        `keys` are the problem ids (sampling seeds). Several calls may run at once on one event loop.
        """
        ...


class HFGenerator:
    """transformers `generate`, one padded batch per call (CPU or GPU).

    Sampling rule: one torch seed per call, from the run seed and the call's problem ids, so a batch
    samples the same candidates whenever it holds the same problems in the same order. The pipeline
    cuts every shard into whole batches (`pipeline.problem_blocks`), so a resumed shard equals the
    uninterrupted one. Calls run one at a time: torch's generator is global to the process.
    """

    name = "hf"
    fatal_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, path: str, config: RunConfig, tokenizer):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.config = config
        self.tokenizer = tokenizer
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=config.dtype).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.lock: asyncio.Lock | None = None

    async def generate(self, prompts: list[list[int]], keys: list[str]) -> AsyncIterator[tuple[int, list[Sample]]]:
        if self.lock is None:
            self.lock = asyncio.Lock()
        async with self.lock:
            # A thread keeps the event loop (and other batches' bookkeeping) free during the forward passes.
            results = await asyncio.to_thread(lambda: list(self.generate_batch(prompts, keys)))
        for result in results:
            yield result

    def generate_batch(self, prompts: list[list[int]], keys: list[str]) -> Iterator[tuple[int, list[Sample]]]:
        """All problems in one padded batch, yielded in order."""
        torch, cfg = self.torch, self.config
        # Left padding keeps every prompt's last token at the same position.
        padded = self.tokenizer.pad({"input_ids": prompts}, padding=True, padding_side="left", return_tensors="pt")
        ids, mask = padded["input_ids"].to(self.device), padded["attention_mask"].to(self.device)
        width = ids.shape[1]
        torch.manual_seed(stable_seed(cfg.seed, *keys))
        sampling = (
            {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p}
            if cfg.temperature > 0
            else {"do_sample": False}
        )
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=cfg.max_tokens,
                num_return_sequences=cfg.num_return_sequences,
                pad_token_id=self.tokenizer.pad_token_id,
                top_k=None,
                **sampling,
            )
        responses = out[:, width:].tolist()
        n = cfg.num_return_sequences
        for i in range(len(prompts)):
            yield i, [self._trim(responses[i * n + k]) for k in range(n)]

    def _trim(self, tokens: list[int]) -> Sample:
        for pos, tok in enumerate(tokens):
            if tok in self.eos:
                return Sample(tokens[: pos + 1], "stop", [])
        return Sample(tokens, "length", [])


class GeneratorActor:
    """Ray Data callable class: a small batch of problems in, each problem with its N candidates out.

    Each output row is one problem with a `candidates` list (`GENERATED_SCHEMA`): Ray Data can cut a
    stream of rows anywhere, and a problem's candidates must reach one scorer batch together.

    `__call__` is an async generator, so one actor works on several batches at once (the pool's
    `generate_in_flight`) and its engine schedules all their requests together. It yields rows in
    pieces as problems finish (`stream_every`).
    """

    def __init__(self, config: RunConfig):
        import torch
        from transformers import AutoConfig, AutoTokenizer

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

    def make_backend(self, path: str) -> GenerationBackend:
        if self.backend_name == "vllm":
            from actors.vllm_backend import VLLMGenerator

            return VLLMGenerator(path, self.config)
        return HFGenerator(path, self.config, self.tokenizer)

    async def __call__(self, batch: pa.Table) -> AsyncIterator[pa.Table]:
        problems = batch.to_pylist()
        prompts = [
            self.tokenizer(build_prompt(p["problem"], self.config.prompt, self.tokenizer))["input_ids"]
            for p in problems
        ]
        # A prompt that leaves no room to generate fails the same way on every retry: it becomes
        # error rows at once instead of failing its batch.
        fits = [i for i, p in enumerate(prompts) if self.context is None or len(p) < self.context]
        rows, done = [], 0
        for i in sorted(set(range(len(problems))) - set(fits)):
            error = f"prompt has {len(prompts[i])} tokens, no room under the context length {self.context}"
            rows += self._error_rows(problems[i], error)
            done += 1
        keys = [problems[i]["problem_id"] for i in fits]
        results = self.backend.generate([prompts[i] for i in fits], keys) if fits else _nothing()
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
                "text": self.tokenizer.decode(sample.token_ids, skip_special_tokens=True),
                "finish_reason": sample.finish_reason,
                "generator_logprobs": sample.logprobs,
                "backend": self.backend_name,
            }
            for index, sample in enumerate(samples)
        ]
        return [problem | {"candidates": candidates}]


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
