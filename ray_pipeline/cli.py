"""What every entry point does around its job: Ray kept quiet, the resume command, one last error line.

The rule: a refused job ends with one `error: ...` line, the last line on stderr, and exit 2.
A stop signal (Ctrl-C's SIGINT, SIGTERM from Kubernetes, Slurm or `ray job stop`, SIGHUP from a
closed terminal) ends it with one `interrupted...` line naming the command that resumes, and exit
128 + the signal's number (130, 143, 129), as a shell reports a process the signal stopped.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import traceback
import warnings
from collections.abc import Callable

from ray_pipeline.cluster import signals
from ray_pipeline.errors import PipelineError, first_line, os_error_text

# Flags that must not be repeated when resuming: they would start over or redo finished shards.
_NOT_REPEATED = {"--overwrite": 0, "--no-resume": 0, "--reprocess_failed": 0, "--reprocess_shards": 1}


class Interrupted(PipelineError):
    """A stop signal during a job; the message says how to resume."""


def program(module: str) -> str:
    """How the user started the job: the console script's name, else `python -m module`."""
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    return script if script.startswith("bestofn-") else f"python -m {module}"


def resume_command(prog: str, argv: list[str], run_id: str) -> str:
    """The command that resumes the run `run_id`: the given flags, less those that would redo work."""
    kept, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        name = arg.split("=", 1)[0]
        if name in _NOT_REPEATED:
            skip = _NOT_REPEATED[name] if "=" not in arg else 0
            continue
        kept.append(arg)
    if not any(a == "--run_id" or a.startswith("--run_id=") for a in kept):
        kept += ["--run_id", run_id]
    return " ".join([prog, *map(shlex.quote, kept)])


def quiet_ray(verbose: bool) -> None:
    """Hide Ray's INFO lines, Ray Data's progress log and the workers' output unless `verbose`.

    Environment variables, since Ray reads them when it is imported and passes them to the
    processes a local Ray starts; a value the user set wins.
    """
    if verbose:
        return
    for name, value in {
        # Ray's own start-up notes (a local instance started, its token set-up) are warnings at most.
        "RAY_LOGGER_LEVEL": "error",
        # Ray Data's execution plan and its progress log lines when stdout is not a terminal.
        "RAY_DATA_LOG_LEVEL": "WARNING",
        # The C++ core's log lines (e.g. about large actor arguments) are for Ray's developers.
        "RAY_BACKEND_LOG_LEVEL": "fatal",
        # Progress bars (Ray Data's, the model loaders'): the job prints its own progress lines.
        "TQDM_DISABLE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }.items():
        os.environ.setdefault(name, value)


def quiet_ray_warnings(verbose: bool) -> None:
    """Hide Ray's deprecation notes about this code's own calls; call it after Ray is imported (it resets filters)."""
    if not verbose:
        warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in Ray")


def run_entry(job: Callable[[], object], *, verbose: bool = False) -> int:
    """Run `job`: 0 when it finishes, 2 with one `error:` line when it refuses or fails, 128 + n on stop signal n."""
    with signals.job_signals(quiet=not verbose):
        return _run(job, verbose)


def exit_process(status: int) -> None:
    """End the job's process with `status` once its last line is out, without the interpreter's finalization.

    Everything the job owns is closed by then (its Ray shut down, its files committed, its lines flushed). What
    finalization would add is Ray's half-made core worker after a stop during ray.init, whose destructor crashed
    the process (SIGSEGV, exit -11, after the job's own line), and about a second of module teardown.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _run(job: Callable[[], object], verbose: bool) -> int:
    try:
        job()
    except (Interrupted, KeyboardInterrupt) as exc:
        signals.job_ending()
        # The handler noted the signal; a KeyboardInterrupt it did not raise is Ctrl-C (Python's own handler).
        signum = signals.stop_signal(exc)
        detail = str(exc) if isinstance(exc, Interrupted) else "stopped before any work was committed"
        # Ctrl-C is the user's own key; another signal came from elsewhere, so the line names it.
        by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
        print(f"interrupted{by}: {detail}", file=sys.stderr, flush=True)
        return 128 + signum
    except PipelineError as exc:
        signals.job_ending()
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:
        # The system refused outside the storage layer (a full disk while caching a model, a log file).
        signals.job_ending()
        print(f"error: {os_error_text(exc)}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:  # noqa: BLE001 - an unforeseen failure still ends in one line; --verbose shows where
        signals.job_ending()
        if verbose:
            traceback.print_exc()
        first = first_line(exc, 300, default="no message")
        print(
            f"error: unexpected {type(exc).__name__}: {first} (rerun with --verbose for the traceback)",
            file=sys.stderr,
            flush=True,
        )
        return 2
    # The work is done: a signal now would only interrupt Ray's shutdown.
    signals.job_ending()
    return 0
