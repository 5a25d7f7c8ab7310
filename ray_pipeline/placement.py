"""What the cluster can give the actor pools, said rather than waited for.

At the start, once the job has joined Ray and resolved its 'auto' settings: a pool one of whose actors no alive
node can hold, and no autoscaler can add a node for, is refused in one line naming the pool, what one actor needs,
what the nodes have and the flag to change (`placement_refusal`). Ray itself would wait for ever: its actors stay
pending, and Ray Data warns that "the job may hang forever".

While the job runs (`ResourceWatch`): a pool with no actor running and some waiting for resources (every node that
could hold one busy, or lost mid-run) stops the whole job. The job then prints what it waits for every 10 s, naming
any node lost since the start, and after --resource_wait_s stops with one line saying so.

The decisions are pure functions over node and actor records (`Node`, `ActorRecord`); `cluster_nodes`,
`autoscaler_node_types` and `ResourceWatch.poll` read them from Ray.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ray_pipeline.errors import PipelineError
from ray_pipeline.progress import duration

# Resources every node declares that no actor of the pools asks for: left out of what the lines show.
_HOUSEKEEPING = ("memory", "object_store_memory")
_EPSILON = 1e-9
# How often the watch reads the cluster's state, and how often it says what the job waits for.
POLL_S = 1.0
WAIT_LINE_EVERY_S = 10.0


class ResourcesUnavailable(PipelineError):
    """The cluster cannot give an actor pool what one actor needs: refused at the start, or waited for too long."""


@dataclass(frozen=True)
class Node:
    """A Ray node as the GCS lists it: its id, address, whether it is alive and its total resources."""

    node_id: str
    address: str
    alive: bool
    resources: dict[str, float]

    @classmethod
    def from_ray(cls, entry: dict) -> Node:
        """From an entry of `ray.nodes()`."""
        return cls(
            str(entry.get("NodeID", "")),
            str(entry.get("NodeManagerAddress", "")),
            bool(entry.get("Alive", False)),
            {str(k): float(v) for k, v in (entry.get("Resources") or {}).items()},
        )

    def text(self) -> str:
        """'node 3f2a1b2c at 127.0.0.1 (scorer_node 1)': the id's first 8 digits, the address, its custom resources."""
        own = {k: v for k, v in self.resources.items() if _is_custom(k)}
        extra = f" ({', '.join(f'{k} {_number(v)}' for k, v in sorted(own.items()))})" if own else ""
        return f"node {self.node_id[:8]} at {self.address}{extra}"


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


def _is_custom(name: str) -> bool:
    return name not in ("CPU", "GPU", *_HOUSEKEEPING) and not name.startswith(("node:", "accelerator_type:"))


def _number(value: float) -> str:
    return f"{value:g}"


def resources_text(resources: dict[str, float]) -> str:
    """'{CPU: 1, GPU: 0.6, scorer_node: 1}': CPU and GPU first, then the rest by name."""
    order = sorted(resources, key=lambda k: (k != "CPU", k != "GPU", k))
    return "{" + ", ".join(f"{k}: {_number(resources[k])}" for k in order) + "}"


def actor_demand(wanted: dict) -> dict[str, float]:
    """What one actor of a pool reserves, from map_batches' resource arguments (`pipeline.actor_resources`).

    Ray Data reserves 1 CPU for an actor that names none (a GPU actor that wants exactly 1 leaves it out).
    """
    demand = {"CPU": wanted.get("num_cpus", 1.0), "GPU": wanted.get("num_gpus", 0.0), **wanted.get("resources", {})}
    return {k: float(v) for k, v in demand.items() if v}


def fits(total: dict[str, float], demand: dict[str, float]) -> bool:
    """Whether a node (or node type) with these total resources can hold one actor that needs `demand`."""
    return all(total.get(k, 0.0) + _EPSILON >= v for k, v in demand.items())


def nodes_text(nodes: list[Node], demand: dict[str, float]) -> str:
    """What the alive nodes have of the resources `demand` names: '{CPU: 2, GPU: 0} (x2), {CPU: 4, GPU: 0}'."""
    groups: dict[str, int] = {}
    for node in nodes:
        key = resources_text({k: node.resources.get(k, 0.0) for k in demand})
        groups[key] = groups.get(key, 0) + 1
    shown = [f"{key} (x{count})" if count > 1 else key for key, count in list(groups.items())[:4]]
    more = f" and {len(groups) - 4} other kinds" if len(groups) > 4 else ""
    return ", ".join(shown) + more if shown else "no alive node"


def _flags(pool: str, key: str, most: float, local: bool) -> str:
    """What to change when no node has enough of `key` (at most `most` on one node) for one actor of `pool`."""
    if key == "CPU":
        return f"pass --cpus_per_actor {_number(most)} or less"
    if key == "GPU":
        join = ", or join a cluster with GPUs (--ray_address)" if local else ""
        if most <= 0:
            return f"pass --gpus_per_{pool} 0 to run {pool}s on CPUs{join}"
        smaller = " (or a smaller --tensor_parallel_size)" if pool == "generator" else ""
        return f"pass --gpus_per_{pool} {_number(most)} or less{smaller}{join}"
    declare = f"ray start --resources '{{\"{key}\": 1}}'"
    if local:
        return f"join a cluster with a node that declares {key} ({declare}) by --ray_address, or drop --{pool}_resource"
    return f"declare {key} on a node ({declare}) or change --{pool}_resource"


def _shortfall(demand: dict[str, float], nodes: list[Node]) -> dict[str, float]:
    """The resources of `demand` no single node has enough of, each with the most one node has."""
    short = {}
    for key, need in demand.items():
        most = max((n.resources.get(key, 0.0) for n in nodes), default=0.0)
        if most + _EPSILON < need:
            short[key] = most
    return short


def _lacking(demand: dict[str, float], short: dict[str, float]) -> str:
    """Why the nodes cannot hold it, e.g. 'no node has scorer_node', 'the most CPUs on one node is 2'."""
    if not short:
        return "no single node has all of it"
    parts = []
    for key, most in short.items():
        if key == "GPU":
            parts.append("no node has a GPU" if most <= 0 else f"the most GPUs on one node is {_number(most)}")
        elif key == "CPU":
            parts.append(f"the most CPUs on one node is {_number(most)}")
        else:
            parts.append(f"no node has {key}" if most <= 0 else f"the most {key} on one node is {_number(most)}")
    return " and ".join(parts)


def placement_refusal(
    pool: str, demand: dict[str, float], nodes: list[Node], node_types: list[dict[str, float]] | None, local: bool
) -> str | None:
    """Why no actor of `pool` can ever start, in one line, or None if one can (or may: an autoscaler whose node
    types this job cannot see, `node_types` None, may add a node that holds it).

    `nodes` are the cluster's nodes (dead ones are left out here), `node_types` the total resources of each node
    type an autoscaler can add ([] when none can add any), `local` whether the job started this Ray itself.
    """
    alive = [n for n in nodes if n.alive]
    if any(fits(n.resources, demand) for n in alive) or node_types is None:
        return None
    if any(fits(t, demand) for t in node_types):
        return None
    short = _shortfall(demand, alive)
    adds = "no autoscaler can add a node" if not node_types else "no node type the autoscaler can add has it either"
    if short:
        fixes = "; ".join(dict.fromkeys(_flags(pool, key, most, local) for key, most in short.items()))
    else:
        fixes = f"lower what one {pool} needs (--cpus_per_actor, --gpus_per_{pool}, --{pool}_resource)"
    return (
        f"no node can hold a {pool} actor, which needs {resources_text(demand)}: {_lacking(demand, short)} (the "
        f"alive nodes have {nodes_text(alive, demand)}) and {adds}; {fixes}"
    )


def check_placement(demands: dict[str, dict[str, float]], local: bool) -> None:
    """Refuse, before any actor starts, a pool no node of the cluster Ray is joined to can hold (placement_refusal)."""
    # A Ray this job started has no autoscaler (and may not have written the read-only one's status yet).
    nodes, node_types = cluster_nodes(), [] if local else autoscaler_node_types()
    for pool, demand in demands.items():
        refusal = placement_refusal(pool, demand, nodes, node_types, local)
        if refusal:
            raise ResourcesUnavailable(refusal)


def cluster_nodes() -> list[Node]:
    import ray

    return [Node.from_ray(entry) for entry in ray.nodes()]


def autoscaler_node_types() -> list[dict[str, float]] | None:
    """The total resources of each node type an autoscaler can add: [] when nothing can add a node, None when an
    autoscaler runs whose node types this job cannot see.

    Ray 2.60 keeps a cluster config with node groups in the GCS where a platform reports one. Otherwise the
    autoscaler (v1) writes its status to the GCS's key-value store; on nodes started by hand (`ray start`,
    `ray.init`) that autoscaler is Ray's read-only one, whose node types are the running nodes themselves
    (`node_<node id>`), so it adds nothing. A cluster launcher's or KubeRay's autoscaler names its own node types,
    whose resources only it knows: the job cannot tell what it may add, and refuses nothing at the start.
    """
    import ray._private.state
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a GCS without the key or the call: no config reported
        config = None
    if config is not None and config.node_group_configs:
        return [{k: float(v) for k, v in g.resources.items()} for g in config.node_group_configs if g.max_count != 0]
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if is_autoscaler_v2(fetch_from_server=True):
            return None
    except Exception:  # noqa: BLE001 - no v2 flag to read: the v1 status below decides
        pass
    try:
        status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        report = json.loads(status).get("autoscaler_report") or {} if status else {}
    except Exception:  # noqa: BLE001 - an unreadable status is no autoscaler the job can count on
        report = {}
    mapping = report.get("node_type_mapping") or {}
    # No status yet counts as no autoscaler: a `ray start` cluster joined right after its start has written none
    # (its read-only monitor writes every few seconds), and a job that waited instead would wait --resource_wait_s.
    read_only = all(kind == f"node_{node}" for node, kind in mapping.items())
    return [] if read_only else None


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
