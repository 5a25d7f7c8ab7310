"""DeepConf online: generation by traces, their warm-up, threshold and consensus stop (ray_pipeline/deepconf/
describes the algorithm)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ray_pipeline.config.options import Matters, Section, _opt
from ray_pipeline.errors import ConfigError

if TYPE_CHECKING:
    from ray_pipeline.config import RunConfig

# full: every candidate runs to its end; deepconf-online: DeepConf's online early stopping (ray_pipeline/deepconf/).
GENERATIONS = ("full", "deepconf-online")


def _online(config: RunConfig) -> bool:
    return config.generation == "deepconf-online"


def _online_consensus(config: RunConfig) -> bool:
    return _online(config) and config.consensus is not None


_ONLY_ONLINE = "only deepconf-online generates by it (a full run's traces all run to their end)"


@dataclass
class Online(Section):
    """Whether candidates are generated as DeepConf traces, and how online stopping decides."""

    TITLE = "online (DeepConf)"
    ROLE = "samples"

    generation: str = _opt(
        "full",
        "full: every candidate runs to its end; deepconf-online: DeepConf's online early stopping: per problem "
        "--warmup_traces traces run to their end and set a threshold from their lowest group confidences "
        "(--deepconf_percentile), and every other trace stops once the mean engine confidence of its last "
        "--deepconf_window tokens falls below it",
        choices=GENERATIONS,
    )
    engine_confidence: bool = _opt(
        False,
        "full generation: also store each token's engine confidence (minus the mean of the generator's top "
        "--deepconf_top_k log-probs, what online stopping reads), so ray_pipeline.deepconf replays online stopping "
        "offline; each candidate is then its own request with its own seed (deepconf-online always stores them)",
    )
    # The online defaults (8 warm-up traces, consensus 0.95, DeepConf-low) are the cheapest setting of the
    # simulator's grid that kept accuracy within 2 points of full self-consistency (README, "DeepConf online").
    warmup_traces: int = _opt(
        8,
        "deepconf-online: traces per problem that run to their end and set its threshold (must be below "
        "--num_return_sequences: the rest may stop early)",
        low=1,
        matters=Matters(_online, ("generation",), _ONLY_ONLINE),
    )
    deepconf_percentile: float = _opt(
        90.0,
        "deepconf-online: a problem's threshold is this percentile of its warm-up traces' lowest group "
        "confidences (90: DeepConf-low, most traces stop; 10: DeepConf-high)",
        low=0.0,
        high=100.0,
        matters=Matters(_online, ("generation",), _ONLY_ONLINE),
    )
    consensus: float | None = _opt(
        0.95,
        "deepconf-online: after each final trace (in trace order) stop a problem once its confidence-weighted "
        "leading answer holds this share of the vote (DeepConf's adaptive sampling; answers read with "
        "--answer_extraction); off: no consensus stop, every final trace runs",
        low=0.0,
        low_open=True,
        high=1.0,
        matters=Matters(_online, ("generation",), _ONLY_ONLINE),
        off=True,
    )
    consensus_wave: int = _opt(
        8,
        "deepconf-online with --consensus: final traces of a problem in flight at once (which traces vote does not "
        "depend on it; traces that finish after the consensus are spent work)",
        low=1,
        matters=Matters(
            _online_consensus, ("generation", "consensus"), "only a consensus stop runs final traces in waves"
        ),
    )

    @property
    def trace_requests(self) -> bool:
        """Whether each candidate is generated as its own trace (own request and seed), with its engine confidences."""
        return self.generation == "deepconf-online" or self.engine_confidence


def check_online(config: RunConfig) -> None:
    """Online settings under which nothing could stop, or that have nothing to stop, are refused (they read the
    sampling section too)."""
    if config.generation != "deepconf-online":
        return
    n, warmup = config.num_return_sequences, config.warmup_traces
    if config.temperature == 0:
        raise ConfigError(
            "generation deepconf-online samples traces: temperature 0 (greedy) gives identical ones; pass a "
            "temperature in (0, 2]"
        )
    if warmup >= n:
        raise ConfigError(
            f"warmup_traces must be in [1, num_return_sequences - 1] with generation deepconf-online (only the "
            f"traces after the warm-up can stop), got warmup_traces {warmup} with num_return_sequences {n}"
        )
    if config.deepconf_window >= config.max_tokens:
        raise ConfigError(
            f"deepconf_window must be below max_tokens with generation deepconf-online (a trace stops only "
            f"once a whole window is generated), got deepconf_window {config.deepconf_window} with max_tokens "
            f"{config.max_tokens}"
        )
