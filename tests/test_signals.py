"""Every signal a terminal or a scheduler sends before it kills a job ends it cleanly, and a local Ray the
job started goes with it, even after `kill -9`.

SIGINT (Ctrl-C), SIGTERM (Kubernetes, Slurm, `ray job stop`) and SIGHUP (a closed terminal): committed
shards are kept, one line says how to resume, the exit status is 128 + the signal's number, and
there is no traceback and no native stack dump. The kind is tested twice: through run_entry with
Ray's own handlers in the way (no Ray, every signal), and end to end with real Ray, real weights and
a signal that lands between two committed shards (test_interrupt_e2e.py does Ctrl-C).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from test_console import foreign_lines

from conftest import ROOT

STOP_SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]

# A job as run_entry sees it: ray.init's own SIGTERM handler replaces the job's, the pipeline puts the
# job's back (install_stop_handlers), and run.plan turns the interruption into the resume line.
FAKE_JOB = textwrap.dedent(
    """
    import signal, sys, time
    from ray_pipeline.cli import Interrupted, install_stop_handlers, run_entry

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


def expected_line(signum: int, detail: str) -> str:
    by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
    return f"interrupted{by}: {detail}"


@pytest.mark.fast
@pytest.mark.parametrize("stage", ["planned", "starting"])
@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_every_stop_signal_ends_a_job_with_one_line_and_its_status(signum, stage):
    proc = subprocess.Popen(
        [sys.executable, "-c", FAKE_JOB, stage], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    detail = "committed shards are kept in RUN; resume with: CMD" if stage == "planned" else (
        "stopped before any work was committed"
    )
    assert proc.returncode == 128 + signum, stderr
    assert stderr.splitlines() == [expected_line(signum, detail)]


@pytest.mark.fast
def test_outside_a_job_the_signal_handlers_are_left_alone():
    from ray_pipeline.cli import install_stop_handlers, run_entry

    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    install_stop_handlers()
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


def job_args(out: Path) -> list[str]:
    # One problem a shard and one a scorer batch: shards commit one by one, so a signal lands between two.
    return [
        "--dataset", "embedded:10", "--shard_size", "1", "--num_return_sequences", "2", "--max_tokens", "24",
        "--score_batch_size", "2", "--prompt", "chat", "--backend", "hf", "--seed", "2", "--output_dir", str(out),
        "--run_id", "run",
    ]  # fmt: skip


def start_job(out: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.infer", *job_args(out)], cwd=ROOT, text=True, start_new_session=True, **popen
    )


def wait_for(predicate, what: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: signal.Signals(s).name)
def test_a_scheduler_signal_stops_a_real_job_cleanly(tmp_path, signum):
    shards = tmp_path / "run" / "shards"
    driver = start_job(tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: any(shards.glob("shard-*.parquet")) or driver.poll() is not None, "a first shard")
        driver.send_signal(signum)
        stdout, stderr = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    done = sorted(shards.glob("shard-*.parquet"))
    assert 1 <= len(done) < 10, "the signal must land between the first and the last shard"
    assert driver.returncode == 128 + signum, stderr[-3000:]
    # One line on stderr, and it is the resume line: no traceback, no native stack dump.
    lines = [line for line in stderr.splitlines() if line.strip()]
    resume = "python -m jobs.infer " + " ".join(job_args(tmp_path))
    assert lines == [expected_line(signum, f"committed shards are kept in {tmp_path / 'run'}; resume with: {resume}")]
    # What was committed is intact and stays committed.
    import pyarrow.parquet as pq

    assert all(pq.read_table(p).num_rows == 2 for p in done)
    assert "SIGTERM received" not in stdout + stderr
    # A stop is no reason for Ray's notes: the actors it kills on the way out fail their batches, and Ray
    # pushes "the task will be retried" for each of them to the driver's console.
    assert foreign_lines(stdout) == []


def command_lines(pid: int) -> str:
    """The command lines of every process below `pid` (those that end while being read are left out)."""
    lines = []
    for p in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            lines.append(" ".join(p.cmdline()))
    return "\n".join(lines)


def test_a_local_ray_goes_with_a_driver_killed_with_sigkill(tmp_path):
    """kill -9 of the driver alone: every process it started (GCS, raylet, Ray's agents, the actors) ends too."""
    driver = start_job(tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Once the generator actor runs, every kind of process the local Ray has is up.
        wait_for(
            lambda: driver.poll() is not None or "GeneratorActor" in command_lines(driver.pid), "the generator actor"
        )
        assert driver.poll() is None, "the job ended before it could be killed"
        started = set()
        for p in psutil.Process(driver.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                started.add((p.pid, p.create_time()))
        names = command_lines(driver.pid)
        assert all(name in names for name in ("raylet", "gcs_server", "DashboardAgent", "RuntimeEnvAgent")), names
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()

        def alive() -> list[str]:
            left = []
            for pid, created in started:
                try:
                    p = psutil.Process(pid)
                    if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                        left.append(f"{pid} {p.name()}")
                except psutil.Error:
                    continue
            return left

        # Ray's agents outlived a killed driver by one to two minutes before the job had a watcher.
        deadline = time.monotonic() + 20
        while alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not alive(), alive()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
