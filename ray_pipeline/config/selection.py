"""Selection: which candidate each method picks, and with which parameters (selection.SelectionParams)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ray_pipeline.answers import ANSWER_EXTRACTIONS
from ray_pipeline.config.options import Section, _opt
from ray_pipeline.errors import ConfigError

if TYPE_CHECKING:
    from ray_pipeline.config import RunConfig


@dataclass
class Selection(Section):
    """The method of the best-answer file and the parameters every method reads."""

    TITLE = "selection"
    ROLE = "selection"

    # Selection: every field but `method` is a parameter of the methods (selection.SelectionParams), in the
    # order summary.json and report.md name them.
    alpha: float = _opt(
        0.4,
        "weight of token-level certainty against step-level in the combined score",
        low=0.0,
        high=1.0,
    )
    lambda_weight: float = _opt(
        1.0,
        "mixing weight of a span's certainty: lambda * self-certainty / log V + (1 - lambda) * (1 - entropy / log V), "
        "from the span's mean per-token values: both terms 0 for a uniform distribution, a nat of either worth the "
        "same at every certainty (the self-certainty term has no upper bound, so sharp spans never tie)",
        low=0.0,
        high=1.0,
    )
    method: str = _opt(
        "self-certainty",
        "selection method for the best-answer file (jobs.main and jobs.reduce also take 'all')",
    )
    borda_power: float = _opt(0.5, "borda: rank r (0 = most certain) of N candidates votes (N - r)^p", low=0.0)
    borda_score: str = _opt(
        "token",
        "borda: what candidates are ranked by: mean token self-certainty (token, the Self-Certainty paper's) "
        "or the combined score of --alpha and --lambda_weight (combined)",
        choices=("token", "combined"),
    )
    deepconf_window: int = _opt(
        2048,
        "DeepConf: tokens per sliding window (lowest-group) and in the tail (clipped to the response)",
        low=1,
    )
    answerless_last: bool = _opt(
        True,
        "candidates without an extracted answer rank below every candidate with one in every score-based "
        "method, and DeepConf's filtered votes leave them out (--no-answerless_last: rank by score alone)",
    )
    answer_extraction: str = _opt(
        "boxed",
        "how a candidate's answer is read: the last \\boxed{} (boxed), that else the last number "
        "(boxed-then-last-number), or math-verify's LaTeX/expression extraction (math-verify)",
        choices=ANSWER_EXTRACTIONS,
    )


def check_method_inputs(config: RunConfig) -> None:
    """A method that reads what only a scoring setting stores is refused without it."""
    if config.method == "self-eval" and not config.self_eval:
        raise ConfigError(
            "method self-eval needs self_eval: its shards come from jobs.infer or jobs.main with --self_eval, "
            "so the scorer runs its passes"
        )
