"""What the cluster can give the actor pools, said rather than waited for.

At the start, once the job has joined Ray and resolved its 'auto' settings: a pool one of whose actors no alive
node can hold, and no autoscaler can add a node for, is refused in one line naming the pool, what one actor needs,
what the nodes have and the flag to change (`placement_refusal`). Ray itself would wait for ever: its actors stay
pending, and Ray Data warns that "the job may hang forever".

While the job runs (`resource_watch.ResourceWatch`): a pool with no actor running and some waiting for resources
(every node that could hold one busy, or lost mid-run) stops the whole job. The job then prints what it waits for
every 10 s, naming any node lost since the start, and after --resource_wait_s stops with one line saying so.

The decisions are pure functions over node records (`Node`); `cluster_nodes` and `autoscaler_node_types` read them
from Ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ray_pipeline.errors import PipelineError

# Resources every node declares that no actor of the pools asks for: left out of what the lines show.
_HOUSEKEEPING = ("memory", "object_store_memory")
_EPSILON = 1e-9


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
