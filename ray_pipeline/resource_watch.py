"""While the pools run: which actors wait for resources, what the job says it waits for, and when it has waited
too long (`ResourceWatch`). The decisions are pure functions over actor and node records; `ResourceWatch.poll`
reads them from Ray. The refusal at the start is `placement.check_placement`'s.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ray_pipeline.placement import (
    _EPSILON,
    Node,
    ResourcesUnavailable,
    _is_custom,
    _lacking,
    _number,
    _shortfall,
    cluster_nodes,
    fits,
    resources_text,
)
from ray_pipeline.progress import duration

# How often the watch reads the cluster's state, and how often it says what the job waits for.
POLL_S = 1.0
WAIT_LINE_EVERY_S = 10.0

@dataclass(frozen=True)
class ActorRecord:
    """One actor of the job as the GCS lists it: its class, state, process id and the node the GCS names for it."""

    class_name: str
    state: str
    pid: int
    node_id: str

    @classmethod
    def from_ray(cls, entry: dict) -> ActorRecord:
        """From an entry of `ray._private.state.actors()`."""
        return cls(
            str(entry.get("ActorClassName", "")),
            str(entry.get("State", "")),
            int(entry.get("Pid") or 0),
            str((entry.get("Address") or {}).get("NodeID", "")),
        )


# What the GCS says of an actor that waits for a node to hold it.
_PENDING, _RESTARTING, _ALIVE = "PENDING_CREATION", "RESTARTING", "ALIVE"


@dataclass
class PoolState:
    """A pool's actors at one look: running (alive, or starting on a node) and waiting for resources."""

    running: int = 0
    waiting: int = 0


def pool_states(
    actors: list[ActorRecord], class_names: dict[str, str], pending: list[dict[str, float]],
    demands: dict[str, dict[str, float]],
) -> dict[str, PoolState]:  # fmt: skip
    """Each pool's running and waiting actors. An actor waits for resources when it is pending with no process yet,
    or restarting (its process or its node lost), and its demand is among the resource requests the cluster has not
    met (`pending`); otherwise a pending or restarting actor is starting on a node. A pool's actors are those whose
    class name holds `(name)` (Ray Data names an actor `MapWorker(MapBatches(GeneratorActor))`)."""
    states = {pool: PoolState() for pool in class_names}
    for actor in actors:
        pool = next((p for p, name in class_names.items() if f"({name})" in actor.class_name), None)
        if pool is None:
            continue
        if actor.state == _ALIVE:
            states[pool].running += 1
        elif actor.state in (_PENDING, _RESTARTING):
            unplaced = actor.state == _RESTARTING or not actor.pid
            if unplaced and any(_same_request(bundle, demands[pool]) for bundle in pending):
                states[pool].waiting += 1
            else:
                states[pool].running += 1
    return states


def _same_request(bundle: dict[str, float], demand: dict[str, float]) -> bool:
    """Whether a resource request the cluster has not met is one actor of this demand: the same GPUs and custom
    resources, and where it asks for neither, the same CPUs (Ray's own keys aside)."""
    distinct = {k for k in {*bundle, *demand} if k == "GPU" or _is_custom(k)}
    keys = distinct or {"CPU"}
    return all(abs(bundle.get(k, 0.0) - demand.get(k, 0.0)) <= _EPSILON for k in keys)


@dataclass
class ResourceWatch:
    """While the pools run: says what the job waits for, and decides when it has waited too long.

    The job waits when some pool has no actor running and at least one waiting for resources. Once it has waited
    `every_s` (or half of `wait_s`, if less), and every `every_s` after, a line says so; once it has waited `wait_s`
    without a break (0: for ever) the watch's `reason` is the job's last line and, from `run`, the job's main thread
    gets it raised as a ResourcesUnavailable. Nodes lost since the start are named in both.
    """

    demands: dict[str, dict[str, float]]
    class_names: dict[str, str]
    wait_s: float
    write: Callable[[str], None] = field(default=lambda line: print(line, flush=True))
    every_s: float = WAIT_LINE_EVERY_S
    waiting_since: float | None = None
    last_line: float | None = None
    reason: str | None = None
    # Every node seen alive, by id, and those since lost (with when, on the watch's clock).
    seen: dict[str, Node] = field(default_factory=dict)
    lost: dict[str, float] = field(default_factory=dict)

    def observe(
        self, actors: list[ActorRecord], nodes: list[Node], pending: list[dict[str, float]], now: float
    ) -> str | None:
        """One look at the cluster: note lost nodes, write the waiting line when due; the stop reason once due."""
        alive = {n.node_id: n for n in nodes if n.alive}
        for node_id, node in alive.items():
            self.seen[node_id] = node
            self.lost.pop(node_id, None)
        for node_id in self.seen.keys() - alive.keys():
            self.lost.setdefault(node_id, now)
        states = pool_states(actors, self.class_names, pending, self.demands)
        stalled = {pool: s for pool, s in states.items() if s.waiting and not s.running}
        if not stalled:
            self.waiting_since = self.last_line = None
            return None
        if self.waiting_since is None:
            self.waiting_since = now
        waited = now - self.waiting_since
        what = "; ".join(self._waits_for(pool, s.waiting, list(alive.values())) for pool, s in stalled.items())
        limit = f" of --resource_wait_s {_number(self.wait_s)}" if self.wait_s else " (no limit)"
        line = f"  waiting for resources: {what}; {duration(waited)}{limit}"
        if self.wait_s and waited >= self.wait_s:
            if self.last_line is None:
                # A wait shorter than the first line's delay still shows on the progress lines before the job stops.
                self.write(line)
            fixes = "; ".join(self._fix(pool, list(alive.values())) for pool in stalled)
            self.reason = (
                f"waited {duration(waited)} for resources (--resource_wait_s {_number(self.wait_s)}): {what}; "
                f"{fixes}, or raise --resource_wait_s (0 waits for ever)"
            )
            return self.reason
        # The first line once the wait has lasted a while (an actor being placed waits a moment), then every every_s.
        first = min(self.every_s, self.wait_s / 2) if self.wait_s else self.every_s
        due = now - self.last_line >= self.every_s if self.last_line is not None else waited >= first
        if due:
            self.last_line = now
            self.write(line)
        return None

    def _waits_for(self, pool: str, count: int, alive: list[Node]) -> str:
        demand = self.demands[pool]
        needs = resources_text(demand)
        actors = f"1 {pool} needs {needs}" if count == 1 else f"{count} {pool}s need {needs} each"
        if any(fits(n.resources, demand) for n in alive):
            where = "which the alive nodes have but other actors hold"
        else:
            where = f"which no alive node has ({_lacking(demand, _shortfall(demand, alive))})"
        return f"{actors}, {where}{self.lost_text(demand)}"

    def lost_text(self, demand: dict[str, float] | None = None) -> str:
        """', lost: node 3f2a1b2c at 127.0.0.1 (scorer_node 1)': the nodes lost since the start (those that had
        something `demand` names first), or ''."""
        if not self.lost:
            return ""
        lost = [self.seen[node_id] for node_id in self.lost]
        if demand:
            lost.sort(key=lambda n: not any(k in n.resources for k in demand if _is_custom(k) or k == "GPU"))
        return f"; lost since the start: {', '.join(n.text() for n in lost)}"

    def _fix(self, pool: str, alive: list[Node]) -> str:
        demand = self.demands[pool]
        if any(fits(n.resources, demand) for n in alive):
            return f"free the nodes' resources or add a node that holds a {pool}"
        custom = [k for k in demand if _is_custom(k)]
        if custom:
            return f"add a node that declares {', '.join(custom)} (ray start --resources) or change --{pool}_resource"
        return f"add a node that holds a {pool}"

    def poll(self, job_id: str, now: float) -> str | None:
        """Read the job's actors, the nodes and the unmet resource requests from Ray, and `observe` them."""
        import ray
        import ray._private.state
        from ray._private.worker import global_worker
        from ray.autoscaler.v2.sdk import get_cluster_resource_state

        entries = ray._private.state.actors(job_id=ray.JobID.from_hex(job_id)).values()
        actors = [ActorRecord.from_ray(entry) for entry in entries]
        state = get_cluster_resource_state(global_worker.gcs_client)
        pending = [dict(r.request.resources_bundle) for r in state.pending_resource_requests]
        return self.observe(actors, cluster_nodes(), pending, now)

    @contextlib.contextmanager
    def run(self, poll_s: float = POLL_S, clock: Callable[[], float] = time.monotonic) -> Iterator[Callable]:
        """Watch in a thread for the block's duration. Yields `waiting()`, a context manager to wrap each wait for
        the pipeline's next batch: once the watch has a reason to stop, the wait raises it (the main thread is sent
        SIGUSR2, whose handler raises; outside the main thread the watch only writes its lines)."""
        import ray

        job_id = ray.get_runtime_context().get_job_id()
        done = threading.Event()
        lock = threading.Lock()
        in_wait = [False]
        main = threading.current_thread() is threading.main_thread()
        main_id = threading.main_thread().ident

        def raise_reason(signum=None, frame=None):
            if self.reason is not None and in_wait[0]:
                raise ResourcesUnavailable(self.reason)

        def watch():
            while not done.wait(poll_s):
                try:
                    reason = self.poll(job_id, clock())
                except Exception:  # noqa: BLE001 - a missed look (the GCS busy, Ray shutting down) is retried
                    continue
                if reason is not None:
                    with lock:
                        if main and not done.is_set() and in_wait[0]:
                            signal.pthread_kill(main_id, signal.SIGUSR2)
                    return

        @contextlib.contextmanager
        def waiting():
            in_wait[0] = True
            try:
                raise_reason()
                yield
            finally:
                in_wait[0] = False

        saved = signal.signal(signal.SIGUSR2, raise_reason) if main else None
        thread = threading.Thread(target=watch, name="resource-watch", daemon=True)
        thread.start()
        try:
            yield waiting
        finally:
            with lock:
                done.set()
            thread.join(timeout=10)
            if main:
                signal.signal(signal.SIGUSR2, saved)
