"""Sampling: how many candidates per problem and from which distribution (the original infer.py flags and
defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ray_pipeline.config.options import Matters, Section, _opt
from ray_pipeline.errors import ConfigError

if TYPE_CHECKING:
    from ray_pipeline.config import RunConfig


def _sampling(config: RunConfig) -> bool:
    return config.temperature > 0


@dataclass
class Sampling(Section):
    """N candidates per problem, their temperature, nucleus, length and seed."""

    TITLE = "sampling"
    ROLE = "samples"

    num_return_sequences: int = _opt(
        4, "candidates sampled per problem (N)", low=1, high=1024, aliases=("n_repetitive_sampling",)
    )
    temperature: float = _opt(
        0.1,
        "sampling temperature (0 = greedy, which needs num_return_sequences 1; vLLM takes at most 2)",
        low=0.0,
        high=2.0,
    )
    top_p: float = _opt(
        1.0,
        "nucleus sampling mass",
        low=0.0,
        low_open=True,
        high=1.0,
        matters=Matters(_sampling, ("temperature",), "greedy decoding (temperature 0) samples from no distribution"),
    )
    max_tokens: int = _opt(1024, "maximum new tokens per candidate", low=1, high=1_000_000)
    seed: int = _opt(
        0,
        "random seed for sampling",
        low=0,
        matters=Matters(_sampling, ("temperature",), "greedy decoding (temperature 0) draws nothing at random"),
    )

    def check(self) -> None:
        if self.temperature == 0 and self.num_return_sequences > 1:
            raise ConfigError(
                f"temperature 0 is greedy decoding, which gives one candidate: num_return_sequences must be 1 "
                f"with temperature 0, got {self.num_return_sequences}; pass --num_return_sequences 1 or a "
                "temperature in (0, 2]"
            )
