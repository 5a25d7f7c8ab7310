"""One progress line for the whole job: problems scored, tokens/s and an ETA, at a bounded rate.

Plain lines rather than a redrawn bar, so they read the same in a terminal, a log file and
`ray job logs`. The driver sees a candidate once it is scored, so "scored" counts finished work.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc


def duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '1 h 02 min'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Counts scored candidates as batches reach the driver and prints a line every `every_s` seconds."""

    def __init__(
        self,
        problems: int,
        candidates_per_problem: int,
        every_s: float = 10.0,
        write: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.n = candidates_per_problem
        self.total_rows = problems * candidates_per_problem
        self.every_s = every_s
        self.write = write or (lambda line: print(line, flush=True))
        self.clock = clock
        self.started = self.last = clock()
        self.rows = self.tokens = 0
        # Rate and ETA are measured from the first batch on, so model loading does not skew them.
        self.first: tuple[float, int] | None = None

    def add(self, batch: pa.Table) -> None:
        now = self.clock()
        self.rows += batch.num_rows
        if self.first is None:
            self.first = (now, self.rows)
        if "token_count" in batch.column_names:
            self.tokens += pc.sum(batch.column("token_count")).as_py() or 0
        if self.rows >= self.total_rows or now - self.last >= self.every_s:
            self.last = now
            self.write(self.line(now))

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        elapsed = now - self.started
        share = self.rows / self.total_rows if self.total_rows else 1.0
        text = (
            f"  progress: {self.rows // self.n}/{self.total_rows // self.n} problems scored ({share:.0%}), "
            f"{self.rows}/{self.total_rows} candidates, {self.tokens / elapsed if elapsed > 0 else 0:.1f} tokens/s"
        )
        if self.rows >= self.total_rows:
            return f"{text}, done in {duration(elapsed)}"
        first_time, first_rows = self.first or (now, 0)
        rate = (self.rows - first_rows) / (now - first_time) if now > first_time else 0.0
        eta = duration((self.total_rows - self.rows) / rate) if rate > 0 else "?"
        return f"{text}, elapsed {duration(elapsed)}, ETA {eta}"
