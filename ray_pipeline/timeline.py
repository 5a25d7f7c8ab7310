"""When each step of a job's start and stop happened, for `jobs.bench.start`; off unless asked for.

    RAY_PIPELINE_TIMELINE=/tmp/t.jsonl python -m jobs.infer ...

makes the driver and every actor of a local Ray (they inherit the driver's environment) append one
JSON line per step to that file: `{"event", "t" (Unix time), "pid"}`. Lines are short single writes
in append mode, so processes never interleave within one. Unset, `mark` returns at once.
"""

from __future__ import annotations

import json
import os
import time

ENV = "RAY_PIPELINE_TIMELINE"


def mark(event: str, at: float | None = None) -> None:
    """Note that `event` happened now (or at Unix time `at`), when $RAY_PIPELINE_TIMELINE names a file."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"event": event, "t": time.time() if at is None else at, "pid": os.getpid()}) + "\n"
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
    except OSError:
        # A benchmark's bookkeeping never stops a job.
        pass


def mark_process_start(event: str) -> None:
    """Note when this process was started (the OS's start time), e.g. an actor's worker before its imports."""
    if not os.environ.get(ENV):
        return
    import psutil

    mark(event, psutil.Process().create_time())


def read(path: str) -> list[dict]:
    """The events in a timeline file, in time order."""
    try:
        with open(path, encoding="utf-8") as f:
            events = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
    return sorted(events, key=lambda e: e["t"])
