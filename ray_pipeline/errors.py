"""Errors that the entry points turn into one-line messages and a non-zero exit."""

import errno
import os
import sys
from collections.abc import Callable


class PipelineError(Exception):
    """A user-facing error: its message says what is wrong and what to do."""


class ConfigError(PipelineError, ValueError):
    """A configuration value outside its allowed range."""


def first_line(exc: BaseException, limit: int = 200, default: str | None = None) -> str:
    """The first non-blank line of an exception's text, stripped and cut to `limit` characters.

    Library errors (Arrow, transformers, Ray) often run over many lines; a one-line message quotes
    only their first. With no text, `default`, else the exception's type name.
    """
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return (type(exc).__name__ if default is None else default)[:limit]


def exit_status(job: Callable[[], object]) -> int:
    """Run a job: 0 when it finishes, 2 with one `error: ...` line on stderr when it refuses."""
    try:
        job()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The system refused outside the storage layer (a full disk while caching a model, a log file).
        print(f"error: {os_error_text(exc)}", file=sys.stderr)
        return 2
    return 0


def os_error_text(exc: OSError) -> str:
    """An OSError as what failed, on which file, and what to do about it."""
    reason = os.strerror(exc.errno) if exc.errno else first_line(exc)
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space on that disk and run the same command again"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        # No flag named: the same failure reaches every job, and not every job takes --output_dir.
        fix = "check that path's permissions and run the same command again"
    else:
        fix = "check that path and run the same command again"
    return f"{reason}{where}: {fix}"
