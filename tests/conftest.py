"""Shared fixtures: the MATH-500 file from ../shared and a small problem set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MATH500 = ROOT.parent / "shared" / "data" / "math500.jsonl"


def require_math500() -> Path:
    if not MATH500.is_file():
        pytest.skip(f"{MATH500} not found")
    return MATH500


@pytest.fixture
def math500() -> Path:
    return require_math500()


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
