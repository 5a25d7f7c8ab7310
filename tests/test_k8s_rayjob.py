"""k8s/rayjob.yaml: a KubeRay RayJob that KubeRay accepts and that runs jobs.main as the pipeline needs it."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import ray
import yaml
from test_cluster_config import _UniqueKeyLoader

import jobs.main
from conftest import ROOT
from ray_pipeline.config import build_parser, config_from_args
from ray_pipeline.selection import get_method
from ray_pipeline.storage import uri_fault

pytestmark = pytest.mark.fast

RAYJOB = ROOT / "k8s" / "rayjob.yaml"
DOCKERFILE = ROOT / "k8s" / "Dockerfile"
SCHEMA = Path(__file__).parent / "data" / "kuberay-rayjob-v1.schema.json"


def strict(node):
    """KubeRay's schema as the API server applies it: unknown fields refused, int-or-string fields either."""
    if isinstance(node, dict):
        if node.pop("x-kubernetes-int-or-string", False):
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if node.get("type") == "object" and "properties" in node:
            node.setdefault("additionalProperties", False)
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)
    return node


@pytest.fixture(scope="module")
def rayjob() -> dict:
    with RAYJOB.open() as f:
        return yaml.load(f, Loader=_UniqueKeyLoader)


@pytest.fixture(scope="module")
def cluster(rayjob) -> dict:
    return rayjob["spec"]["rayClusterSpec"]


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def gpus(container: dict) -> int:
    limits = container.get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def test_kuberay_accepts_it(rayjob):
    schema = strict(json.loads(SCHEMA.read_text()))
    jsonschema.validate(rayjob, schema)
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    # The schema check has teeth: a misspelt field and a count given as text are refused.
    for broken in ({"shutdownAfterJobFinish": True}, {"backoffLimit": "2"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(rayjob | {"spec": rayjob["spec"] | broken}, schema)


@pytest.fixture(scope="module")
def config(rayjob):
    """The entrypoint's configuration, parsed by jobs.main's own parser and validated as the job does."""
    words = shlex.split(rayjob["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "jobs.main"]
    parser = build_parser(jobs.main.__doc__.strip().splitlines()[0])
    return config_from_args(parser.parse_args(words[3:]))


def test_the_entrypoint_runs_jobs_main_into_object_storage(config):
    assert config.method == "all" or get_method(config.method)
    # The cluster goes when the job ends: only a store outside it keeps the shards for a retry or a later resume.
    assert uri_fault(config.output_dir) is None and urlsplit(config.output_dir).scheme in ("s3", "gs")
    assert config.run_id, "a retry must find the same run folder"


def test_the_pools_fit_the_gpu_worker_group(rayjob, cluster, config):
    """One generator and one scorer per GPU (0.6 and 0.4 of it): the pools start on the first pods and grow with
    the group, which the autoscaler grows for them."""
    (group,) = cluster["workerGroupSpecs"]
    per_pod = sum(gpus(c) for c in containers(group))
    assert per_pod >= 1 and config.gpus_per_generator is None and config.gpus_per_scorer is None
    assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for pool in ("generators", "scorers"):
        low, high = config.pool_bounds(pool)
        assert low <= group["minReplicas"] * per_pod and high <= group["maxReplicas"] * per_pod
    assert cluster["enableInTreeAutoscaling"] is (config.pool_bounds("generators")[1] > group["minReplicas"])
    for container in containers(group):
        requests = container["resources"]["requests"]
        assert requests.get("nvidia.com/gpu") == container["resources"]["limits"]["nvidia.com/gpu"]


def test_the_head_runs_the_driver_and_no_actor(cluster):
    head = cluster["headGroupSpec"]
    # Ray takes these as strings; 0 CPUs and GPUs keeps every actor (and its model) off the head.
    assert head["rayStartParams"] == {"num-cpus": "0", "num-gpus": "0"}
    (container,) = containers(head)
    assert gpus(container) == 0
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["dashboard"] == 8265 and ports["gcs-server"] == 6379  # the submitter reaches the job server
    # The driver writes every shard: the object store's credentials are in its environment.
    assert [e["secretRef"]["name"] for e in container["envFrom"]] == ["bestofn-object-store"]


def test_the_job_releases_the_cluster_and_retries_by_resuming(rayjob):
    spec = rayjob["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True and 0 <= spec["ttlSecondsAfterFinished"] <= 600
    assert spec["backoffLimit"] >= 1


def test_one_image_of_this_ray_with_token_auth(rayjob, cluster):
    """Ray 2.60's token authentication, set by KubeRay in every pod and the submitter, from one named Secret."""
    assert cluster["rayVersion"] == ray.__version__
    images = {c["image"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]] for c in containers(g)}
    assert len(images) == 1
    base = re.search(r"^FROM (\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    assert base.startswith(f"rayproject/ray:{ray.__version__}-") and base.endswith("-gpu")
    assert cluster["authOptions"] == {"mode": "token", "secretName": "bestofn-ray-token"}
    env = [e.get("name") for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]] for c in containers(g)
           for e in c.get("env", [])]  # fmt: skip
    assert "RAY_AUTH_TOKEN" not in env and "RAY_AUTH_MODE" not in env  # KubeRay sets them, from the Secret


def test_the_readme_walks_through_it(rayjob, cluster):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Kubernetes (KubeRay)") :]
    section = section[: section.index("\n## ")] if "\n## " in section else section
    name = cluster["authOptions"]["secretName"]
    for step in (
        "docker build -f k8s/Dockerfile",
        f"kubectl create secret generic {name} --from-file=auth_token=",
        "kubectl create secret generic bestofn-object-store",
        "kubectl apply -f k8s/rayjob.yaml",
        f"kubectl get rayjob {rayjob['metadata']['name']}",
    ):
        assert step in section, step
