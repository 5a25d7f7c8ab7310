"""A tiny random-weights model with SmolLM2's architecture and tokenizer, for tests whose assertions do not
depend on the model's answers (orchestration, resume, faults, stop signals).

Two layers of width 128 instead of thirty of 576: it loads in a fraction of a second and generates and scores
about ten times faster than the embedded weights, with the same tokenizer, chat template, vocabulary and
special tokens, so prompts, token counts, steps and every stored column look as they do for the real model.
Its weights are drawn from a fixed seed, so every session makes the same model; it never says EOS by intent, so
candidates mostly run to --max_tokens.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ray_pipeline.model import EMBEDDED_MODEL, resolve_model

# vLLM's CPU attention takes head sizes of 32 and up: 2 heads of 64 (one key/value head), as SmolLM2 has 64.
SHAPE = {
    "num_hidden_layers": 2,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
}


def make_tiny_model(folder: Path) -> Path:
    """Write the tiny model (bf16 safetensors, config, SmolLM2's tokenizer files) into `folder`; returns it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = Path(resolve_model(EMBEDDED_MODEL))
    config = AutoConfig.from_pretrained(source)
    for name, value in SHAPE.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    return folder
