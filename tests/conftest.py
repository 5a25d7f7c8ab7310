"""Shared fixtures and helpers: the fast tier, the reads guard, jobs run as a user runs them, a local S3."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The reads guard: a test that reads data from outside the repository fails (tests/guard/reads_guard.py).
sys.path.insert(0, str(ROOT / "tests" / "guard"))
from reads_guard_plugin import (  # noqa: E402, F401 - pytest finds the hooks in this module
    pytest_collection_finish,
    pytest_configure,
    pytest_runtest_makereport,
    pytest_sessionfinish,
    pytest_unconfigure,
)

# The fast tier (`make test-fast`, `pytest -m fast`): unit tests with no model and no Ray cluster. A module
# joins it here or with `pytestmark = pytest.mark.fast`; a slow test inside a listed module is named in
# SLOW_IN_FAST_MODULES. Everything else only runs in the whole suite (`make test`).
FAST_MODULES = {
    "test_answers",
    "test_certainty_scale",
    "test_cluster_config",
    "test_config",
    "test_data",
    "test_field_roles",
    "test_manifest",
    "test_pool_sizing",
    "test_problem_set",
    "test_reads_guard",
    "test_report",
    "test_run_folder",
    "test_backends",
    "test_scores",
    "test_selection",
    "test_shards_reduce",
    "test_step_tables",
    "test_storage",
}
SLOW_IN_FAST_MODULES = {
    # Real generators and scorers on the embedded weights, one configuration a field.
    "test_every_change_a_resume_allows_leaves_every_stored_value",
    # Starts a Ray of its own, in a pytest session of its own.
    "test_a_read_from_outside_fails_the_test_in_every_process",
}
# An address nothing listens on: a fast test whose job (in-process or a subprocess) tries to reach Ray fails
# instead of starting a cluster.
NO_RAY_ADDRESS = "127.0.0.1:9"


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in FAST_MODULES and item.originalname not in SLOW_IN_FAST_MODULES:
            item.add_marker(pytest.mark.fast)


@pytest.fixture(autouse=True)
def _fast_tests_start_no_ray(request, monkeypatch):
    """A fast test that starts Ray fails at once, so the fast tier stays free of clusters."""
    if request.node.get_closest_marker("fast") is None:
        return
    import ray

    def refuse(*args, **kwargs):
        raise RuntimeError(f"{request.node.nodeid} is in the fast tier but starts Ray: take it out of FAST_MODULES")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setenv("RAY_ADDRESS", NO_RAY_ADDRESS)


def run_job(module: str, *args: str, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m module args` from the project root, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


class S3:
    """A bucket on a local moto server: URIs for pyarrow and the environment a job needs to reach it."""

    ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true"}

    def __init__(self, host: str, port: int, bucket: str):
        self.endpoint, self.bucket = f"{host}:{port}", bucket

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}?endpoint_override={self.endpoint}&scheme=http&region=us-east-1"

    def path(self, key: str):
        from ray_pipeline.storage import StoragePath

        return StoragePath.parse(self.uri(key))


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free local port with one empty bucket, for this module's tests."""
    server_module = pytest.importorskip("moto.server")
    import boto3

    saved = {k: os.environ.get(k) for k in S3.ENV}
    os.environ.update(S3.ENV)
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1")
        client.create_bucket(Bucket="bucket")
        yield S3(host, port, "bucket")
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
