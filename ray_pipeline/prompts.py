"""Prompt construction: the original template, or the model's chat template; the self-evaluation question."""

from __future__ import annotations

ORIGINAL_TEMPLATE = "Q: {problem}\nLet's think step by step and output the final answer within \\boxed{{}}\nA:"
CHAT_INSTRUCTION = "{problem}\nLet's think step by step and output the final answer within \\boxed{{}}."
SELF_EVAL_INSTRUCTION = (
    "Here is a math problem and the beginning of a solution.\n\n"
    "Problem: {problem}\n\n"
    "Solution so far:\n{previous}\n\n"
    "Next step:\n{step}\n\n"
    "Is the next step correct? Answer Yes or No."
)


def build_prompt(problem: str, style: str, tokenizer=None) -> str:
    """The text sent to the model for one problem."""
    if style == "original":
        return ORIGINAL_TEMPLATE.format(problem=problem)
    if style == "chat":
        return _chat(CHAT_INSTRUCTION.format(problem=problem), tokenizer)
    raise ValueError(f"unknown prompt style {style!r}")


def _chat(content: str, tokenizer) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("--prompt chat needs a tokenizer with a chat template")
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def build_self_eval_prompt(problem: str, previous: list[str], step: str, style: str, tokenizer=None) -> str:
    """The question whether `step` (after the `previous` steps) is correct; the answer follows the prompt.

    The original style ends with "\\nAnswer:" (options " Yes" / " No"); the chat style asks in a user
    turn and the assistant turn starts with the option ("Yes" / "No"): see `self_eval_options`.
    """
    text = SELF_EVAL_INSTRUCTION.format(
        problem=problem, previous="".join(previous).strip() or "(none)", step=step.strip()
    )
    if style == "original":
        return text + "\nAnswer:"
    return _chat(text, tokenizer)


def self_eval_options(style: str) -> tuple[str, str]:
    """The "correct" and "incorrect" answers as they follow the self-evaluation prompt."""
    return (" Yes", " No") if style == "original" else ("Yes", "No")
