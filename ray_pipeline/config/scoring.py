"""Scoring: what the scorer computes and how its passes and logit tiles are cut."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ray_pipeline.config.options import Matters, Section, _opt

if TYPE_CHECKING:
    from ray_pipeline.config import RunConfig

SCORE_PASSES = ("auto", "candidate", "problem", "prefix")
# The scorer's logit tiles (positions x vocabulary entries) by device: small tiles stay in a CPU's cache;
# on a GPU each tile costs kernel launches, and a few large ones keep it busy.
SCORE_CHUNKS = {"cpu": (256, 16384), "cuda": (4096, 32768)}


def _problem_passes(config: RunConfig) -> bool | None:
    return None if config.score_pass == "auto" else config.score_pass == "problem"


@dataclass
class Scoring(Section):
    """The scorer's extra passes and confidences, its batches, passes and logit tiles."""

    TITLE = "scoring"
    ROLE = "scores"

    deepconf_top_k: int = _opt(20, "DeepConf: token confidence is -mean of the top-k log-probabilities", low=1)
    self_eval: bool = _opt(
        False,
        "scorer: ask the model whether each step is correct (extra forward passes; needed by self-eval)",
    )
    score_batch_size: int = _opt(
        8,
        "candidates per scorer call (Ray Data batch; the forward passes follow --score_pass); step prompts "
        "per self-eval pass",
        low=1,
        matters=Matters(
            lambda config: config.self_eval,
            ("self_eval",),
            "a candidate's scores never depend on its batch; only self-eval batches a candidate's step prompts by it",
        ),
    )
    score_pass: str = _opt(
        "auto",
        "the scorer's forward passes: candidate (one per candidate, no padding), problem (one padded pass over "
        "a problem's N candidates, up to --score_pass_tokens: fewer, larger passes), prefix (the prompt once, "
        "then each response on its cached keys and values: fewer tokens; models with sliding-window attention "
        "score one candidate a pass instead), auto (problem on GPU, prefix on CPU)",
        choices=SCORE_PASSES,
    )
    score_pass_tokens: int = _opt(
        16384,
        "most tokens in one problem pass (candidates x the longest): a problem's further candidates go to "
        "further passes, so a large N or long responses do not exhaust the GPU's memory",
        low=1,
        matters=Matters(_problem_passes, ("score_pass",), "only problem passes are cut by it"),
    )
    score_chunk_tokens: int | None = _opt(
        None,
        "positions per chunk of the chunked logit reduction (default: 256 on CPU, 4096 on GPU)",
        low=1,
    )
    score_chunk_vocab: int | None = _opt(
        None,
        "vocabulary entries per chunk of the chunked logit reduction (default: 16384 on CPU, 32768 on GPU)",
        low=1,
    )


def resolve_scoring(config: RunConfig, on_gpu: bool) -> RunConfig:
    """The config with the scorer's passes and logit tiles made concrete for a scorer on a GPU or a CPU."""
    tokens, vocab = SCORE_CHUNKS["cuda" if on_gpu else "cpu"]
    score_pass = config.score_pass if config.score_pass != "auto" else ("problem" if on_gpu else "prefix")
    return dataclasses.replace(
        config,
        score_pass=score_pass,
        score_chunk_tokens=config.score_chunk_tokens or tokens,
        score_chunk_vocab=config.score_chunk_vocab or vocab,
    )
