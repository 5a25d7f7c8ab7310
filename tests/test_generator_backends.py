"""The generation backend interface: per-request refusals become error rows, a dead engine restarts its actor."""

from __future__ import annotations

import asyncio
import itertools
import random
import sys
from types import SimpleNamespace

import pytest

from actors.generator import GeneratorActor, Sample
from ray_pipeline.config import RunConfig


class FakeEngine:
    """AsyncLLM.generate's contract: one final output per request, finishing in any order, or a refusal."""

    def __init__(self, refuse: dict[int, type[Exception]], seed: int):
        self.refuse, self.rng = refuse, random.Random(seed)

    async def generate(self, prompt, params, request_id):
        length = len(prompt["prompt_token_ids"])
        if length in self.refuse:
            raise self.refuse[length](f"prompt of {length} tokens refused")
        await asyncio.sleep(self.rng.random() / 100)
        # Completions arrive out of order: the backend orders them by index.
        outs = [
            SimpleNamespace(index=k, token_ids=[length, k], finish_reason="stop", logprobs=None)
            for k in reversed(range(params.n))
        ]
        yield SimpleNamespace(outputs=outs, finished=True)


def fake_vllm(engine: FakeEngine, n: int):
    from actors.vllm_backend import VLLMGenerator

    backend = VLLMGenerator.__new__(VLLMGenerator)
    backend.config = RunConfig(num_return_sequences=n)
    backend.cpu, backend.engine, backend.ids = False, engine, itertools.count()
    return backend


@pytest.mark.parametrize("seed", range(6))
def test_vllm_backend_yields_every_problem_once_and_refusals_as_errors(seed):
    pytest.importorskip("vllm")
    from vllm.exceptions import VLLMValidationError

    rng = random.Random(seed)
    size, n = rng.randint(1, 12), rng.randint(1, 4)
    # Prompt i has i + 1 tokens; a random subset is refused, by either exception vLLM raises for a bad request.
    kinds = [VLLMValidationError, ValueError]
    refused = {length: rng.choice(kinds) for length in range(1, size + 1) if rng.random() < 0.4}
    prompts = [[7] * (i + 1) for i in range(size)]

    async def collect():
        backend = fake_vllm(FakeEngine(refused, seed), n)
        return [r async for r in backend.generate(prompts, [f"p{i}" for i in range(size)])]

    results = asyncio.run(collect())
    assert sorted(i for i, _ in results) == list(range(size))
    for i, result in results:
        if i + 1 in refused:
            assert isinstance(result, str) and result.startswith("vLLM refused the request:")
        else:
            assert [s.token_ids for s in result] == [[i + 1, k] for k in range(n)]


def scripted_backend(n: int, dies_on: str | None, fatal: type[BaseException]):
    """A backend whose engine dies on the batch holding `dies_on`, else returns fixed samples.

    The Ray test sends this module's code to the workers by value: they cannot import tests.
    """

    class ScriptedBackend:
        name = "fake"
        fatal_errors = (fatal,)

        async def generate(self, prompts, keys):
            for j, key in enumerate(keys):
                if key == dies_on:
                    raise fatal()
                yield j, [Sample([11, 12], "stop", []) for _ in range(n)]

    return ScriptedBackend()


@pytest.fixture(scope="module")
def problems():
    from ray_pipeline.data import load_problems

    return load_problems("embedded:6", shard_size=3)


def test_a_dead_engine_exits_the_actor_process(problems, monkeypatch):
    """Re-raising would retry the batch on the same broken actor: the process must exit (Ray restarts it)."""
    pytest.importorskip("vllm")
    from vllm.v1.engine.exceptions import EngineDeadError

    import actors.generator as generator

    exits = []
    monkeypatch.setattr(generator.os, "_exit", lambda code: exits.append(code) or (_ for _ in ()).throw(SystemExit))
    config = RunConfig(backend="hf", num_return_sequences=2, stream_every=1)
    actor = GeneratorActor(config)
    actor.backend = scripted_backend(2, problems.column("problem_id")[1].as_py(), EngineDeadError)

    async def collect():
        return [t async for t in actor(problems.slice(0, 3))]

    with pytest.raises(SystemExit):
        asyncio.run(collect())
    assert exits == [1]


def test_ray_restarts_a_generator_whose_engine_died_and_retries_its_batch(joined_ray, problems, tmp_path):
    """Real Ray Data: the first actor's engine dies mid-run; every problem still comes out N times, once."""
    pytest.importorskip("vllm")
    import ray

    from ray_pipeline.pipeline import generate_stage

    died = tmp_path / "died"
    victim = problems.column("problem_id")[4].as_py()
    class FlakyGenerator(GeneratorActor):
        def make_backend(self, path):
            from vllm.v1.engine.exceptions import EngineDeadError

            try:
                died.open("x").close()  # only the first actor's engine dies
                dies_on = victim
            except FileExistsError:
                dies_on = None
            return scripted_backend(self.config.num_return_sequences, dies_on, EngineDeadError)

    config = RunConfig(
        backend="hf", num_return_sequences=2, generate_batch_size=1, generate_in_flight=2, cpus_per_actor=0.5
    ).validate()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    rows = generate_stage(config, problems, FlakyGenerator).take_all()
    assert died.exists()
    keys = sorted((r["problem_id"], c["candidate_index"]) for r in rows for c in r["candidates"])
    assert keys == sorted((p, k) for p in problems.column("problem_id").to_pylist() for k in range(2))


@pytest.mark.fast
@pytest.mark.parametrize(
    ("flags", "context"),
    [
        ({}, "ENGINE_CONTEXT"),
        ({"generation": "deepconf-online"}, "LLM_CLASS"),
        ({"engine_confidence": True}, "LLM_CLASS"),
    ],
)
def test_trace_runs_are_scheduled_as_llm_schedules_an_offline_batch(monkeypatch, flags, context):
    """A run of traces gets `LLM`'s scheduler defaults (an embedded engine's are an eighth of them on an H100); a
    full run keeps the embedded engine's (BENCHMARKS.md, 2026-12-06, commit 5257ab7, says why)."""
    pytest.importorskip("vllm")
    import inspect

    from vllm import LLM
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    from actors.vllm_backend import VLLMGenerator

    # The generator sets vLLM's variables for its engine processes: here they go back after the test.
    for name in ("VLLM_USE_V2_MODEL_RUNNER", "VLLM_USE_AOT_COMPILE", "VLLM_BATCH_INVARIANT"):
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    asked = []
    monkeypatch.setattr(
        AsyncLLM, "from_engine_args", classmethod(lambda cls, args, **kw: asked.append((args, kw)) or "engine")
    )
    generator = VLLMGenerator("/nowhere", RunConfig(backend="vllm", **flags))
    assert generator.engine == "engine"
    assert asked[0][1]["usage_context"] == getattr(UsageContext, context)
    # What LLM passes for its own engine (so the two stay the same should vLLM rename it).
    assert "usage_context=UsageContext.LLM_CLASS" in inspect.getsource(LLM.__init__)
