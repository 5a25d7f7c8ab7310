"""Errors that the entry points turn into one-line messages and a non-zero exit."""

import sys
from collections.abc import Callable


class PipelineError(Exception):
    """A user-facing error: its message says what is wrong and what to do."""


class ConfigError(PipelineError, ValueError):
    """A configuration value outside its allowed range."""


def exit_status(job: Callable[[], object]) -> int:
    """Run a job: 0 when it finishes, 2 with one `error: ...` line on stderr when it refuses."""
    try:
        job()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
