"""What a user reads and runs first: the README, the Makefile's `make run` and the jobs' help."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, run_job

pytestmark = pytest.mark.fast

# A relative path that leaves the repository (`../x`), and any absolute path (`/a/b`, not a URL's or a variable's).
OUTSIDE = re.compile(r"(?<![\w.])\.\./")
ABSOLUTE = re.compile(r"(?<![\w:/.~$)}])/(?:[\w.-]+/)*[\w.-]+")
USER_DOCS = ("README.md", "BENCHMARKS.md", "Makefile")


def names_outside(text: str) -> list[str]:
    """Paths in `text` that leave the repository: `../x`, or an absolute path that exists on this machine outside it
    (a data set or tool beside the repository; a cluster's `/home/ray/results` does not exist here)."""
    found = OUTSIDE.findall(text)
    for path in ABSOLUTE.findall(text):
        if os.path.exists(path) and not Path(path).resolve().is_relative_to(ROOT):
            found.append(path)
    return found


def _make_dry_run(*args: str) -> str:
    """The commands `make` would run, with the virtualenv taken as installed."""
    proc = subprocess.run(
        ["make", "-n", "-o", ".venv/.installed", *args], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return proc.stdout


def test_readme_benchmarks_and_makefile_name_no_path_outside_the_repository(tmp_path):
    beside = tmp_path / "data" / "problems.jsonl"
    beside.parent.mkdir()
    beside.write_text("")
    assert names_outside(f"run with --dataset {beside} or ../data/x.jsonl, into /home/ray/results") == [
        "../",
        str(beside),
    ]
    assert names_outside("`s3://bucket/prefix`, `$(VENV)/bin`, `file:///mnt/shared/results`, tests/test_docs.py") == []
    assert {name: names_outside((ROOT / name).read_text()) for name in USER_DOCS} == dict.fromkeys(USER_DOCS, [])


@pytest.mark.parametrize("module", ["jobs.infer", "jobs.main", "jobs.reduce"])
def test_help_names_no_path_outside_the_repository(module):
    proc = run_job(module, "--help", timeout=120)
    assert proc.returncode == 0 and "--answer_extraction" in proc.stdout
    assert names_outside(proc.stdout + proc.stderr) == []


def test_make_run_is_the_offline_demo_and_math500_one_flag_away():
    (demo,) = [line for line in _make_dry_run("run").splitlines() if "jobs.main" in line]
    assert "--dataset embedded:" in demo and "--method all" in demo and "--answer_extraction math-verify" in demo
    (math500,) = [
        line for line in _make_dry_run("run", "DATASET=HuggingFaceH4/MATH-500").splitlines() if "jobs.main" in line
    ]
    # Another data set runs RunConfig's defaults: none of the demo's flags.
    assert "--dataset HuggingFaceH4/MATH-500" in math500 and "--method all" in math500
    assert "--max_tokens" not in math500 and "--answer_extraction" not in math500
    (override,) = [line for line in _make_dry_run("run", "ARGS=--max_tokens 64").splitlines() if "jobs.main" in line]
    assert override.rstrip().endswith("--max_tokens 64")


def test_make_test_fast_selects_the_fast_marker_and_make_test_the_whole_suite():
    assert "pytest -m fast" in _make_dry_run("test-fast")
    (suite,) = [line for line in _make_dry_run("test").splitlines() if "pytest" in line]
    assert "-m fast" not in suite and "-k" not in suite
    # CI's log ends with where the suite's time went.
    assert "--durations=25" in suite
