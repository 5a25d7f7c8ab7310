"""transformers as a generation backend (`ray_pipeline/backends/hf.py` declares what it can do): `generate` on
one padded batch per call, on a CPU or a GPU, with DeepConf traces sampled and stopped by a logits processor and a
stopping criterion of its own."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator

from actors.samples import LOW_CONFIDENCE, Sample
from actors.traces import trace_seed
from ray_pipeline.backends import stable_seed
from ray_pipeline.config import RunConfig


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
