"""What a generation backend returns for one candidate: a `Sample`.

Both backends (`actors.generator.HFGenerator`, `actors.vllm_backend.VLLMGenerator`) and the generator
actor import it from here, so neither backend module imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Sample:
    token_ids: list[int]
    finish_reason: str
    # The sampler's log-probability of each token: filled only where the run asks for them.
    logprobs: list[float]
