"""What a generation backend returns for one candidate (a `Sample`), and how it says a request was refused.

Both backends (`actors.generator.HFGenerator`, `actors.vllm_backend.VLLMGenerator`), the generator actor and
the trace controller (`actors.traces`) import them from here, so neither backend module imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# finish_reason of a trace that DeepConf online stopped, and of one a consensus stop never launched.
LOW_CONFIDENCE, NOT_LAUNCHED = "low-confidence", "skipped"


@dataclass
class Sample:
    token_ids: list[int]
    # stop, length, LOW_CONFIDENCE or NOT_LAUNCHED.
    finish_reason: str
    # The sampler's log-probability of each token: filled only where the run asks for them.
    logprobs: list[float] = field(default_factory=list)
    # Each token's engine confidence (ray_pipeline.deepconf.token_confidences): traces only.
    confidences: list[float] = field(default_factory=list)
    # DeepConf online: warmup, final or skipped (ray_pipeline.deepconf); None in full generation.
    phase: str | None = None
    # Tokens kept when the online rule stopped the trace; None when it ran to its end.
    stopped_at: int | None = None
    # DeepConf online: the problem's threshold.
    threshold: float | None = None
    # Tokens the engine generated, including any after an early stop that were dropped; None: len(token_ids).
    engine_tokens: int | None = None


class RequestRefused(Exception):
    """The engine refuses this problem's request (e.g. too long): the problem becomes error rows, nothing else fails."""
