"""Cluster mode on one machine: two Ray nodes joined with `ray start`, token authentication on, and
`ray job submit` of jobs.infer with the generator pool on the head and the scorer pool on the worker.

Each node is a `ray start --block` process: stopping it (SIGTERM) stops exactly that node's Ray
processes, whereas `ray stop` kills every Ray process on the machine by name, including another
test's or another checkout's local Ray.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from held_job import HeldJob
from test_e2e import check_outputs

from conftest import ROOT, run_job
from ray_pipeline.cluster import local as local_ray

SUBMISSION_ID = "bestofn-cluster"
# Refused submissions carry this in their entrypoint, so the job list shows whether one got through.
REFUSED_MARKER = "refused-submission"


class LocalCluster(local_ray.LocalCluster):
    """ray_pipeline.cluster.local.LocalCluster, its CLI run from the project root, its state listings checked."""

    def ray(self, *args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
        return super().ray(*args, env=env, timeout=timeout, cwd=ROOT)

    def start_head(self, resource: str | None = None) -> None:
        try:
            super().start_head(resource)
        except RuntimeError as exc:
            pytest.fail(str(exc))

    def add_worker(self, resource: str | None = None) -> None:
        try:
            super().add_worker(resource)
        except RuntimeError as exc:
            pytest.fail(str(exc))

    def list_state(self, kind: str, *args: str) -> list[dict]:
        proc = self.ray("list", kind, "--address", self.dashboard_url, "--format", "json", "--limit", "10000", *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # An empty listing is not JSON: Ray prints "No resource in the cluster".
        return [] if proc.stdout.strip() == "No resource in the cluster" else json.loads(proc.stdout)


@pytest.fixture(scope="module")
def cluster():
    # Unix socket paths under the temp dir must stay short (108 bytes), so not under pytest's tmp_path.
    root = Path(tempfile.mkdtemp(prefix="bestofn-cluster-"))
    local = LocalCluster(root)
    try:
        local.start_head("generator_node")
        local.add_worker("scorer_node")
        yield local
    finally:
        local.stop()
        shutil.rmtree(root, ignore_errors=True)


# The submitted job's flags, less --output_dir: the generator pool on the head, the scorer pool on the worker.
JOB_ARGS = (
    *("--dataset", "embedded:4", "--num_return_sequences", "2", "--max_tokens", "32", "--shard_size", "2"),
    *("--backend", "hf", "--generator_resource", "generator_node", "--scorer_resource", "scorer_node"),
    # check_outputs reads the run folder "run".
    *("--run_id", "run"),
)
BEST_FILE = "embedded4_best_SmolLM2-135M-Instruct_run.jsonl"


@pytest.fixture(scope="module")
def cluster_job(cluster, tmp_path_factory):
    """jobs.infer submitted to the cluster once; its output folder and the driver's log."""
    out = tmp_path_factory.mktemp("cluster") / "results"
    submit = cluster.ray(
        *("job", "submit", "--address", cluster.dashboard_url, "--submission-id", SUBMISSION_ID),
        *("--working-dir", ".", "--", "python", "-m", "jobs.infer", *JOB_ARGS, "--output_dir", str(out)),
        timeout=900,
    )
    logs = cluster.ray("job", "logs", "--address", cluster.dashboard_url, SUBMISSION_ID)
    assert logs.returncode == 0, logs.stderr[-3000:]
    return SimpleNamespace(out=out, submit=submit, logs=logs.stdout)


def test_cluster_has_both_nodes_with_their_resources(cluster):
    nodes = [n for n in cluster.list_state("nodes") if n["state"] == "ALIVE"]
    assert len(nodes) == 2, nodes
    head = next(n for n in nodes if n["is_head_node"])
    worker = next(n for n in nodes if not n["is_head_node"])
    assert head["resources_total"].get("generator_node") == 1 and "scorer_node" not in head["resources_total"]
    assert worker["resources_total"].get("scorer_node") == 1 and "generator_node" not in worker["resources_total"]


def test_submitted_job_writes_complete_outputs(cluster, cluster_job):
    jobs = {j["submission_id"]: j for j in cluster.list_state("jobs")}
    assert jobs[SUBMISSION_ID]["status"] == "SUCCEEDED", cluster_job.logs[-3000:] + cluster_job.submit.stderr[-2000:]
    assert cluster_job.submit.returncode == 0, cluster_job.submit.stderr[-3000:]
    check_outputs(cluster_job.out, SimpleNamespace(stdout=cluster_job.logs), "hf")


def test_generator_pool_ran_on_the_head_and_scorer_pool_on_the_worker(cluster, cluster_job):
    nodes = {n["node_id"]: n for n in cluster.list_state("nodes")}
    actors = cluster.list_state("actors", "--detail")
    generators = [a for a in actors if "GeneratorActor" in a["class_name"]]
    scorers = [a for a in actors if "ScorerActor" in a["class_name"]]
    assert generators and scorers, [a["class_name"] for a in actors]
    generator_nodes = {a["node_id"] for a in generators}
    scorer_nodes = {a["node_id"] for a in scorers}
    assert len(generator_nodes) == len(scorer_nodes) == 1 and generator_nodes != scorer_nodes
    generator_node, scorer_node = nodes[generator_nodes.pop()], nodes[scorer_nodes.pop()]
    assert generator_node["is_head_node"] and "generator_node" in generator_node["resources_total"]
    assert not scorer_node["is_head_node"] and "scorer_node" in scorer_node["resources_total"]
    assert all(a["required_resources"].get("generator_node") == 1 for a in generators)
    assert all(a["required_resources"].get("scorer_node") == 1 for a in scorers)


@pytest.mark.parametrize(
    ("client_auth", "refusal"),
    [
        # A token of the right form that is not the cluster's: the job server answers 403.
        (
            {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)},
            "Forbidden: Invalid authentication token",
        ),
        # No token anywhere (HOME without ~/.ray/auth_token): the request goes out bare and gets 401.
        ({}, "Unauthorized: Missing authentication token"),
    ],
    ids=["wrong_token", "no_token"],
)
def test_submission_without_the_clusters_token_is_refused(cluster, tmp_path, client_auth, refusal):
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH_")}
    env |= {"HOME": str(tmp_path)} | client_auth
    proc = cluster.ray(
        "job", "submit", "--address", cluster.dashboard_url, "--", "echo", REFUSED_MARKER, env=env, timeout=60
    )
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "AuthenticationError" in proc.stderr and refusal in proc.stderr, proc.stderr[-3000:]
    assert not [j for j in cluster.list_state("jobs") if REFUSED_MARKER in j["entrypoint"]]


def test_a_lost_worker_stops_the_job_naming_it_and_a_resume_gives_the_same_answers(cluster, cluster_job, tmp_path):
    """Issue 27, item 9. The worker node, the only one with `scorer_node`, stops (SIGTERM to its `ray start --block`)
    while the job holds shard 1 and shard 0 is committed: the scorer pool has nowhere to run, so the job says what
    it waits for, naming the lost node, and after --resource_wait_s stops in one line that names it and the resume
    command. A worker added back, the resume writes the best-answer file of the uninterrupted submitted job, byte
    for byte. Runs after the tests that read the cluster's first nodes and actors, before the one that stops it."""
    worker = next(n for n in cluster.list_state("nodes") if n["state"] == "ALIVE" and not n["is_head_node"])
    out = tmp_path / "results"
    # The held job's own flags change no value: transformers runs one batch at a time (so every generator batch is
    # in flight), and a scorer batch of at most one shard's candidates (tests/held_job.py).
    args = [*JOB_ARGS, "--output_dir", str(out), "--resource_wait_s", "5"]
    held = [*args, "--generate_in_flight", "2", "--score_batch_size", "4"]
    job = HeldJob(tmp_path, held, hold_from=1, env=cluster.client_env())
    try:
        job.wait_until_held({0})
        cluster.stop_node("worker")
        job.driver.wait(timeout=300)
    finally:
        job.kill()
    stdout, stderr = job.output()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert job.driver.returncode == 2 and len(lines) == 1, stderr[-3000:]
    (error,) = lines
    lost = f"node {worker['node_id'][:8]} at "
    assert error.startswith("error: waited "), error
    assert "(--resource_wait_s 5): 1 scorer needs {CPU: 1, scorer_node: 1}, which no alive node has" in error, error
    assert lost in error and "(scorer_node 1)" in error and "resume with: " in error, error
    waiting = [line for line in stdout.splitlines() if line.startswith("  waiting for resources: ")]
    assert waiting and all(lost in line for line in waiting), stdout[-3000:]
    assert job.committed() == {0} and (out / "run" / "shards" / "shard-00000.parquet").is_file()
    assert not (out / "run" / "shards" / "shard-00001.parquet").exists()

    cluster.add_worker("scorer_node")
    resume = shlex.split(error.split("resume with: ", 1)[1].rstrip(")"))
    assert resume[:3] == ["python", "-m", "jobs.infer"] and resume[3:] == held, resume
    proc = run_job("jobs.infer", *resume[3:], env=cluster.client_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.findall(r"shard (\d+) committed", proc.stdout) == ["1"], proc.stdout[-3000:]
    assert (out / BEST_FILE).read_bytes() == (cluster_job.out / BEST_FILE).read_bytes()


def test_stopping_the_cluster_leaves_no_ray_process_behind(cluster):
    """Runs last: it stops the module's cluster (the fixture's own stop is then a no-op)."""
    assert cluster.stop() == []
    assert not [
        p for p in psutil.process_iter(["cmdline"]) if str(cluster.temp_dir) in " ".join(p.info["cmdline"] or [])
    ]
