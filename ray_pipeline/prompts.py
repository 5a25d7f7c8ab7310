"""Prompt construction: the original template, or the model's chat template."""

from __future__ import annotations

ORIGINAL_TEMPLATE = "Q: {problem}\nLet's think step by step and output the final answer within \\boxed{{}}\nA:"
CHAT_INSTRUCTION = "{problem}\nLet's think step by step and output the final answer within \\boxed{{}}."


def build_prompt(problem: str, style: str, tokenizer=None) -> str:
    """The text sent to the model for one problem."""
    if style == "original":
        return ORIGINAL_TEMPLATE.format(problem=problem)
    if style == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("--prompt chat needs a tokenizer with a chat template")
        messages = [{"role": "user", "content": CHAT_INSTRUCTION.format(problem=problem)}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown prompt style {style!r}")
