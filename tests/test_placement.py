"""What the cluster cannot give is said, not waited for (issue 27, item 4), as pure functions over generated node,
node-type and actor lists: the refusal at the start, for every resource kind of every pool, and the watch that
says what a running job waits for and stops it after --resource_wait_s. The end-to-end cases are in
test_cli_errors.py (a refusal on the session's Ray) and test_cluster_mode.py (a node lost mid-run)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from ray_pipeline import pipeline, placement, resource_watch
from ray_pipeline.config import RunConfig
from ray_pipeline.placement import Node, placement_refusal, resources_text
from ray_pipeline.resource_watch import ActorRecord, ResourceWatch, pool_states

pytestmark = pytest.mark.fast

POOLS = ("generator", "scorer")


def node(i: int, alive: bool = True, **resources: float) -> Node:
    return Node(f"{i:02d}" + "ab" * 27, f"10.0.0.{i}", alive, {"memory": 1e10, "object_store_memory": 1e9, **resources})


# Clusters a job may find: one CPU node (a laptop's local Ray), a head and a worker with custom resources (the
# shape of test_cluster_mode's), a GPU node beside one with the custom resources, and a lost GPU node.
CLUSTERS = {
    "one CPU node": [node(1, CPU=2)],
    "two nodes, custom resources": [node(1, CPU=2, generator_node=1), node(2, CPU=2, scorer_node=1)],
    "a GPU node and a custom one": [node(1, CPU=8, GPU=1), node(2, CPU=4, generator_node=1, scorer_node=1)],
    "a lost GPU node": [node(1, CPU=8, GPU=1, alive=False), node(2, CPU=4)],
}
# What one actor of a pool may ask for, as its flags give it.
KINDS = {
    "GPU fraction": lambda pool: {f"gpus_per_{pool}": 0.6},
    "whole GPUs": lambda pool: {f"gpus_per_{pool}": 2.0},
    "more CPUs than a node": lambda pool: {"cpus_per_actor": 16.0},
    "an unknown custom resource": lambda pool: {f"{pool}_resource": "nonexist_node"},
    "a known custom resource and a GPU": lambda pool: {f"{pool}_resource": f"{pool}_node", f"gpus_per_{pool}": 1.0},
}


def demands(config: RunConfig) -> dict[str, dict[str, float]]:
    return pipeline.pool_demands(config, has_gpu=False)


def holds(n: Node, demand: dict[str, float]) -> bool:
    return n.alive and all(n.resources.get(k, 0) >= v for k, v in demand.items())


def flags_to_change(pool: str, demand: dict[str, float], nodes: list[Node]) -> list[str]:
    """The flag of each resource no alive node has enough of; every flag of the pool when each exists somewhere."""
    flag = {"CPU": "--cpus_per_actor", "GPU": f"--gpus_per_{pool}"}
    short = [k for k, v in demand.items() if not any(holds(n, {k: v}) for n in nodes)]
    return [flag.get(k, f"--{pool}_resource") for k in short] or list(flag.values()) + [f"--{pool}_resource"]


CASES = list(itertools.product(POOLS, KINDS, CLUSTERS))


@pytest.mark.parametrize(("pool", "kind", "cluster"), CASES, ids=[" / ".join(c) for c in CASES])
def test_what_no_node_holds_and_no_autoscaler_adds_is_refused_in_one_line_naming_need_and_flag(pool, kind, cluster):
    config = dataclasses.replace(RunConfig(), **KINDS[kind](pool)).validate()
    demand = demands(config)[pool]
    nodes = CLUSTERS[cluster]
    refusal = placement_refusal(pool, demand, nodes, [], local=False)
    if any(holds(n, demand) for n in nodes):
        assert refusal is None
        return
    assert refusal is not None and "\n" not in refusal
    assert refusal.startswith(f"no node can hold a {pool} actor, which needs {resources_text(demand)}: ")
    assert "no autoscaler can add a node" in refusal
    # What the alive nodes have of what it needs: a lost node holds nothing.
    alive = [n for n in nodes if n.alive]
    assert f"the alive nodes have {placement.nodes_text(alive, demand)}" in refusal
    for flag in flags_to_change(pool, demand, nodes):
        assert flag in refusal, refusal


@pytest.mark.parametrize("pool", POOLS)
def test_an_autoscaler_that_can_add_a_fitting_node_or_whose_node_types_are_unknown_refuses_nothing(pool):
    demand = demands(dataclasses.replace(RunConfig(), **{f"gpus_per_{pool}": 0.6}))[pool]
    nodes = CLUSTERS["one CPU node"]
    assert placement_refusal(pool, demand, nodes, None, local=False) is None
    assert placement_refusal(pool, demand, nodes, [{"CPU": 8.0, "GPU": 1.0}], local=False) is None
    refusal = placement_refusal(pool, demand, nodes, [{"CPU": 64.0}], local=False)
    assert refusal and "no node type the autoscaler can add has it either" in refusal


def test_the_issues_examples_read_as_one_actionable_line():
    gpu = demands(RunConfig(gpus_per_generator=0.6))["generator"]
    assert placement_refusal("generator", gpu, CLUSTERS["one CPU node"], [], local=True) == (
        "no node can hold a generator actor, which needs {CPU: 1, GPU: 0.6}: no node has a GPU (the alive nodes have "
        "{CPU: 2, GPU: 0}) and no autoscaler can add a node; pass --gpus_per_generator 0 to run generators on CPUs, "
        "or join a cluster with GPUs (--ray_address)"
    )
    custom = demands(RunConfig(generator_resource="nonexist_node"))["generator"]
    assert placement_refusal("generator", custom, CLUSTERS["two nodes, custom resources"], [], local=False) == (
        "no node can hold a generator actor, which needs {CPU: 1, nonexist_node: 1}: no node has nonexist_node (the "
        "alive nodes have {CPU: 2, nonexist_node: 0} (x2)) and no autoscaler can add a node; declare nonexist_node on "
        "a node (ray start --resources '{\"nonexist_node\": 1}') or change --generator_resource"
    )


def test_a_gpu_actor_that_wants_one_cpu_counts_the_cpu_ray_data_reserves_for_it():
    assert demands(RunConfig(gpus_per_scorer=1.0))["scorer"] == {"CPU": 1.0, "GPU": 1.0}
    assert demands(RunConfig(cpus_per_actor=0.0))["scorer"] == {}
    assert demands(RunConfig(scorer_resource="x", cpus_per_actor=2.0))["scorer"] == {"CPU": 2.0, "x": 1.0}


def test_the_start_check_runs_once_ray_is_joined_and_refuses_before_anything_starts(monkeypatch):
    monkeypatch.setattr(pipeline, "cluster_has_gpu", lambda: False)
    monkeypatch.setattr(pipeline, "ray_joined", lambda: True)
    monkeypatch.setattr(placement, "cluster_nodes", lambda: CLUSTERS["two nodes, custom resources"])
    monkeypatch.setattr(placement, "autoscaler_node_types", lambda: [])
    ok = pipeline.resolve_execution(RunConfig(backend="hf", scorer_resource="scorer_node"), 10)
    assert ok.scorer_resource == "scorer_node"
    with pytest.raises(placement.ResourcesUnavailable, match=r"^no node can hold a scorer actor"):
        pipeline.resolve_execution(RunConfig(backend="hf", scorer_resource="nonexist_node"), 10)
    # The in-process seam (has_gpu given) asks no cluster.
    assert pipeline.resolve_execution(RunConfig(backend="hf", scorer_resource="nonexist_node"), 10, has_gpu=False)


NAMES = {"generator": "GeneratorActor", "scorer": "ScorerActor"}
DEMANDS = {"generator": {"CPU": 1.0, "generator_node": 1.0}, "scorer": {"CPU": 1.0, "scorer_node": 1.0}}
HEAD, WORKER = node(1, CPU=2, generator_node=1), node(2, CPU=2, scorer_node=1)
LOST_WORKER = dataclasses.replace(WORKER, alive=False)


def actor(pool: str, state: str, pid: int = 0) -> ActorRecord:
    return ActorRecord(f"MapWorker(MapBatches({NAMES[pool]}))", state, pid, HEAD.node_id)


@pytest.mark.parametrize(
    ("records", "pending", "running", "waiting"),
    [
        ([actor("scorer", "ALIVE", 7)], [], 1, 0),
        # Pending with no process: waiting only if the cluster lists its request as unmet; else it is being placed.
        ([actor("scorer", "PENDING_CREATION")], [{"CPU": 1.0, "scorer_node": 1.0}], 0, 1),
        ([actor("scorer", "PENDING_CREATION")], [], 1, 0),
        ([actor("scorer", "PENDING_CREATION", 9)], [{"CPU": 1.0, "scorer_node": 1.0}], 1, 0),
        # Restarting (its node lost): the GCS may name any node for it, so the unmet request decides.
        ([actor("scorer", "RESTARTING", 9)], [{"scorer_node": 1.0, "CPU": 1.0}], 0, 1),
        ([actor("scorer", "RESTARTING", 9)], [{"CPU": 1.0, "generator_node": 1.0}], 1, 0),
        ([actor("scorer", "DEAD", 9), actor("scorer", "DEPENDENCIES_UNREADY")], [], 0, 0),
        ([ActorRecord("_StatsActor", "PENDING_CREATION", 0, "")], [{"CPU": 1.0, "scorer_node": 1.0}], 0, 0),
    ],
)
def test_an_actor_waits_for_resources_only_while_its_request_is_unmet(records, pending, running, waiting):
    state = pool_states(records, NAMES, pending, DEMANDS)["scorer"]
    assert (state.running, state.waiting) == (running, waiting)


def watch_after(wait_s: float, looks: list[tuple[float, list[ActorRecord], list[Node], list[dict]]]):
    lines: list[str] = []
    watch = ResourceWatch(DEMANDS, NAMES, wait_s, write=lines.append)
    reasons = [watch.observe(actors, nodes, pending, now) for now, actors, nodes, pending in looks]
    return watch, lines, reasons


SCORER_LOST = [actor("generator", "ALIVE", 5), actor("scorer", "RESTARTING", 6)]
UNMET = [{"CPU": 1.0, "scorer_node": 1.0}]


@pytest.mark.parametrize(("wait_s", "written", "first"), [(5.0, 1, "3 s"), (30.0, 2, "10 s"), (600.0, 59, "10 s")])
def test_a_lost_node_is_named_while_the_job_waits_and_in_its_last_line_after_the_limit(wait_s, written, first):
    running = [actor("generator", "ALIVE", 5), actor("scorer", "ALIVE", 6)]
    looks = [(0.0, running, [HEAD, WORKER], [])]
    # Looks every second from the loss on, until one past the limit.
    looks += [(1.0 + t, SCORER_LOST, [HEAD, LOST_WORKER], UNMET) for t in range(int(wait_s) + 1)]
    watch, lines, reasons = watch_after(wait_s, looks)
    assert reasons[:-1] == [None] * (len(looks) - 1) and reasons[-1] == watch.reason
    lost = f"node {WORKER.node_id[:8]} at 10.0.0.2 (scorer_node 1)"
    # A line once the wait has lasted 10 s (half the limit, if less), then every 10 s.
    assert len(lines) == written, lines
    assert lines[0] == (
        "  waiting for resources: 1 scorer needs {CPU: 1, scorer_node: 1}, which no alive node has (no node has "
        f"scorer_node); lost since the start: {lost}; {first} of --resource_wait_s {wait_s:g}"
    )
    waited = f"waited {resource_watch.duration(wait_s)} for resources "
    assert "\n" not in watch.reason and watch.reason.startswith(waited)
    assert lost in watch.reason and "change --scorer_resource" in watch.reason and "--resource_wait_s" in watch.reason


def test_the_wait_starts_over_when_an_actor_runs_again_and_zero_waits_for_ever():
    back = [actor("generator", "ALIVE", 5), actor("scorer", "ALIVE", 8)]
    nodes = [HEAD, LOST_WORKER, node(3, CPU=2, scorer_node=1)]
    looks = [(0.0, SCORER_LOST, [HEAD, LOST_WORKER], UNMET), (4.0, back, nodes, []), (6.0, SCORER_LOST, nodes, UNMET)]
    looks += [(10.0, SCORER_LOST, nodes, UNMET)]
    _, _, reasons = watch_after(5.0, looks)
    assert reasons == [None, None, None, None]
    hour = [(float(t), SCORER_LOST, [HEAD, LOST_WORKER], UNMET) for t in range(0, 3600, 5)]
    _, lines, reasons = watch_after(0.0, hour)
    assert set(reasons) == {None} and len(lines) == 359 and lines[-1].endswith(" (no limit)")


def test_busy_nodes_are_told_apart_from_missing_ones():
    waiting = [actor("generator", "PENDING_CREATION"), actor("scorer", "ALIVE", 6)]
    pending = [{"CPU": 1.0, "generator_node": 1.0}]
    looks = [(0.0, waiting, [HEAD, WORKER], pending), (2.0, waiting, [HEAD, WORKER], pending)]
    watch, lines, reasons = watch_after(3.0, [*looks, (3.0, waiting, [HEAD], pending)])
    # A wait that ends before its first line was due still shows one.
    assert watch_after(1.0, [(0.0, waiting, [HEAD], pending), (1.0, waiting, [HEAD], pending)])[1][0].endswith(
        "; 1 s of --resource_wait_s 1"
    )
    assert "which the alive nodes have but other actors hold" in lines[0] and "lost" not in lines[0]
    assert reasons[-1] and "free the nodes' resources or add a node that holds a generator" in reasons[-1]
    # A pool that still has one actor running is not waiting, whatever else is pending.
    still = [*waiting, actor("generator", "ALIVE", 3)]
    assert watch_after(1.0, [(float(t), still, [HEAD], pending) for t in range(5)])[1:] == ([], [None] * 5)


def test_a_pipeline_failure_after_a_lost_node_names_it():
    watch, _, _ = watch_after(5.0, [(0.0, [], [HEAD, WORKER], []), (1.0, [], [HEAD, LOST_WORKER], [])])
    assert watch.lost_text() == f"; lost since the start: node {WORKER.node_id[:8]} at 10.0.0.2 (scorer_node 1)"
    assert watch_after(5.0, [(0.0, [], [HEAD, WORKER], [])])[0].lost_text() == ""


@pytest.mark.parametrize(
    ("mapping", "types"),
    [
        # No status written yet (a `ray start` cluster just started): counted as no autoscaler.
        ({}, []),
        ({"abc": "node_abc", "def": "node_def"}, []),
        ({"10.0.0.1": "ray.head.default", "10.0.0.2": "gpu_worker"}, None),
    ],
)
def test_only_ray_s_read_only_autoscaler_or_none_means_nothing_can_be_added(monkeypatch, mapping, types):
    import json

    import ray._private.state
    from ray.autoscaler.v2 import utils
    from ray.experimental import internal_kv

    status = json.dumps({"autoscaler_report": {"node_type_mapping": mapping}}).encode() if mapping else None
    monkeypatch.setattr(ray._private.state.state, "get_cluster_config", lambda: None)
    monkeypatch.setattr(utils, "is_autoscaler_v2", lambda **kwargs: False)
    monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda key: status)
    assert placement.autoscaler_node_types() == types


def test_a_ray_the_job_started_itself_has_no_autoscaler_whatever_its_status_says(monkeypatch):
    """Right after ray.init the read-only autoscaler may not have written its status: a job's own local Ray is
    still refused what no node has, at once."""
    monkeypatch.setattr(placement, "cluster_nodes", lambda: CLUSTERS["one CPU node"])
    monkeypatch.setattr(placement, "autoscaler_node_types", lambda: None)
    demands = {"scorer": {"CPU": 1.0, "nonexist_node": 1.0}}
    with pytest.raises(placement.ResourcesUnavailable, match="no node has nonexist_node"):
        placement.check_placement(demands, local=True)
    placement.check_placement(demands, local=False)  # a joined cluster's unknown autoscaler may add one
