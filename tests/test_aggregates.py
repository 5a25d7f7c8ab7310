"""A candidate's scores from its stored values (numpy) against float64 references, and the reducer without torch."""

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ray_pipeline.aggregates import coe_scores, combined_self_certainty, mixed_certainty
from ray_pipeline.deepconf import lowest_group_confidence, sliding_window_means, tail_confidence

pytestmark = pytest.mark.fast


def test_combined_score_mixes_token_and_step_level():
    assert combined_self_certainty(token_level=0.8, step_min=0.2, alpha=0.25) == pytest.approx(0.25 * 0.8 + 0.75 * 0.2)


def test_mixed_certainty_weighs_a_nat_of_either_term_alike():
    vocab = 50
    log_v = math.log(vocab)
    # Uniform: SC = 0, H = log V -> 0 for every lambda. Sharper spans: SC grows without bound, H falls to 0.
    for lam in (0.0, 0.3, 1.0):
        assert mixed_certainty(0.0, log_v, lam, vocab) == pytest.approx(0.0)
    assert mixed_certainty(2.0, 1.0, 1.0, vocab) == 2.0 / log_v
    assert mixed_certainty(2.0, 1.0, 0.0, vocab) == pytest.approx(1.0 - 1.0 / log_v)
    want = 0.25 * 2.0 / log_v + 0.75 * (1 - 1.0 / log_v)
    assert mixed_certainty(2.0, 1.0, 0.25, vocab) == pytest.approx(want)
    # Arrays elementwise, as floats. (The scale itself: tests/test_certainty_scale.py.)
    sc, h = np.array([0.5, 2.0, 3.0]), np.array([3.0, 1.0, 0.2])
    mixed = mixed_certainty(sc, h, 0.6, vocab)
    assert mixed[1] == mixed_certainty(2.0, 1.0, 0.6, vocab)


def test_deepconf_window_confidences_match_float64_reference():
    confidence = (np.random.default_rng(3).random(50) * 5).astype(np.float32)
    values = [float(v) for v in confidence]
    for window in (1, 7, 50, 2048):
        width = min(window, len(values))
        naive = [sum(values[i : i + width]) / width for i in range(len(values) - width + 1)]
        got = sliding_window_means(confidence, window)
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, naive, rtol=1e-12)
        assert lowest_group_confidence(confidence, window) == pytest.approx(min(naive), rel=1e-12)
        assert tail_confidence(confidence, window) == pytest.approx(sum(values[-width:]) / width, rel=1e-12)
    # A dip in the middle: the lowest window finds it, the tail does not.
    dip = np.array([5.0] * 10 + [1.0] * 3 + [5.0] * 10, dtype=np.float32)
    assert lowest_group_confidence(dip, 3) == pytest.approx(1.0)
    assert tail_confidence(dip, 3) == pytest.approx(5.0)
    assert math.isnan(lowest_group_confidence(np.zeros(0), 4)) and math.isnan(tail_confidence(np.zeros(0), 4))
    # Plain lists (a candidate row's column) as arrays.
    assert lowest_group_confidence([5.0, 1.0, 5.0], 2) == pytest.approx(3.0)


def coe_reference(magnitude, angle, span_magnitude, span_angle):
    """CoE-R and CoE-C with plain float64 Python loops, as the paper defines them."""
    m = [x / span_magnitude for x in magnitude]
    a = [x / span_angle for x in angle]
    coe_r = sum(m) / len(m) - sum(a) / len(a)
    x = sum(mi * math.cos(ai) for mi, ai in zip(m, a)) / len(m)
    y = sum(mi * math.sin(ai) for mi, ai in zip(m, a)) / len(m)
    return coe_r, math.hypot(x, y)


def test_coe_scores_match_float64_reference():
    rng = np.random.default_rng(5)
    for transitions in (1, 12, 40):
        magnitude, angle = rng.random(transitions) * 3, rng.random(transitions) * math.pi
        span_magnitude, span_angle = float(rng.random() + 0.5), float(rng.random() + 0.1)
        want_r, want_c = coe_reference(magnitude.tolist(), angle.tolist(), span_magnitude, span_angle)
        r, c = coe_scores(magnitude.tolist(), angle.tolist(), span_magnitude, span_angle)
        assert (r, c) == (pytest.approx(want_r, rel=1e-9), pytest.approx(want_c, rel=1e-9))
    # No transitions, or a zero span (points on one ray from the origin: every angle is 0): undefined.
    assert all(math.isnan(v) for v in coe_scores([], [], 1.0, 1.0))
    assert all(math.isnan(v) for v in coe_scores([0.5, 0.5], [0.0, 0.0], 1.0, 0.0))
    assert all(math.isnan(v) for v in coe_scores([0.0, 0.0], [0.1, 0.2], 0.0, 0.3))


TORCHLESS_SELECTION = textwrap.dedent(
    """
    import sys

    sys.modules["torch"] = None  # `import torch` anywhere below raises ImportError
    import ray_pipeline.aggregates
    import ray_pipeline.metrics
    import ray_pipeline.plots
    import ray_pipeline.reduce
    import ray_pipeline.report
    from ray_pipeline.reduce import select_questions
    from ray_pipeline.selection import METHODS, MethodUnavailable, SelectionParams

    def candidate(pred, certainty, confidence):
        return {
            "pred": pred, "token_count": len(confidence), "vocab_size": 100,
            "mean_entropy": 1.0, "mean_self_certainty": certainty,
            "step_self_certainty": [certainty, certainty / 2], "step_entropy": [1.0, 1.0],
            "step_texts": ["a", "b"], "token_confidence": confidence,
            "coe_magnitude": [0.5, 0.7], "coe_angle": [0.2, 0.4], "coe_span_magnitude": 1.0,
            "coe_span_angle": 0.5, "step_self_eval": [0.5, 0.6],
        }

    question = [candidate("1", 0.5, [1.0, 2.0, 3.0]), candidate("2", 3.0, [4.0, 5.0, 6.0]), candidate(None, 9.0, [9.0])]
    picks = {}
    for name in METHODS:
        try:
            picks[name] = select_questions([question], name, SelectionParams())[0].index
        except MethodUnavailable:
            assert name == "deepconf-online", name  # a full run's shards: the online vote has nothing to count
    assert picks["self-certainty"] == 1 and picks["tail"] == 1 and picks["baseline"] == 0, picks
    assert sys.modules["torch"] is None, "torch was imported"
    print("selected without torch:", len(picks), "methods")
    """
)


def test_reducer_selection_and_report_import_and_select_without_torch():
    proc = subprocess.run(
        [sys.executable, "-c", TORCHLESS_SELECTION],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "selected without torch" in proc.stdout
