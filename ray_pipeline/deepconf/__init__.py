"""DeepConf online: its stop rule, threshold and vote, and an exact offline simulator of it (numpy only).

DeepConf ("Deep Think with Confidence", Fu et al. 2025; facebookresearch/deepconf, `deepconf-online.py`)
does this per problem:

1. `warmup` traces run to their end. A trace's lowest group confidence is the least mean engine confidence
   over `window` consecutive tokens (the window clipped to the trace when the trace is shorter).
2. The threshold s is the `percentile`-th percentile (numpy's, linear) of the warm-up traces' lowest group
   confidences: 90 is DeepConf-low (most later traces stop), 10 DeepConf-high.
3. Every later ("final") trace stops at the first token whose last `window` tokens (a full window) have a
   mean engine confidence below s.
4. The vote: every generated trace whose lowest group confidence (over what it generated) is at least s
   votes for its answer with that confidence as its weight. That keeps the warm-up traces at or above s and
   the final traces that were not stopped; like `deepconf-online.py`, which marks every final trace whose
   lowest group confidence is below s as stopped after generation, it also leaves out a final trace shorter
   than the window whose mean is below s. Traces without an answer never vote.
5. Optional consensus stop (the paper's adaptive sampling): after each final trace, in trace order, the
   problem stops once the leading answer holds at least `consensus` of the vote's weight; the later traces do
   not vote (phase skipped). As in the paper, the check follows each new trace, so at least one final trace
   runs: the warm-up's vote alone (with DeepConf-low often one or two traces) never stops it. Which traces
   vote depends only on the traces, never on timing: the generator keeps `wave` final traces in flight and
   hands them to the check in trace order; a trace that finished after the stop was decided is counted as
   spent engine work, not as a vote.

A token's engine confidence is minus the mean of the generator's top-k log-probabilities of the raw
(temperature 1) distribution at that position, DeepConf's definition, read from the engine that samples
(vLLM's log-probs, or transformers' logits). It is stored rounded to a multiple of 2^-16 nat
(`token_confidences`), so every sum of confidences is an integer multiple of 2^-16 that float64 holds
exactly in any order: a window's mean is its exact sum divided by the window, one rounding. The generators'
running sums (`WindowMonitor`) and the simulator's cumulative sums (`window_means`) therefore give the same
means bit for bit, and the simulator (`replay_problem`) decides exactly what an online run on the same traces
decided. The scorer's `token_confidence` (a teacher-forced pass, up to 0.16 nat away in bf16) is never mixed in.
One limit under a consensus stop: the online check groups the answers of the traces finished so far, the replay
is given the classes of the complete run's answers; answer classes are cliques (`group_answers`), and where a
problem's answers are not transitively equivalent (50\\% ~ 0.5 and 50\\% ~ 50, 0.5 !~ 50) the classes of a
subset need not be those of the whole restricted to it, so the two can weigh a vote differently there.

The package: `confidence` (engine confidences, their windows, the stop rule), `online` (the threshold, the vote,
the replay), `strategies` (what DeepConf would have done on a full run's traces), `tables` (tokens against accuracy,
for the report and the benchmarks). Answer classes are
`ray_pipeline.answer_classes`, the interval statistics `ray_pipeline.metrics`.
"""

from ray_pipeline.deepconf.confidence import (
    CONFIDENCE_SCALE,
    WindowMonitor,
    first_stop,
    lowest_group_confidence,
    sliding_window_means,
    tail_confidence,
    token_confidences,
    window_means,
)
from ray_pipeline.deepconf.online import (
    FINAL,
    SKIPPED,
    WARMUP,
    OnlineSettings,
    OnlineVote,
    ProblemReplay,
    estimated_savings,
    filtered_vote,
    majority_class,
    online_vote,
    replay_problem,
    stop_threshold,
)

__all__ = [
    "CONFIDENCE_SCALE",
    "FINAL",
    "SKIPPED",
    "WARMUP",
    "OnlineSettings",
    "OnlineVote",
    "ProblemReplay",
    "WindowMonitor",
    "estimated_savings",
    "filtered_vote",
    "first_stop",
    "lowest_group_confidence",
    "majority_class",
    "online_vote",
    "replay_problem",
    "sliding_window_means",
    "stop_threshold",
    "tail_confidence",
    "token_confidences",
    "window_means",
]
