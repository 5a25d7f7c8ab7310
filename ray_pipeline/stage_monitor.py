"""The run's StageMonitor actor: how often each batch was started, and when the first candidate was generated.

A module of its own, importing nothing but the standard library: the actor's process imports this module to
make the actor, and the pipeline's modules (pyarrow, the config, math-verify) would cost it seconds of CPU
while the pools' actors start beside it.
"""

from __future__ import annotations

from collections import Counter


class StageMonitor:
    """One small actor per run that the pools' actors report to: how often each batch was started,
    and when the first candidate was generated.

    Ray Data restarts a dead actor and retries its batch; how often is set only through
    map_batches' `**ray_remote_args` (max_restarts, max_task_retries), which Ray 2.60 deprecates
    with no named replacement. Without them a batch is retried without end, so each batch's
    attempts are counted here, where an actor's death does not reset the count.
    """

    def __init__(self):
        self.attempts: Counter[str] = Counter()
        self.generated_at: float | None = None

    def attempt(self, key: str) -> int:
        self.attempts[key] += 1
        return self.attempts[key]

    def generated(self, at: float) -> None:
        self.generated_at = at if self.generated_at is None else min(self.generated_at, at)

    def first_generated(self) -> float | None:
        return self.generated_at
