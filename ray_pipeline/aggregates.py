"""A candidate's scores from its stored per-token, per-step and per-layer values, in numpy.

The scorer (`scores.py`, torch) stores per-token confidences, per-step means and Chain-of-Embedding
layer transitions in the shards; the functions here turn those columns into the numbers the
selection methods rank by: the certainty mix of a span, the combined token/step certainty,
and CoE-R/CoE-C (DeepConf's window confidences are `deepconf.confidence`'s). Nothing here needs
torch or a model, so the reducer re-selects from shards with numpy and pyarrow alone.
"""

from __future__ import annotations

import math

import numpy as np


def mixed_certainty(self_certainty, entropy, lambda_weight: float, vocab_size: int):
    """Certainty of a span (its mean SC and H): lambda * SC / log V + (1 - lambda) * (1 - H / log V).

    Both terms are in nats over log V, so a nat of self-certainty and a nat of entropy weigh the
    same at every level of certainty: both are 0 for the uniform distribution and grow as p
    sharpens. H is at most log V, so its term lies in [0, 1]; SC = KL(U || p) has no upper bound
    (it grows without limit as p nears one-hot, and passes log V on confident responses), and its
    term keeps growing with it. A map that saturates (e.g. 1 - exp(-SC), equal to 1.0 in float64
    past SC = 36.7, its steps below e^-5 past SC = 5) would make sharp spans tie and leave the
    entropy term to decide alone. Both terms are monotone, so at lambda 1 or 0 a span's certainty
    ranks spans as its mean SC or mean H does. Takes floats or numpy arrays (elementwise).
    """
    log_v = math.log(vocab_size)
    return lambda_weight * (self_certainty / log_v) + (1.0 - lambda_weight) * (1.0 - entropy / log_v)


def combined_self_certainty(token_level: float, step_min: float, alpha: float) -> float:
    """alpha * token level + (1 - alpha) * step level.

    Token level is the mean certainty over the response's tokens; step level is the certainty
    of its least certain step (the weakest link of the reasoning, the original's "key step").
    """
    return alpha * token_level + (1.0 - alpha) * step_min


def coe_scores(magnitude, angle, span_magnitude: float, span_angle: float) -> tuple[float, float]:
    """CoE-R and CoE-C ("Latent Space Chain-of-Embedding Enables Output-free LLM Self-Evaluation", ICLR 2025).

    With M_l = magnitude_l / span_magnitude and A_l = angle_l / span_angle:
    CoE-R = mean(M) - mean(A) and CoE-C = |mean_l M_l e^{i A_l}|. Higher means more confident.
    NaN when there are no transitions or a span is zero.
    """
    m = np.asarray(magnitude, dtype=np.float64)
    a = np.asarray(angle, dtype=np.float64)
    if m.size == 0 or not span_magnitude or not span_angle:
        return math.nan, math.nan
    m, a = m / span_magnitude, a / span_angle
    coe_r = float(m.mean() - a.mean())
    coe_c = float(np.hypot((m * np.cos(a)).mean(), (m * np.sin(a)).mean()))
    return coe_r, coe_c
