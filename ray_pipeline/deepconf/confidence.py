"""DeepConf's engine confidences (numpy only): a token's confidence, the means of its windows, a trace's lowest
group and tail confidence, and the online stop rule (`first_stop`, and `WindowMonitor` token by token).

Engine confidences are stored as multiples of 2^-16 nat (`token_confidences`). Every partial sum of such values
below 2^37 nat is a float64 without rounding, in any order, so a window's mean is its exact sum divided by the
window, one rounding: the float64 cumulative sums here, the generators' integer running sums (`WindowMonitor`,
the vLLM processor) and the simulator give the same means bit for bit. The scorer's teacher-forced confidences are
no such multiples; the same functions take them, with float64 sums.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

# Engine confidences are multiples of 1 / CONFIDENCE_SCALE nat.
CONFIDENCE_SCALE = 1 << 16


def token_confidences(top_logprobs) -> np.ndarray:
    """Engine confidence of each position from its top-k log-probabilities `[T, k]`: minus their mean, rounded
    to a multiple of 2^-16 nat (float64 `[T]`)."""
    top = np.asarray(top_logprobs, dtype=np.float64)
    if top.ndim != 2:
        raise ValueError(f"top_logprobs must be [positions, k], got shape {top.shape}")
    return np.rint(-top.mean(axis=1) * CONFIDENCE_SCALE) / CONFIDENCE_SCALE




def sliding_window_means(values, window: int) -> np.ndarray:
    """Means of every run of `min(window, T)` consecutive values of `values [T]`, float64 `[T - w + 1]` (empty for
    an empty trace): a trace shorter than the window is one clipped window."""
    values = np.asarray(values)
    width = min(window, values.size)
    if width == 0:
        return np.zeros(0, dtype=np.float64)
    sums = np.concatenate([np.zeros(1), np.cumsum(values, dtype=np.float64)])
    return (sums[width:] - sums[:-width]) / width


def window_means(confidence, window: int) -> np.ndarray:
    """Mean confidence of every full window of `window` consecutive tokens (float64 `[T - window + 1]`; empty
    when the trace is shorter than the window)."""
    confidence = np.asarray(confidence)
    return sliding_window_means(confidence, window) if confidence.size >= window else np.zeros(0, dtype=np.float64)


def lowest_group_confidence(confidence, window: int) -> float:
    """DeepConf's lowest group confidence: the least mean over windows of `window` tokens; a trace shorter than
    the window is one clipped window (its mean); NaN for an empty trace."""
    means = sliding_window_means(confidence, window)
    return float(means.min()) if means.size else math.nan


def tail_confidence(confidence, window: int) -> float:
    """DeepConf's tail confidence: the mean token confidence of the last `window` tokens (NaN when empty)."""
    confidence = np.asarray(confidence)
    if confidence.size == 0:
        return math.nan
    return float(confidence[-window:].astype(np.float64).mean())


def first_stop(confidence, window: int, threshold: float) -> int | None:
    """Tokens an online trace keeps: the end of its first full window whose mean is below `threshold`, or None
    when no window is (the trace runs to its end)."""
    below = np.flatnonzero(window_means(confidence, window) < threshold)
    return int(below[0]) + window if below.size else None




class WindowMonitor:
    """The online stop rule for one final trace: `add` each new token's engine confidence; True once the last
    `window` tokens have a mean below the threshold. Computes exactly what `window_means` computes."""

    def __init__(self, window: int, threshold: float):
        self.window, self.threshold = window, threshold
        self.recent: deque[int] = deque()
        self.units = 0
        self.divisor = window * CONFIDENCE_SCALE

    def add(self, confidence: float) -> bool:
        unit = round(confidence * CONFIDENCE_SCALE)
        self.recent.append(unit)
        self.units += unit
        if len(self.recent) > self.window:
            self.units -= self.recent.popleft()
        return len(self.recent) == self.window and self.units / self.divisor < self.threshold
