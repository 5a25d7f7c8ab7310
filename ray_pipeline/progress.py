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


def pools_text(generators: int, scorers: int) -> str:
    """'1 generator and 1 scorer', '4 generators and 2 scorers'."""
    return f"{generators} generator{'s' * (generators != 1)} and {scorers} scorer{'s' * (scorers != 1)}"


class Progress:
    """The job's progress lines: the actors' start as a phase of its own, then scored candidates every `every_s` s.

    Tokens/s and the ETA count from the first generated candidate: the time the engines take to
    start is its own line, so it neither drags the rate down nor pushes the ETA out.
    """

    def __init__(
        self,
        problems: int,
        candidates_per_problem: int,
        every_s: float = 10.0,
        write: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        pools: str = "",
    ):
        self.n = candidates_per_problem
        self.total_rows = problems * candidates_per_problem
        self.every_s = every_s
        self.write = write or (lambda line: print(line, flush=True))
        self.clock = clock
        self.started = self.last = clock()
        self.rows = self.tokens = 0
        self.pools = pools
        # When the first candidate was generated (this clock); until then the actors are starting.
        self.generating_since: float | None = None
        if pools:
            self.write(f"  starting {pools}…")

    def generating(self, since: float) -> None:
        """The first candidate was generated at `since` (this clock): the start phase ended then."""
        if self.generating_since is not None:
            return
        self.generating_since = min(since, self.clock())
        if self.pools:
            self.write(f"  started {self.pools} in {duration(self.generating_since - self.started)}")

    def add(self, batch: pa.Table) -> None:
        now = self.clock()
        if self.generating_since is None:
            # Nobody said when generation began: a scored batch means it had.
            self.generating(now)
        self.rows += batch.num_rows
        if "token_count" in batch.column_names:
            self.tokens += pc.sum(batch.column("token_count")).as_py() or 0
        if self.rows >= self.total_rows or now - self.last >= self.every_s:
            self.last = now
            self.write(self.line(now))

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        since = self.generating_since if self.generating_since is not None else now
        working = now - since
        share = self.rows / self.total_rows if self.total_rows else 1.0
        text = (
            f"  progress: {self.rows // self.n}/{self.total_rows // self.n} problems scored ({share:.0%}), "
            f"{self.rows}/{self.total_rows} candidates, {self.tokens / working if working > 0 else 0:.1f} tokens/s"
        )
        if self.rows >= self.total_rows:
            return f"{text}, done in {duration(now - self.started)}"
        rate = self.rows / working if working > 0 else 0.0
        eta = duration((self.total_rows - self.rows) / rate) if rate > 0 else "?"
        return f"{text}, elapsed {duration(now - self.started)}, ETA {eta}"
