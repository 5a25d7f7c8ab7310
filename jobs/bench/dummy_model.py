"""Random-weight models for the benchmarks: a real architecture's shape, no download.

Only the jobs/bench*.py jobs use it; the pipeline itself never writes a model.
"""

from __future__ import annotations

import os
from pathlib import Path

# Qwen2.5-Math-1.5B's architecture (config.json of the released model), for benchmarks with random weights.
QWEN25_MATH_15B_SHAPE = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "use_sliding_window": False,
}

# --dummy_shape's choices.
DUMMY_SHAPES = {"qwen2.5-math-1.5b": QWEN25_MATH_15B_SHAPE}


def write_random_model(shape: dict, out: Path) -> Path:
    """A Hugging Face folder with `shape`'s architecture, random bf16 weights and a byte-level tokenizer.

    vLLM's load_format="dummy" would only cover the generator; saved random weights let the
    transformers scorer load the very same model. The tokenizer covers the whole vocabulary, so
    any sampled id detokenizes; prompts tokenize to one id per byte (longer than a trained BPE).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    if (out / "config.json").is_file():
        return out
    # A byte-level BPE without merges: any text encodes (one token per byte), every id decodes.
    base = list(pre_tokenizers.ByteLevel.alphabet())
    size = shape["vocab_size"]
    names = sorted(base) + [f"w{i}" for i in range(len(base), size - 1)] + ["<|endoftext|>"]
    byte_level = Tokenizer(models.BPE(vocab={name: i for i, name in enumerate(names)}, merges=[]))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_level, eos_token="<|endoftext|>")
    shape = shape | {"bos_token_id": size - 1, "eos_token_id": size - 1}
    config = AutoConfig.for_model(**shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    return out
