"""The reads guard's pytest side: a test during which any process read data from outside the repository fails.

tests/conftest.py takes these hooks; a session of its own loads them with `-p reads_guard_plugin` (this folder on
sys.path). See reads_guard.py for what is watched and what is allowed.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import reads_guard

_offset = 0
_unattributed: list[dict] = []


def pytest_configure(config) -> None:
    global _offset
    fd, log = tempfile.mkstemp(prefix="reads-guard-", suffix=".jsonl")
    os.close(fd)
    basetemp = config.getoption("basetemp", None)
    reads_guard.install(reads_guard.session_policy(log, str(Path(basetemp).resolve()) if basetemp else None))
    _offset = 0


def _new_reads() -> list[dict]:
    global _offset
    reads, _offset = reads_guard.reads_since(_offset)
    return reads


def pytest_collection_finish(session) -> None:
    # Reads while collecting (a test module that reads at import) belong to no test: the session fails.
    _unattributed.extend(_new_reads())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    reads = _new_reads()
    if reads:
        found = reads_guard.describe(reads)
        earlier = f"{report.longrepr}\n\n" if report.failed and report.longrepr else ""
        report.outcome = "failed"
        report.longrepr = f"{earlier}{item.nodeid} ({call.when}) {found}"
    return report


def pytest_sessionfinish(session, exitstatus) -> None:
    reads = _unattributed + _new_reads()
    if reads:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        sys.stderr.write(f"reads_guard: outside any test, {reads_guard.describe(reads)}\n")


def pytest_unconfigure(config) -> None:
    log = reads_guard.current_log()
    if log and os.path.exists(log):
        os.unlink(log)
