"""A test that reads data from outside the repository fails, whichever process it started made the read.

Python raises the audit event "open" for every file it opens (builtins.open, pathlib, io.open_code for imports,
os.open). `install` adds an audit hook (sys.addaudithook) that checks every read against the allowed places and
appends any other to a log file. The test process installs it from tests/conftest.py; every process the tests start
(the jobs run_job starts, Ray's workers and actors, vLLM's engine processes) inherits PYTHONPATH with this folder,
whose sitecustomize.py installs the same hook with the same policy, handed down as JSON in $READS_GUARD. After each
test the plugin reads the log: a test during which any process read from outside fails, naming the process and file.

Allowed: the repository; the interpreter, its standard library and installed packages (an editable install's package
folders too); system folders; the model, compile and runtime caches (the user cache folder, $RAY_PIPELINE_CACHE,
Hugging Face's, vLLM's, Triton's, torch inductor's, matplotlib's and Ray's); and, under the temp folder, files made
since the session started (pytest's tmp folders, temp files the libraries write). Everything else is outside, e.g. a
data set in a folder beside the repository. A file that does not exist is no data: opening it is not counted
(libraries probe for optional files).

Native code that opens files without Python (pyarrow's Parquet reader, the Rust tokenizers, safetensors) raises
no event; tests/test_reads_guard.py also checks that no test names a path that leaves the repository.
"""

from __future__ import annotations

import json
import os
import site
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ENV = "READS_GUARD"
ROOT = Path(__file__).resolve().parents[2]
SITE_DIR = Path(__file__).resolve().parent
# System folders: shared libraries, the dynamic loader's configuration, /proc and /sys, device files, zoneinfo.
SYSTEM = ("/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin", "/etc", "/proc", "/sys", "/dev", "/run")


@dataclass
class Policy:
    """Where reads are allowed, where the log is and when the session started (see the module's docstring)."""

    log: str
    roots: list[str] = field(default_factory=list)
    temp: str = ""
    started: float = 0.0

    def outside(self, path: str) -> bool:
        real = os.path.realpath(path)
        if any(_within(real, root) for root in self.roots):
            return False
        if self.temp and _within(real, self.temp):
            try:
                return os.stat(real).st_ctime < self.started
            except OSError:
                return False
        return True


def session_policy(log: str, basetemp: str | None = None) -> Policy:
    """This machine's allowed places, for a session that starts now and logs to `log`."""
    home = Path.home()
    env = os.environ
    cache = env.get("XDG_CACHE_HOME") or str(home / ".cache")
    caches = [
        cache,
        env.get("RAY_PIPELINE_CACHE"),
        env.get("HF_HOME"),
        env.get("HF_HUB_CACHE"),
        env.get("VLLM_CACHE_ROOT"),
        env.get("VLLM_CONFIG_ROOT") or str(home / ".config" / "vllm"),
        env.get("TRITON_CACHE_DIR") or str(home / ".triton"),
        env.get("MPLCONFIGDIR") or str(home / ".config" / "matplotlib"),
        env.get("TORCHINDUCTOR_CACHE_DIR"),
        # torch inductor's default cache and Ray's session folders live in the temp folder from earlier sessions.
        os.path.join(tempfile.gettempdir(), f"torchinductor_{_user()}"),
        os.path.join(env.get("RAY_TMPDIR") or tempfile.gettempdir(), "ray"),
    ]
    interpreter = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *site.getsitepackages()]
    interpreter += editable_packages()
    roots = [str(ROOT), log, *SYSTEM, *interpreter, *(c for c in caches if c)]
    if basetemp:
        roots.append(basetemp)
    real = sorted({os.path.realpath(r) for r in roots} | {os.path.abspath(r) for r in roots})
    return Policy(log=log, roots=real, temp=os.path.realpath(tempfile.gettempdir()), started=time.time())


def editable_packages() -> list[str]:
    """The package folders of editable installs (setuptools' finders map each top-level package to its folder): on
    a clone's own virtualenv the clone's packages, where a virtualenv is shared the checkout it was installed from."""
    return [
        str(folder)
        for name, module in list(sys.modules.items())
        if name.startswith("__editable__") and name.endswith("_finder")
        for folder in getattr(module, "MAPPING", {}).values()
    ]


def _user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


_policy: Policy | None = None
_state = threading.local()
# Paths already found allowed (a file outside is logged at every open, so every test that reads it fails).
_allowed: set[str] = set()


def install(policy: Policy) -> None:
    """Check this process's reads against `policy` from now on, and hand it to every process started from here on."""
    global _policy
    first = _policy is None
    _policy = policy
    os.environ[ENV] = json.dumps(asdict(policy))
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(SITE_DIR) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), *paths])
    _allowed.clear()
    if first:
        # An audit hook cannot be removed: one per process, checking whatever policy is current.
        sys.addaudithook(_hook)


def install_from_env() -> None:
    """In a process a test started: the policy its parent handed down, if any."""
    text = os.environ.get(ENV)
    if text:
        install(Policy(**json.loads(text)))


def _is_read(mode, flags) -> bool:
    if isinstance(mode, str):
        return "r" in mode or "+" in mode
    if not isinstance(flags, int) or flags & getattr(os, "O_DIRECTORY", 0):
        return False
    return flags & os.O_ACCMODE != os.O_WRONLY


def _hook(event: str, args: tuple) -> None:
    if event != "open" or _policy is None or getattr(_state, "busy", False):
        return
    _state.busy = True
    try:
        path, mode, flags = args
        if isinstance(path, int) or path is None or not _is_read(mode, flags):
            return
        path = os.path.abspath(os.fsdecode(path))
        if path in _allowed:
            return
        # A file that does not exist holds no data: libraries probe for optional files (Ray for a cluster config in
        # the home folder) and go on without them.
        if not os.path.isfile(path):
            return
        if _policy.outside(path):
            _record(path)
        else:
            _allowed.add(path)
    except BaseException:  # noqa: BLE001 - a hook that raises would fail the open it watches
        pass
    finally:
        _state.busy = False


def _record(path: str) -> None:
    line = json.dumps({"pid": os.getpid(), "process": " ".join(sys.argv)[:200], "path": path}) + "\n"
    fd = os.open(_policy.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def reads_since(offset: int) -> tuple[list[dict], int]:
    """The reads from outside logged after byte `offset` of the log, and the log's end."""
    try:
        with open(_policy.log, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = offset + data.rfind(b"\n") + 1
    return [json.loads(line) for line in data[: end - offset].splitlines() if line.strip()], end


def describe(reads: list[dict]) -> str:
    shown = "\n".join(f"  {r['path']}  (pid {r['pid']}: {r['process']})" for r in reads[:20])
    more = f"\n  ... and {len(reads) - 20} more" if len(reads) > 20 else ""
    return f"read data from outside the repository ({ROOT}):\n{shown}{more}"


def current_log() -> str | None:
    return _policy.log if _policy is not None else None
