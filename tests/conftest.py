"""Shared fixtures and helpers: the fast tier, the reads guard, jobs run as a user runs them, one Ray for the
session's jobs, the tiny model, a local S3."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The reads guard: a test that reads data from outside the repository fails (tests/guard/reads_guard.py).
sys.path.insert(0, str(ROOT / "tests" / "guard"))
from reads_guard_plugin import (  # noqa: E402, F401 - pytest finds the hooks in this module
    pytest_collection_finish,
    pytest_runtest_makereport,
    pytest_sessionfinish,
    pytest_unconfigure,
)
from reads_guard_plugin import pytest_configure as reads_guard_configure  # noqa: E402

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


# Under pytest-xdist (`make test` runs `-n auto --dist loadgroup`) every test that is not fast runs in this one
# group, on one worker and in collection order: jobs share the session's Ray, module fixtures and the machine's
# cores as they do without xdist, while the other workers run the fast tier beside them (a job leaves part of two
# cores idle while it waits on process starts and I/O). Two jobs at once would each start a local Ray and load
# models on the same two cores: their walls double and a test of `auto` finds the other job's Ray.
JOBS_GROUP = "jobs"


# First: pytest-xdist reads the group marks in its own pytest_collection_modifyitems.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in FAST_MODULES and item.originalname not in SLOW_IN_FAST_MODULES:
            item.add_marker(pytest.mark.fast)
        if item.get_closest_marker("fast") is None:
            item.add_marker(pytest.mark.xdist_group(JOBS_GROUP))


class JobsGroupCheck:
    """Refuses an xdist worker's session whose jobs lost their group: pytest-xdist applies `xdist_group` by
    rewriting each node id (`<id>@jobs`), and a pytest it cannot do that in would run the jobs two at a time."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        if not hasattr(config, "workerinput") or not config.getvalue("loadgroup"):
            return
        lost = [item.nodeid for item in items if item.get_closest_marker("fast") is None and "@" not in item.nodeid]
        if lost:
            raise pytest.UsageError(
                f"--dist loadgroup did not group {len(lost)} job tests (e.g. {lost[0]}): this pytest-xdist cannot "
                "rewrite this pytest's node ids; install the pytest pyproject.toml's dev extra pins"
            )


def pytest_configure(config):
    reads_guard_configure(config)
    config.pluginmanager.register(JobsGroupCheck(), "jobs-group-check")


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


def run_job(
    module: str, *args: str, timeout: int = 900, env: dict | None = None, cluster=None
) -> subprocess.CompletedProcess:
    """Run `python -m module args` from the project root, as a user would.

    With `cluster` (the `ray_cluster` fixture) the job joins that running Ray, as `--ray_address` and the
    cluster's token make a job join one; without, a job that gets past its plan starts a local Ray of its own.
    """
    joined = cluster.client_env() if cluster is not None else {}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **joined, **(env or {})},
    )


def run_in_process(module: str, *argv: str) -> str:
    """What `python -m module ARGV` (jobs.infer, or jobs.main with --method all) does to its run folder, in this
    process without Ray: the in-process seam (`run.execute(..., in_process=True)`). Returns what it printed."""
    import contextlib
    import dataclasses
    import io

    from actors import pipeline_actors
    from ray_pipeline import run
    from ray_pipeline.config import RunConfig, build_parser, config_from_args

    config = config_from_args(build_parser(module).parse_args(list(argv)))
    compare_all = module == "jobs.main" and config.method == "all"
    if compare_all:
        config = dataclasses.replace(config, method=RunConfig().method)
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        with run.plan(config, f"python -m {module}", list(argv)) as plan:
            run.select(plan, run.execute(plan, *pipeline_actors(), in_process=True))
            if compare_all:
                run.compare(plan)
    return stdout.getvalue()


@pytest.fixture(scope="session")
def ray_cluster():
    """One running Ray for the session's jobs that do not test Ray's own start or stop (`run_job(..., cluster=)`).

    A `ray start` head on this machine (ray_pipeline.cluster.local.LocalCluster): token authentication on, its own
    temp dir, its agents on ports picked here, so it stays clear of any other Ray on the machine. A job that
    joins it pays neither a Ray start nor a shutdown, and later jobs find Ray Data's own actors already up.
    Tests of a local Ray's start, stop, stop signals and leftover processes start a Ray of their own.
    """
    from ray_pipeline.cluster.local import LocalCluster

    # Unix socket paths under the temp dir must stay short (108 bytes), so not under pytest's tmp_path.
    root = Path(tempfile.mkdtemp(prefix="bestofn-suite-", dir="/tmp"))
    cluster = LocalCluster(root, num_cpus=4)
    try:
        cluster.start_head()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def joined_ray(ray_cluster):
    """This test process joined to the session's Ray for one module: in-process Ray Data tests start no Ray of
    their own. The cluster's address and token are in this process's environment for the module (a job a test
    starts meanwhile would join the cluster too)."""
    import ray
    from ray._private.authentication_test_utils import reset_auth_token_state

    joined = ray_cluster.client_env()
    saved = {name: os.environ.get(name) for name in joined}
    os.environ.update(joined)
    # Ray reads its authentication mode when it is first imported: re-read it, as Ray's own tests do.
    reset_auth_token_state()
    try:
        ray.init(address=ray_cluster.gcs_address, log_to_driver=False)
        yield ray_cluster
    finally:
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        reset_auth_token_state()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """The tiny random-weights model with SmolLM2's architecture and tokenizer (tests/tiny_model.py), made once a
    session: for tests whose assertions do not depend on the model's answers."""
    from tiny_model import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-smollm2"))


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
