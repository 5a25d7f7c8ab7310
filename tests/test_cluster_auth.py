"""A Ray cluster that refuses the job's authentication token is reported as that, with what to do.

Before, ray.init retried the refused token for 20 s and the job said it could not reach the cluster.
A real head node (`ray start`, token authentication on, test_cluster_mode.LocalCluster) refuses a
wrong token and a missing one; the job must say so in one line, before it tries to join.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_cluster_mode import LocalCluster

from conftest import ROOT
from ray_pipeline.cluster import token_fix
from ray_pipeline.model import cache_root


@pytest.fixture(scope="module")
def head():
    # Unix socket paths under the temp dir must stay short (108 bytes), so not under pytest's tmp_path.
    root = Path(tempfile.mkdtemp(prefix="bestofn-auth-"))
    cluster = LocalCluster(root)
    try:
        cluster.start_head("generator_node")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def client_env(home: Path, **auth: str) -> dict[str, str]:
    """This environment without any of Ray's token settings (and a HOME without ~/.ray), plus `auth`.

    The model cache stays where it is, or the new HOME would convert the embedded GGUF again.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    return env | {"HOME": str(home), "RAY_PIPELINE_CACHE": str(cache_root())} | auth


REFUSED = "refused this job's authentication token"
MISSING = "without an authentication token"


@pytest.mark.parametrize(
    ("auth", "what", "presented"),
    [
        ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, REFUSED, "presented the token from $RAY_AUTH_TOKEN"),
        ({"RAY_AUTH_MODE": "token"}, MISSING, "this job found no token;"),
        ({}, REFUSED, "this job found no token and RAY_AUTH_MODE is unset"),
    ],
    ids=["wrong token", "no token", "no token and no mode"],
)
def test_a_refused_token_is_named_with_the_fix(head, tmp_path, auth, what, presented):
    args = ["--dataset", "embedded:2", "--backend", "hf", "--ray_address", head.gcs_address]
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.infer", *args, "--output_dir", str(tmp_path / "out")],
        cwd=ROOT, env=client_env(tmp_path, **auth), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    line = lines[0]
    assert line.startswith("error: ") and head.gcs_address in line and what in line, line
    assert "cannot reach" not in line and presented in line and "set RAY_AUTH_MODE=token" in line, line


@pytest.mark.fast
def test_the_fix_names_where_the_token_was_looked_for(tmp_path, monkeypatch):
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert token_fix().startswith("this job found no token and RAY_AUTH_MODE is unset; set RAY_AUTH_MODE=token")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert token_fix().startswith("this job presented the token from ~/.ray/auth_token;")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/secrets/token")
    assert token_fix().startswith("this job presented the token from the file $RAY_AUTH_TOKEN_PATH names (/secrets")
