"""Generator actor: owns a model and returns N sampled candidates per problem."""

from __future__ import annotations

import asyncio
import math
import os
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Protocol

import pyarrow as pa

from actors.samples import LOW_CONFIDENCE, Sample
from actors.traces import trace_seed, traced_problems
from ray_pipeline.backends import resolve_backend, stable_seed
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


class HFGenerator:
    """transformers `generate`, one padded batch per call (CPU or GPU).

    Sampling rule: one torch seed per call, from the run seed and the call's problem ids, so a batch
    samples the same candidates whenever it holds the same problems in the same order. The pipeline
    cuts every shard into whole batches (`pipeline.problem_blocks`), so a resumed shard equals the
    uninterrupted one. Calls run one at a time: torch's generator is global to the process.
    """

    name = "hf"
    fatal_errors: tuple[type[BaseException], ...] = ()
    # One padded batch per call, calls one at a time (torch's generator is global to the process).
    concurrent_traces = False

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

    async def generate_traces(
        self, prompt: list[int], key: str, traces: list[int], threshold: float | None
    ) -> list[Sample]:
        """One padding-free batch of the prompt's traces, each from its own seed (see `trace_batch`)."""
        if self.lock is None:
            self.lock = asyncio.Lock()
        async with self.lock:
            return await asyncio.to_thread(self.trace_batch, prompt, key, traces, threshold)

    def trace_batch(self, prompt: list[int], key: str, traces: list[int], threshold: float | None) -> list[Sample]:
        """The traces in one batch; with --reproducible each in a batch of its own, so that no trace's arithmetic
        follows the batch's size (CPU kernels may choose their blocking by it: float32 on an AMD EPYC gave other last
        bits in a batch of 2 than of 6)."""
        if self.config.reproducible:
            return [s for k in traces for s in self._trace_rows(prompt, key, [k], threshold)]
        return self._trace_rows(prompt, key, traces, threshold)

    def _trace_rows(self, prompt: list[int], key: str, traces: list[int], threshold: float | None) -> list[Sample]:
        """`generate` over one prompt repeated, with `TraceSampler` drawing each row's token from its trace's own
        generator (greedy decoding then takes that token) and `ConfidenceStop` ending rows by the online rule.

        A row's tokens depend only on its seed and on its own computation: no padding (one prompt), and rows
        never mix. Whether the model's arithmetic for a row depends on the batch's size is the kernels' affair
        (bf16 on CPU does; float32 may, by the CPU): `trace_batch` with --reproducible removes the question.
        """
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        torch, cfg = self.torch, self.config
        rows = len(traces)
        ids = torch.tensor([prompt] * rows, device=self.device)
        sampler = TraceSampler(
            [trace_seed(cfg.seed, key, k) for k in traces], cfg.temperature, cfg.top_p, cfg.deepconf_top_k, self.device
        )
        stop = ConfidenceStop(sampler, cfg.deepconf_window, threshold, self.eos) if threshold is not None else None
        generation = GenerationConfig(
            max_new_tokens=cfg.max_tokens,
            do_sample=False,
            eos_token_id=sorted(self.eos),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                generation_config=generation,
                logits_processor=LogitsProcessorList([sampler]),
                stopping_criteria=StoppingCriteriaList([stop] if stop else []),
            )
        samples = []
        for row, tokens in enumerate(out[:, len(prompt) :].tolist()):
            stopped_at = stop.stopped_at[row] if stop else None
            sample = Sample(tokens[:stopped_at], LOW_CONFIDENCE) if stopped_at else self._trim(tokens)
            sample.confidences = sampler.confidences[row][: len(sample.token_ids)]
            sample.stopped_at = stopped_at
            samples.append(sample)
        return samples


class TraceSampler:
    """A transformers logits processor that samples each row from its own seeded generator and records its engine
    confidence.

    It sees the raw logits (it is the only processor: the generation config sets no sampling), takes the
    engine confidence from their log-softmax's top-k (`ray_pipeline.deepconf.token_confidences`, as vLLM's
    raw log-probs give it), applies temperature and top-p with transformers' own warpers, draws the row's
    token with `torch.multinomial` on the row's generator, and returns scores in which only that token is
    finite, so `generate`'s greedy step takes it.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, top_k: int, device: str):
        import torch
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.torch = torch
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.greedy = temperature == 0
        self.warpers = [] if self.greedy else [TemperatureLogitsWarper(temperature)]
        if top_p < 1.0 and not self.greedy:
            self.warpers.append(TopPLogitsWarper(top_p))
        self.top_k = top_k
        self.confidences: list[list[float]] = [[] for _ in seeds]

    def __call__(self, input_ids, scores):
        from ray_pipeline.deepconf import token_confidences

        torch = self.torch
        logits = scores.float()
        top = torch.log_softmax(logits, dim=-1).topk(self.top_k, dim=-1).values
        for row, confidence in zip(self.confidences, token_confidences(top.double().cpu().numpy()).tolist()):
            row.append(confidence)
        if self.greedy:
            chosen = logits.argmax(dim=-1, keepdim=True)
        else:
            for warper in self.warpers:
                logits = warper(input_ids, logits)
            probs = torch.softmax(logits, dim=-1)
            chosen = torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        return torch.full_like(scores, -math.inf).scatter_(1, chosen, 0.0)


class ConfidenceStop:
    """A transformers stopping criterion: a row stops at the first token whose window of the last `window` engine
    confidences has a mean below `threshold` (`ray_pipeline.deepconf.WindowMonitor`); `stopped_at[row]` keeps
    its token count. A row that ends with an end-of-sequence token is watched no further."""

    def __init__(self, sampler: TraceSampler, window: int, threshold: float, eos: set[int]):
        from ray_pipeline.deepconf import WindowMonitor

        self.sampler, self.eos = sampler, eos
        rows = len(sampler.confidences)
        self.monitors = [WindowMonitor(window, threshold) for _ in range(rows)]
        self.stopped_at: list[int | None] = [None] * rows
        self.ended = [False] * rows

    def __call__(self, input_ids, scores, **kwargs):
        last = input_ids[:, -1].tolist()
        for row, monitor in enumerate(self.monitors):
            if self.ended[row]:
                continue
            confidences = self.sampler.confidences[row]
            if monitor.add(confidences[-1]):
                self.stopped_at[row] = len(confidences)
            self.ended[row] = self.stopped_at[row] is not None or last[row] in self.eos
        return self.sampler.torch.tensor([s is not None for s in self.stopped_at], device=input_ids.device)


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
        if self.backend_name == "vllm":
            from actors.vllm_backend import VLLMGenerator

            return VLLMGenerator(path, self.config, stop_token=self.tokenizer.eos_token_id)
        return HFGenerator(path, self.config, self.tokenizer)

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
