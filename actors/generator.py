"""Generator actor: owns a model and returns N sampled candidates per problem."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain

import pyarrow as pa

from ray_pipeline.config import RunConfig
from ray_pipeline.model import resolve_model
from ray_pipeline.prompts import build_prompt
from ray_pipeline.sampling import resolve_backend, stable_seed
from ray_pipeline.shards import CANDIDATE_SCHEMA


@dataclass
class Sample:
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float]


class HFGenerator:
    """transformers `generate`, batched over problems (CPU or GPU)."""

    name = "hf"

    def __init__(self, path: str, config: RunConfig):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.config = config
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=config.dtype).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])

    def stream(self, prompts: list[list[int]], keys: list[str], pad_id: int) -> Iterator[tuple[int, list[Sample]]]:
        """All problems are generated in one padded batch, then yielded in order."""
        torch, cfg = self.torch, self.config
        width = max(len(p) for p in prompts)
        # Left padding keeps every prompt's last token at the same position.
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        # One seed per call from the problem ids: the same batch samples the same candidates on rerun.
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
                pad_token_id=pad_id,
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
    """Ray Data callable class: problems in, one row per (problem, candidate) out.

    `__call__` yields its output in pieces as problems finish, so the scorer pool starts on
    the first candidates while the generator still works on the rest of a large batch.
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
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.backend_name = resolve_backend(config.backend, torch.cuda.is_available())
        if self.backend_name == "vllm":
            from actors.vllm_backend import VLLMGenerator

            self.backend = VLLMGenerator(path, config)
        else:
            self.backend = HFGenerator(path, config)

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        problems = batch.to_pylist()
        prompts = [
            self.tokenizer(build_prompt(p["problem"], self.config.prompt, self.tokenizer))["input_ids"]
            for p in problems
        ]
        # A prompt that leaves no room to generate fails the same way on every retry: it becomes
        # error rows at once instead of failing its batch.
        fits = [i for i, p in enumerate(prompts) if self.context is None or len(p) < self.context]
        keys = [problems[i]["problem_id"] for i in fits]
        results = self.backend.stream([prompts[i] for i in fits], keys, self.pad_id)
        too_long = (
            (i, f"prompt has {len(prompts[i])} tokens, no room under the context length {self.context}")
            for i in sorted(set(range(len(problems))) - set(fits))
        )
        rows = []
        for done, (i, result) in enumerate(chain(too_long, ((fits[j], r) for j, r in results)), 1):
            if isinstance(result, str):
                rows += self._error_rows(problems[i], result)
            else:
                rows += self._rows(problems[i], prompts[i], result)
            if done % self.config.stream_problems == 0 or done == len(problems):
                yield pa.Table.from_pylist(rows, schema=CANDIDATE_SCHEMA)
                rows = []

    def _error_rows(self, problem: dict, error: str) -> list[dict]:
        """N rows without text that name why: the shard stays complete and the report lists the problem."""
        return [
            {
                **problem,
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

    def _rows(self, problem: dict, prompt_ids: list[int], candidates: list[Sample]) -> list[dict]:
        return [
            {
                **problem,
                "candidate_index": index,
                "prompt_token_ids": prompt_ids,
                "token_ids": sample.token_ids,
                "text": self.tokenizer.decode(sample.token_ids, skip_special_tokens=True),
                "finish_reason": sample.finish_reason,
                "generator_logprobs": sample.logprobs,
                "backend": self.backend_name,
            }
            for index, sample in enumerate(candidates)
        ]
