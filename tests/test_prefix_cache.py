"""Which models the scorer's prefix passes suit: a cache that can be cut back to the prompt (no model weights)."""

import pytest
from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

from ray_pipeline.model import prefix_cache_exact

pytestmark = pytest.mark.fast


@pytest.mark.parametrize(
    "config, exact",
    [
        (LlamaConfig(), True),
        (Qwen2Config(use_sliding_window=False), True),
        (MistralConfig(sliding_window=None), True),
        (MistralConfig(sliding_window=4096), False),
        (Qwen2Config(use_sliding_window=True, sliding_window=4096, max_window_layers=0), False),
        (Gemma2Config(), False),
        (LlamaConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), False),
        (LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2.0}), True),
    ],
    ids=[
        "llama", "qwen2", "mistral-no-window", "mistral-window", "qwen2-window", "gemma2", "dynamic-rope",
        "linear-rope",
    ],  # fmt: skip
)
def test_prefix_passes_only_where_the_cache_can_be_cut_back(config, exact):
    assert prefix_cache_exact(config) is exact
