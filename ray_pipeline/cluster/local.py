"""Local Rays: the one a job starts goes with the job's process, even when that process is killed with SIGKILL;
and `LocalCluster`, Ray nodes started with `ray start` on this machine (tests, `jobs.bench.start`).

ray.init ties the GCS and the raylet to the process that started them, and Ray's dashboard and
runtime-env agents follow the raylet, but only after trying to report its death to the GCS, which
is gone too: after a `kill -9` of the driver they lived on for one to two minutes, busy. Ray has no
setting for that, so a small watcher process does it: while the job's process lives, it notes every
process below it; when the job's process is gone, it stops those that are still running.

    python -m ray_pipeline.cluster.local PID    (started by `reap_local_ray_with_this_process`)
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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
        [sys.executable, "-m", "ray_pipeline.cluster.local", str(os.getpid())],
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


RAY_CLI = Path(sys.executable).with_name("ray")
NODE_STARTED = "Ray runtime started."


def free_ports(count: int) -> list[int]:
    """Ports that are free now; held open together so that no two are the same."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LocalCluster:
    """Ray nodes on this machine (`ray start --block`), token authentication on, in their own temp dir and ports.

    Each node is a `ray start --block` process: stopping it (SIGTERM) stops exactly that node's Ray processes,
    whereas `ray stop` kills every Ray process on the machine by name, including another job's local Ray. Every
    node pins its agents' ports: the dashboard agent's default (52365) would collide between two nodes and with
    any other Ray on the machine. `root` must be a short path: Unix socket paths under it stay under 108 bytes.
    """

    def __init__(self, root: Path, num_cpus: int = 2, extra_env: dict | None = None):
        self.root = root
        self.num_cpus = num_cpus
        self.token_path = root / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        self.temp_dir = root / "ray"
        self.nodes: list[tuple[str, subprocess.Popen, Path]] = []
        # The head's 5 further ports and 4 for each worker: room for three workers, one started again included.
        gcs, dashboard, *self.spare_ports = free_ports(2 + 5 + 3 * 4)
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.dashboard_url = f"http://127.0.0.1:{dashboard}"
        self.dashboard_port = dashboard
        inherited = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        self.env = inherited | {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            # A job's entrypoint `python` must be this environment's, as on a cluster node.
            "PATH": f"{RAY_CLI.parent}{os.pathsep}{os.environ.get('PATH', '')}",
            # A SIGTERMed node otherwise waits 30 s for a drain that only Ray Serve needs.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        } | (extra_env or {})

    def client_env(self) -> dict:
        """The environment a job joining this cluster needs: its address and its token."""
        return {"RAY_ADDRESS": self.gcs_address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    def _port(self) -> str:
        return str(self.spare_ports.pop())

    def start_head(self, resource: str | None = None, timeout_s: float = 300) -> None:
        self._start_node(
            "head",
            "--head",
            f"--port={self.gcs_address.rsplit(':', 1)[1]}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self._port()}",
            "--disable-usage-stats",
            resource=resource,
            timeout_s=timeout_s,
        )

    def add_worker(self, resource: str | None = None, timeout_s: float = 300) -> None:
        self._start_node("worker", f"--address={self.gcs_address}", resource=resource, timeout_s=timeout_s)

    def _start_node(self, name: str, *args: str, resource: str | None, timeout_s: float) -> None:
        log = self.root / f"{name}.log"
        command = [
            str(RAY_CLI),
            "start",
            "--block",
            *args,
            f"--temp-dir={self.temp_dir}",
            f"--num-cpus={self.num_cpus}",
            "--object-store-memory=300000000",
            *([f"--resources={json.dumps({resource: 1})}"] if resource else []),
            f"--dashboard-agent-listen-port={self._port()}",
            f"--dashboard-agent-grpc-port={self._port()}",
            f"--runtime-env-agent-port={self._port()}",
            f"--metrics-export-port={self._port()}",
        ]
        with log.open("w") as out:
            process = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.nodes.append((name, process, log))
        deadline = time.monotonic() + timeout_s
        while NODE_STARTED not in log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start ({name}) did not come up; its output:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop_node(self, name: str, timeout_s: float = 60) -> None:
        """Stop one node (`head`, `worker`: the last started of that name) as a lost machine would go: SIGTERM its
        `ray start --block` process, which stops that node's Ray processes, and wait until they have all ended."""
        import psutil

        index = max(i for i, (node, _, _) in enumerate(self.nodes) if node == name)
        _, process, _ = self.nodes.pop(index)
        try:
            children = psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        _, alive = psutil.wait_procs(children, timeout=15)
        for child in alive:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass

    def ray(self, *args: str, env: dict | None = None, timeout: int = 120, cwd: Path | None = None):
        """The `ray` CLI, with the cluster's token unless `env` replaces the environment."""
        return subprocess.run(
            [str(RAY_CLI), *args],
            cwd=cwd,
            env=self.env if env is None else env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self) -> list[str]:
        """Stop the workers, then the head; returns the processes that outlived it and had to be killed."""
        import psutil

        processes = []
        for _, process, _ in self.nodes:
            try:
                processes += psutil.Process(process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for _, process, _ in reversed(self.nodes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.nodes.clear()
        # Ray processes name their temp dir on their command line; workers were among the children.
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if str(self.temp_dir) in " ".join(proc.info["cmdline"] or []):
                    processes.append(proc)
            except psutil.Error:
                continue
        _, alive = psutil.wait_procs(processes, timeout=15)
        leftovers = []
        for proc in alive:
            try:
                leftovers.append(" ".join(proc.cmdline())[:200])
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        return leftovers


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(int(sys.argv[1]))
