"""The reads guard (tests/guard/reads_guard.py): a test that reads data from outside the repository fails, whichever
process made the read, and no test names a path that leaves the repository."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import reads_guard

from conftest import ROOT

# Runs of a session of its own, each test in it a case: what the test does, and whether the guard must fail it.
INNER_TESTS = '''
import json, os, subprocess, sys
from pathlib import Path

OUTSIDE = os.environ["OUTSIDE_FILE"]
REPO = Path(os.environ["REPO_ROOT"])


def test_reads_inside_pass(tmp_path):
    (REPO / "README.md").read_text()
    (tmp_path / "mine.jsonl").write_text("{}")
    (tmp_path / "mine.jsonl").read_text()
    Path(json.__file__).read_text()  # the standard library
    import pyarrow
    Path(pyarrow.__file__).read_text()  # an installed package
    try:
        open(Path(OUTSIDE).with_name("absent.jsonl"))  # a file that does not exist holds no data
    except FileNotFoundError:
        pass


def test_read_in_the_test_process_fails():
    Path(OUTSIDE).read_text()


def test_read_in_a_process_the_test_starts_fails():
    subprocess.run([sys.executable, "-c", f"open({OUTSIDE!r}).read()"], check=True)


def test_read_in_a_ray_worker_fails():
    import ray

    # A Ray of its own, even beside a `ray start` cluster on this machine (a bare ray.init would join that one).
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        ray.get(ray.remote(lambda path: len(open(path).read())).remote(OUTSIDE))
    finally:
        ray.shutdown()
'''


def run_session(folder: Path, outside: Path, files: dict[str, str]) -> tuple[subprocess.CompletedProcess, dict]:
    """pytest with only the guard's plugin on `files` in `folder`; its exit and each test's failure text (or None)."""
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text))
    report = folder / "report.xml"
    env = os.environ | {"OUTSIDE_FILE": str(outside), "REPO_ROOT": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "reads_guard_plugin", "-p", "no:cacheprovider", "-q",
         f"--junitxml={report}", f"--basetemp={folder / 'basetemp'}", f"--rootdir={folder}", str(folder)],
        cwd=folder, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    results = {}
    if report.is_file():
        for case in ET.parse(report).iter("testcase"):
            failure = case.find("failure")
            results[case.get("name")] = None if failure is None else (failure.get("message", "") + failure.text)
    return proc, results


def outside_file(tmp_path: Path) -> Path:
    """A data file that existed before the inner session started: outside the repository and that session's tmp."""
    outside = tmp_path / "beside" / "problems.jsonl"
    outside.parent.mkdir()
    outside.write_text('{"problem": "What is $1 + 1$?", "answer": "2"}\n')
    an_hour_ago = time.time() - 3600
    os.utime(outside, (an_hour_ago, an_hour_ago))
    time.sleep(0.05)  # the session's start comes strictly after the file's ctime
    return outside


def test_a_read_from_outside_fails_the_test_in_every_process(tmp_path):
    outside = outside_file(tmp_path)
    proc, results = run_session(tmp_path / "session", outside, {"test_cases.py": INNER_TESTS})
    assert set(results) == {
        "test_reads_inside_pass",
        "test_read_in_the_test_process_fails",
        "test_read_in_a_process_the_test_starts_fails",
        "test_read_in_a_ray_worker_fails",
    }, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert results["test_reads_inside_pass"] is None, results["test_reads_inside_pass"]
    for name, failure in results.items():
        if name != "test_reads_inside_pass":
            assert failure and "read data from outside the repository" in failure and str(outside) in failure, name
    assert proc.returncode == 1
    # Each read names the process that made it: the test's own, a Python the test started, a Ray worker.
    process = {name: failure.split(str(outside), 1)[1] for name, failure in results.items() if failure}
    assert "pytest" in process["test_read_in_the_test_process_fails"]
    assert ": -c)" in process["test_read_in_a_process_the_test_starts_fails"]
    assert "ray" in process["test_read_in_a_ray_worker_fails"].lower()


def test_a_read_outside_any_test_fails_the_session(tmp_path):
    """A module that reads while it is collected: every test passes, the session does not."""
    outside = outside_file(tmp_path)
    module = "import os\nDATA = open(os.environ['OUTSIDE_FILE']).read()\n\ndef test_nothing():\n    assert DATA\n"
    proc, results = run_session(tmp_path / "session", outside, {"test_collected.py": module})
    assert results == {"test_nothing": None}
    assert proc.returncode == 1 and "outside any test, read data from outside the repository" in proc.stderr
    assert str(outside) in proc.stderr


def test_policy_follows_links_and_allows_only_fresh_temp_files(tmp_path):
    repo, temp = tmp_path / "repo", tmp_path / "temp"
    (repo / "data").mkdir(parents=True)
    temp.mkdir()
    old = temp / "old.jsonl"
    old.write_text("x")
    policy = reads_guard.Policy(log="", roots=[str(repo)], temp=str(temp), started=time.time() + 1)
    fresh = reads_guard.Policy(log="", roots=[str(repo)], temp=str(temp), started=time.time() - 60)
    (repo / "data" / "link.jsonl").symlink_to(old)
    assert not policy.outside(str(repo / "README.md"))
    assert policy.outside(str(repo.parent / "beside-the-repo" / "problems.jsonl"))
    assert policy.outside(str(repo / "data" / "link.jsonl"))  # a link inside that points outside
    assert policy.outside(str(old)) and not fresh.outside(str(old))


# Paths that leave their folder, named on purpose: run ids the jobs must refuse, what the docs check must find.
NAMED_ON_PURPOSE = {("test_interrupt_e2e.py", "../escape"), ("test_run_folder.py", "../x"), ("test_docs.py", "../")}


def paths_leaving_the_repository(source: str, name: str) -> list[str]:
    """What a test file at tests/<name> names that leaves the repository: `parents[2]` and up, `ROOT.parent`, a
    string with a `..` folder."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith(".parents"):
            # tests/x.py: parents[1] is the repository, parents[2] the folder it sits in.
            if isinstance(node.slice, ast.Constant) and node.slice.value >= 2:
                found.append(ast.unparse(node))
        elif isinstance(node, ast.Attribute) and node.attr == "parent" and ast.unparse(node.value) == "ROOT":
            found.append(ast.unparse(node))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            parts = node.value.replace("\\", "/").split("/")
            if ".." in parts[:-1] and (name, node.value) not in NAMED_ON_PURPOSE:
                found.append(node.value)
    return found


def test_no_test_names_a_path_outside_the_repository():
    """Native readers (pyarrow's Parquet reader, the Rust tokenizers) open files unseen by the audit hook, and a
    test that looks for a file beside the repository and skips reads nothing: their paths are caught here."""
    offender = (
        "from pathlib import Path\n"
        "DATA = Path(__file__).resolve().parents[2] / 'data' / 'x.jsonl'\n"
        "OTHER = ROOT.parent / 'data'\n"
        "run(['--dataset', '../data/x.jsonl', '--run_id', 'a/b'])\n"
    )
    assert sorted(paths_leaving_the_repository(offender, "test_x.py")) == [
        "../data/x.jsonl", "Path(__file__).resolve().parents[2]", "ROOT.parent"
    ]
    found = {
        path.name: paths_leaving_the_repository(path.read_text(), path.name)
        for path in sorted((ROOT / "tests").glob("*.py"))
        if path.name != Path(__file__).name
    }
    assert {name: paths for name, paths in found.items() if paths} == {}
