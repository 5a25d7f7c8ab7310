"""A local Ray that a job starts goes with the job's process, even when that process is killed with SIGKILL.

ray.init ties the GCS and the raylet to the process that started them, and Ray's dashboard and
runtime-env agents follow the raylet, but only after trying to report its death to the GCS, which
is gone too: after a `kill -9` of the driver they lived on for one to two minutes, busy. Ray has no
setting for that, so a small watcher process does it: while the job's process lives, it notes every
process below it; when the job's process is gone, it stops those that are still running.

    python -m ray_pipeline.local_ray PID     (started by `reap_local_ray_with_this_process`)
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

# How often the watcher notes the processes below the job's, and how long they get to stop on SIGTERM.
SNAPSHOT_EVERY_S = 1.0
GRACE_S = 3.0

# The running watcher: its stdin is a pipe only this process holds open, so the pipe closes exactly when
# this process ends, however it ends. Kept here so it lives as long as the process.
_watcher: subprocess.Popen | None = None


def reap_local_ray_with_this_process() -> None:
    """Start the watcher for this process (once): the local Ray it started stops when it ends."""
    global _watcher
    if _watcher is not None and _watcher.poll() is None:
        return
    _watcher = subprocess.Popen(
        [sys.executable, "-m", "ray_pipeline.local_ray", str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # Its own session: a Ctrl-C or a closed terminal that reaches the job does not stop the watcher first.
        start_new_session=True,
    )


def _below(pid: int) -> set[tuple[int, float]]:
    """Every process below `pid`, as (pid, start time): a pid that is reused later is not the same process."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return set()
    found = set()
    for child in children:
        try:
            found.add((child.pid, child.create_time()))
        except psutil.Error:
            continue
    return found


def stop(processes: set[tuple[int, float]], grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM each process that still runs, SIGKILL those still running after `grace_s`; the pids signalled."""
    import psutil

    alive = []
    for pid, started in processes:
        try:
            process = psutil.Process(pid)
            if process.create_time() == started and process.pid != os.getpid():
                alive.append(process)
        except psutil.Error:
            continue
    for process in alive:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(alive, timeout=grace_s)
    for process in still:
        try:
            process.kill()
        except psutil.Error:
            pass
    return [p.pid for p in alive]


def watch(pid: int, every_s: float = SNAPSHOT_EVERY_S) -> None:
    """Note the processes below `pid` until stdin closes (the job's process ended), then stop them."""
    seen: set[tuple[int, float]] = set()
    while True:
        seen |= _below(pid)
        readable, _, _ = select.select([sys.stdin], [], [], every_s)
        if readable and not os.read(sys.stdin.fileno(), 4096):
            break
    # A job that ended normally has shut its Ray down already: then nothing here still runs.
    time.sleep(0.5)
    stop(seen)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(int(sys.argv[1]))
