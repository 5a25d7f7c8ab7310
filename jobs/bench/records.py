"""Benchmark records: one JSON file per result, stamped with where, when and from which commit it came."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def device_name() -> str:
    """ "<count> x <GPU name>" (CUDA), else "CPU: <model name> x <cores>"."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {model} x {os.cpu_count()}"


def git_commit() -> str | None:
    """`git rev-parse --short HEAD`, with "-dirty" when tracked files differ from it.

    $BESTOFN_COMMIT, when set, wins: the device tool's copy of the tree carries a git folder that
    names the session's starting commit, not the one copied. Outside a checkout without it: None.
    """
    if os.environ.get("BESTOFN_COMMIT"):
        return os.environ["BESTOFN_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def stamp() -> dict:
    """Device, UTC date, commit and command line of this process."""
    return {
        "device": device_name(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": " ".join(["python", "-m", _module(), *sys.argv[1:]]),
    }


def _module() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec and spec.name else sys.argv[0]


def write_record(path: str | Path, fields: dict) -> dict:
    """Write `fields` plus the stamp as JSON to `path` (folders made as needed); returns what was written."""
    record = stamp() | fields
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record
