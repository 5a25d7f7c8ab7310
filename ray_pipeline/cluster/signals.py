"""A job's stop signals: Ctrl-C's SIGINT, SIGTERM (Kubernetes, Slurm, `ray job stop`) and SIGHUP (a closed
terminal) end it with one line and the resume command, whenever they land: before the job (`stop_before_the_job`),
while it runs (`job_signals`, which `cli.run_entry` holds), while ray.init starts or joins Ray
(`stop_signals_held_over_ray_init`) and while Ray shuts down (`job_ending`). Ray's own handlers and its notes of
the stop are kept out of the way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from ray_pipeline.timeline import mark

# The signals a terminal or a scheduler sends to stop a job before it kills it.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """A stop signal arrived. A KeyboardInterrupt, so that everything that turns Ctrl-C into the resume
    line (and leaves committed shards alone) does the same for SIGTERM and SIGHUP."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# Set while a job runs (job_signals, held by cli.run_entry): only then are the stop handlers (re)installed.
_job_running = False
# The stop signal that stopped the job (the first one), whatever exceptions it went through on its way up.
_stop_signum: int | None = None
# Set once the job has printed its last line: a signal then changes nothing.
_job_ended = False
# Set while a job runs without --verbose: a stop signal then mutes Ray's notes (_mute_ray_notes).
_quiet_job = False
# Ray's printer of pushed notes while a stop has muted them, else None.
_ray_printer = None


def _note_stop(signum: int) -> None:
    """A stop signal arrived: remember the first, and mute Ray's notes of the stop in a quiet job."""
    global _stop_signum
    if _quiet_job:
        _mute_ray_notes()
    if _stop_signum is None:
        _stop_signum = signum


def _stop_job(signum: int, frame) -> None:
    _note_stop(signum)
    raise Stopped(signum)


def stop_before_the_job() -> None:
    """From the process's first line until run_entry takes over: a stop signal ends it at once with its line.

    Nothing has started then (no Ray, no file written), so there is nothing to unwind; without this a SIGTERM
    during the imports killed the job without a word (Python's default), and a SIGINT printed a traceback.
    """
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, _stopped_before_the_job)


def _stopped_before_the_job(signum: int, frame) -> None:
    if _job_ended:
        return
    by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
    sys.stderr.write(f"interrupted{by}: stopped before any work was committed\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def _mute_ray_notes() -> None:
    """Print none of the notes Ray's processes push to this driver from now on.

    On a stop, Ray Data kills the pools' actors, and for each batch one had in flight Ray pushes "(raylet) Task
    ... failed. There are infinite retries remaining, so the task will be retried" to the driver, which prints
    every pushed note on stdout whatever `log_to_driver` says. Ray has no setting to leave them out, so its
    printer (looked up by name for each note) is replaced for the rest of the job; worker logs, which reach
    the driver only with --verbose, go another way.
    """
    global _ray_printer
    worker = sys.modules.get("ray._private.worker")
    if _ray_printer is not None or not hasattr(worker, "print_to_stdstream"):
        return
    _ray_printer = printer = worker.print_to_stdstream

    def print_all_but_ray_notes(data, *args, **kwargs):
        if data.get("pid") != "raylet":
            printer(data, *args, **kwargs)

    worker.print_to_stdstream = print_all_but_ray_notes


def _unmute_ray_notes() -> None:
    """Ray's own printer back, once the job has ended (and its Ray with it): a later job in this process is new."""
    global _ray_printer
    if _ray_printer is not None:
        sys.modules["ray._private.worker"].print_to_stdstream = _ray_printer
        _ray_printer = None


def install_stop_handlers() -> None:
    """Route every stop signal to the job's handler; call it again after anything that replaces it.

    Ray would set its own around ray.init (see stop_signals_held_over_ray_init), and neither says how to resume.
    Outside run_entry (a library call, a test) it does nothing.
    """
    if _job_running and threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, _stop_job)


@contextlib.contextmanager
def stop_signals_held_over_ray_init():
    """Around ray.init in a job: a stop signal that lands while Ray starts is noted, and acted on (Stopped) once
    ray.init has returned and the job's handlers are back; Ray installs none of its own meanwhile.

    ray.init sets a SIGTERM handler (a bare sys.exit) and the head node it starts another (drain, kill its
    processes, sys.exit(1)); each replaced the job's for part of the start, and an exception raised inside
    ray.init can be swallowed by its own clean-up. A SIGTERM landing there ended a job with exit 1 and no line,
    or was lost and the job ran on (tests/test_signals.py's sweep, on a loaded machine). Ray has no setting to
    keep its handlers out, so its setter is replaced for the call. Nor does the driver's Ray core install its crash
    handler (abseil's), which also takes SIGTERM, printing a native stack dump and aborting (exit 134) when the
    signal lands while ray.init connects; Ray reads that setting when it creates the driver's core worker, and
    Ray's own processes keep theirs. Outside run_entry (a library call, a test) it changes nothing.
    """
    if not _job_running:
        yield
        return
    from ray._private import ray_constants

    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import ray._private.utils as ray_utils

    noted: list[int] = []

    def note(signum: int, frame) -> None:
        _note_stop(signum)
        noted.append(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, note)
    setter = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = setter
        install_stop_handlers()
    if noted:
        raise Stopped(noted[0])


def _ignore_stop_signals() -> None:
    """While the job ends (Ray shutting down), a further signal would only cut its last line short."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def job_signals(quiet: bool):
    """While a job runs: every stop signal raises Stopped (a KeyboardInterrupt) in it; with `quiet`, Ray's notes of
    the stop are muted. The handlers the process had come back after it."""
    global _job_running, _quiet_job, _stop_signum, _job_ended
    main_thread = threading.current_thread() is threading.main_thread()
    saved = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS} if main_thread else {}
    _job_running, _quiet_job, _stop_signum, _job_ended = True, quiet, None, False
    install_stop_handlers()
    try:
        yield
    finally:
        _job_running = _quiet_job = False
        _job_ended = True
        _unmute_ray_notes()
        for signum, handler in saved.items():
            if handler is not None:
                signal.signal(signum, handler)


def job_ending() -> None:
    """The job is ending (done, refused or stopped): a further signal is ignored, and a Ray this process started is
    shut down before the job's last line."""
    _ignore_stop_signals()
    _stop_ray()


def stop_signal(exc: BaseException) -> int:
    """The signal that stopped the job: the one the handlers noted, else the first Stopped among `exc` and the
    exceptions it was raised from or during, else SIGINT (a KeyboardInterrupt they did not raise is Ctrl-C,
    Python's own handler)."""
    return _stop_signum or _signal_in_chain(exc) or signal.SIGINT


def _stop_ray() -> None:
    """Shut a Ray this process started down first, so its exit messages come before our last line."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        mark("ray stopping")
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001 - the job is ending with its own message either way
            pass
        mark("ray stopped")


def _signal_in_chain(exc: BaseException | None) -> int | None:
    """The signal of the first Stopped among `exc` and the exceptions it was raised from or during."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, Stopped):
            return exc.signum
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
