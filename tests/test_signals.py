"""Every signal a terminal or a scheduler sends before it kills a job ends it cleanly, and a local Ray the
job started goes with it, even after `kill -9`.

SIGINT (Ctrl-C), SIGTERM (Kubernetes, Slurm, `ray job stop`) and SIGHUP (a closed terminal): committed
shards are kept, one line says how to resume, the exit status is 128 + the signal's number, and
there is no traceback and no native stack dump. The kind is tested twice: through run_entry with
Ray's own handlers in the way (no Ray, every signal), and end to end with the job's own local Ray, the
tiny model (no assertion reads an answer) and a signal that lands between two shards: the job's
generator holds shard 1 (tests/held_job.py), so the signal comes once shard 0 is committed, at any
speed (test_interrupt_e2e.py does Ctrl-C, on the real weights).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from held_job import HeldJob
from test_console import foreign_lines

from conftest import ROOT, run_in_process
from ray_pipeline.cluster.local import stop
from ray_pipeline.shards import shard_path

STOP_SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]

# A job as run_entry sees it: ray.init's own SIGTERM handler replaces the job's, the pipeline puts the
# job's back (install_stop_handlers), and run.plan turns the interruption into the resume line.
FAKE_JOB = textwrap.dedent(
    """
    import signal, sys, time
    from ray_pipeline.cli import Interrupted, run_entry
    from ray_pipeline.cluster.signals import install_stop_handlers

    def job():
        if sys.argv[1] == "planned":
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(15))  # what ray.init leaves behind
            install_stop_handlers()
        try:
            # Inside the try: a signal right after this line still lands where the job turns it into its line.
            print("ready", flush=True)
            time.sleep(120)
        except KeyboardInterrupt:
            if sys.argv[1] == "planned":
                raise Interrupted("committed shards are kept in RUN; resume with: CMD") from None
            raise

    sys.exit(run_entry(job))
    """
)


def signalled_when_ready(signum: int, script: str, *args: str) -> tuple[subprocess.Popen, str, str]:
    """Run `script` (python -c) until it prints "ready", send it `signum`; the process, its stdout and stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, stdout, stderr


def expected_line(signum: int, detail: str) -> str:
    by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
    return f"interrupted{by}: {detail}"


@pytest.mark.fast
@pytest.mark.parametrize("stage", ["planned", "starting"])
@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_every_stop_signal_ends_a_job_with_one_line_and_its_status(signum, stage):
    proc, _, stderr = signalled_when_ready(signum, FAKE_JOB, stage)
    detail = (
        "committed shards are kept in RUN; resume with: CMD"
        if stage == "planned"
        else ("stopped before any work was committed")
    )
    assert proc.returncode == 128 + signum, stderr
    assert stderr.splitlines() == [expected_line(signum, detail)]


# A job whose ray.init is under way when the signal lands: Ray's head node sets its own SIGTERM handler (it exits
# with 1) and Ray's clean-up swallows what is raised inside it (a bare except); both once made a stop signal end
# the job with exit 1 and no line, or be lost while the job ran on.
RAY_INIT_JOB = textwrap.dedent(
    """
    import sys, time
    import ray._private.utils as ray_utils
    from ray_pipeline.cli import Interrupted, run_entry
    from ray_pipeline.cluster.signals import stop_signals_held_over_ray_init

    def job():
        try:
            with stop_signals_held_over_ray_init():
                ray_utils.set_sigterm_handler(lambda *_: sys.exit(1))
                print("ready", flush=True)
                for _ in range(20):
                    try:
                        time.sleep(0.1)
                    except BaseException:
                        pass
            print("ray.init returned and the job went on", flush=True)
            time.sleep(120)
        except KeyboardInterrupt:
            raise Interrupted("committed shards are kept in RUN; resume with: CMD") from None

    sys.exit(run_entry(job))
    """
)


@pytest.mark.fast
@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_stop_signal_during_ray_init_ends_the_job_once_ray_init_returns(signum):
    proc, stdout, stderr = signalled_when_ready(signum, RAY_INIT_JOB)
    assert proc.returncode == 128 + signum, stderr
    assert stderr.splitlines() == [expected_line(signum, "committed shards are kept in RUN; resume with: CMD")]
    assert "went on" not in stdout


@pytest.mark.fast
def test_outside_a_job_the_signal_handlers_are_left_alone():
    import ray._private.utils as ray_utils

    from ray_pipeline.cli import run_entry
    from ray_pipeline.cluster.signals import install_stop_handlers, stop_signals_held_over_ray_init

    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    install_stop_handlers()
    setter = ray_utils.set_sigterm_handler
    with stop_signals_held_over_ray_init():
        assert ray_utils.set_sigterm_handler is setter
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before
    assert run_entry(lambda: None) == 0
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before


@pytest.mark.fast
@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_after_a_stop_a_quiet_job_prints_no_ray_notes(monkeypatch, capsys, signum, verbose):
    """Ray's printer of pushed notes, called as its listener thread calls it, before and after each stop signal."""
    import ray._private.worker as ray_worker

    from ray_pipeline import cli

    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)
    monkeypatch.setattr(ray_worker.stdout_deduplicator, "deduplicate", lambda data: [data])

    def ray_prints(pid, line: str) -> None:
        ray_worker.print_to_stdstream({"lines": [line], "pid": pid, "is_err": False}, ignore_prefix=False)

    def job():
        try:
            ray_prints("raylet", "note before the stop")
            os.kill(os.getpid(), signum)
            time.sleep(5)
        finally:
            # As Ray Data tears the pools down while the stop unwinds the job.
            ray_prints("raylet", "Task MapWorker(MapBatches(GeneratorActor)).submit failed ... will be retried")
            ray_prints(4321, "a worker's own line")

    original = ray_worker.print_to_stdstream
    assert cli.run_entry(job, verbose=verbose) == 128 + signum
    out = capsys.readouterr().out
    assert "note before the stop" in out and "a worker's own line" in out
    assert ("will be retried" in out) == verbose
    assert ray_worker.print_to_stdstream is original, "a later job in this process gets Ray's printer back"


# ------------------------------------------------------------------------------------------ end to end

# Every generator batch of a held job in the generator at once (--generate_in_flight): Ray Data hands an actor its
# batches in no set order, and with transformers' one batch at a time a held batch that came first would keep
# shard 0's out for good. With all of them in, the held ones wait while shard 0's is generated.
SHARDS = 3


def job_args(out: Path, model_path: str) -> list[str]:
    # One problem a shard and one a scorer batch (score_batch_size = N): shard 0 reaches the scorer alone and
    # commits while the held generator keeps the later shards' batches (tests/held_job.py).
    return [
        "--dataset", f"embedded:{SHARDS}", "--shard_size", "1", "--generate_in_flight", str(SHARDS),
        "--num_return_sequences", "2", "--max_tokens", "8", "--score_batch_size", "2", "--prompt", "chat",
        "--backend", "hf", "--seed", "2", "--model_path", model_path, "--output_dir", str(out), "--run_id", "run",
    ]  # fmt: skip


class SignalledJob(HeldJob):
    """A held job (tests/held_job.py) that also notes the processes below its driver once it holds, so a test can
    check that they all end, and a failed test stops whatever it left running."""

    started: set[tuple[int, float]] = set()

    def wait_until_held(self, shards: set[int], timeout_s: float = 600) -> None:
        super().wait_until_held(shards, timeout_s)
        self.started = processes_below(self.driver.pid)

    def kill(self) -> None:
        super().kill()
        stop(self.started, grace_s=1)


def wait_for(predicate, what: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def processes_below(pid: int) -> set[tuple[int, float]]:
    """Every process below `pid`, as (pid, start time): a pid reused later is not the same process."""
    found = set()
    for p in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            found.add((p.pid, p.create_time()))
    return found


def still_running(processes: set[tuple[int, float]]) -> list[str]:
    left = []
    for pid, created in processes:
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid} {' '.join(p.cmdline())[:200]}")
        except psutil.Error:
            continue
    return left


def assert_all_end(processes: set[tuple[int, float]], timeout_s: float = 300) -> None:
    """Every one of `processes` ends. It tests that they go, not how fast: the deadline only ends the wait."""
    deadline = time.monotonic() + timeout_s
    while still_running(processes) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not still_running(processes), still_running(processes)


def command_lines(pid: int) -> str:
    """The command lines of every process below `pid` (those that end while being read are left out)."""
    lines = []
    for p in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            lines.append(" ".join(p.cmdline()))
    return "\n".join(lines)


# SIGTERM between two shards; SIGHUP and SIGINT land at generated moments in the sweep below (and SIGINT between two
# shards on the real weights in test_interrupt_e2e.py).
@pytest.mark.parametrize("signum", [signal.SIGTERM], ids=lambda s: signal.Signals(s).name)
def test_a_scheduler_signal_stops_a_real_job_cleanly(tmp_path, tiny_model, signum):
    args = job_args(tmp_path, tiny_model)
    job = SignalledJob(tmp_path, args)
    try:
        # Shard 0 committed, shard 1's batch held in the generator: the signal lands between two shards.
        job.wait_until_held({0})
        job.driver.send_signal(signum)
        job.driver.wait(timeout=300)
    finally:
        job.kill()
    stdout, stderr = job.output()
    shards = tmp_path / "run" / "shards"
    done = sorted(shards.glob("shard-*.parquet"))
    assert [p.name for p in done] == [shard_path(shards, 0).name], "exactly the shards before the hold are kept"
    assert job.driver.returncode == 128 + signum, stderr[-3000:]
    # One line on stderr, and it is the resume line: no traceback, no native stack dump.
    lines = [line for line in stderr.splitlines() if line.strip()]
    resume = "python -m jobs.infer " + shlex.join(args)
    assert lines == [expected_line(signum, f"committed shards are kept in {tmp_path / 'run'}; resume with: {resume}")]
    # What was committed is intact and stays committed.
    import pyarrow.parquet as pq

    assert all(pq.read_table(p).num_rows == 2 for p in done)
    assert "SIGTERM received" not in stdout + stderr
    # A stop is no reason for Ray's notes: the actors it kills on the way out fail their batches, and Ray
    # pushes "the task will be retried" for each of them to the driver's console.
    assert foreign_lines(stdout) == []
    # The job's own Ray (GCS, raylet, agents, actors) goes with it.
    assert_all_end(job.started)


def test_a_local_ray_goes_with_a_driver_killed_with_sigkill(tmp_path, tiny_model):
    """kill -9 of the driver alone: every process it started (GCS, raylet, Ray's agents, the actors) ends too."""
    job = SignalledJob(tmp_path, job_args(tmp_path, tiny_model))
    try:
        # With shard 0 committed and shard 1's batch held, every kind of process the local Ray has is up and stays.
        job.wait_until_held({0})
        names = command_lines(job.driver.pid)
        assert all(name in names for name in ("raylet", "gcs_server", "DashboardAgent", "RuntimeEnvAgent")), names
        assert "GeneratorActor" in names, names
        # The watcher that stops them once the driver is gone (ray_pipeline.cluster.local) is one of them.
        assert f"ray_pipeline.cluster.local {job.driver.pid}" in names, names
        os.kill(job.driver.pid, signal.SIGKILL)
        job.driver.wait()
        # Ray's agents outlived a killed driver by one to two minutes before the job had a watcher.
        assert_all_end(job.started)
    finally:
        job.kill()


def sweep(seed: int) -> list[tuple[int, float]]:
    """Per stop signal two moments, as fractions of an uninterrupted job's wall time: one in its start (imports,
    plan, Ray's start) and one later (actors starting, generating, committing, shutting down)."""
    rng = random.Random(seed)
    return [(s, round(rng.uniform(lo, hi), 3)) for s in STOP_SIGNALS for lo, hi in ((0.01, 0.35), (0.35, 1.0))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model):
    """The sweep's job run to its end as a user runs it (its own local Ray): its wall time and its run folder."""
    out = tmp_path_factory.mktemp("uninterrupted")
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.infer", *job_args(out, tiny_model)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return time.monotonic() - started, out / "run"


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("shard-*.parquet"))}


@pytest.mark.parametrize("signum,fraction", sweep(27), ids=[f"{signal.Signals(s).name}-at-{f}" for s, f in sweep(27)])
def test_a_stop_signal_at_any_moment_ends_with_its_line_and_resumes_exactly(
    uninterrupted, tiny_model, tmp_path, signum, fraction
):
    """Wherever the signal lands (the moment is a share of the job's own wall time, so it lands in every phase on
    any machine), the job ends with its one line and 128 + n, or had already finished; the resume then gives the
    uninterrupted run's shards and best-answer file, byte for byte."""
    wall, whole = uninterrupted
    args = job_args(tmp_path, tiny_model)
    job = subprocess.Popen(
        [sys.executable, "-m", "jobs.infer", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        time.sleep(fraction * wall)
        if job.poll() is None:
            job.send_signal(signum)
        stdout, stderr = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    lines = [line for line in stderr.splitlines() if line.strip()]
    if job.returncode != 0:
        # What the job printed says in which phase the signal landed.
        assert job.returncode == 128 + signum, f"stderr: {stderr[-3000:]!r}; stdout: {stdout[-2000:]!r}"
        assert len(lines) == 1 and lines[0].startswith(expected_line(signum, "")), stderr[-3000:]
        assert foreign_lines(stdout) == [], stdout[-3000:]
        run_in_process("jobs.infer", *args)
    else:
        assert lines == [], stderr[-3000:]
    assert digests(tmp_path / "run" / "shards") == digests(whole / "shards")
    best = sorted(whole.parent.glob("*_best_*.jsonl"))
    assert best and [p.read_bytes() for p in best] == [p.read_bytes() for p in sorted(tmp_path.glob("*_best_*.jsonl"))]
