"""The vLLM engine's arguments and environment per setting (no engine is built)."""

import os

import pytest

from actors.vllm_backend import engine_args, use_batch_invariance, use_loadable_compile_cache
from ray_pipeline.config import RunConfig

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("cpu", [True, False])
def test_reproducible_turns_prefix_caching_off_and_batch_invariance_on(monkeypatch, cpu):
    # setenv first, so that teardown restores the variable as it was (delenv alone records nothing if unset).
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "0")
    monkeypatch.delenv("VLLM_BATCH_INVARIANT")
    plain = engine_args("m", RunConfig(), cpu)
    use_batch_invariance(RunConfig())
    assert "enable_prefix_caching" not in plain and "VLLM_BATCH_INVARIANT" not in os.environ
    config = RunConfig(reproducible=True)
    args = engine_args("m", config, cpu)
    assert args["enable_prefix_caching"] is False
    assert {k: v for k, v in args.items() if k != "enable_prefix_caching"} == plain
    use_batch_invariance(config)
    assert os.environ["VLLM_BATCH_INVARIANT"] == "1"


def test_reproducible_changes_the_samples_so_it_is_fingerprinted():
    from ray_pipeline.config import config_fields

    assert "reproducible" in [f.name for f in config_fields("samples")]


def test_vllm_cpu_compiles_through_the_loadable_cache_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("VLLM_USE_AOT_COMPILE", raising=False)
    use_loadable_compile_cache(cpu=False)
    assert "VLLM_USE_AOT_COMPILE" not in os.environ
    use_loadable_compile_cache(cpu=True)
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "0"
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")
    use_loadable_compile_cache(cpu=True)
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "1"
