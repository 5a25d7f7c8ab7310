"""Reaching the Hugging Face Hub: a fast probe and one quiet attempt, not a minute of retry warnings."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlparse

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
# Loggers that print one warning per retry while the Hub cannot be reached.
CHATTY_LOGGERS = ("huggingface_hub", "datasets", "transformers", "urllib3", "fsspec", "filelock")


def offline() -> bool:
    """The user asked for the local cache only (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def unreachable_reason(timeout_s: float = 3.0) -> str | None:
    """Why the Hub cannot be reached, or None when a TCP connection opens (or a proxy decides).

    The probe runs in a thread because name resolution ignores socket timeouts.
    """
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    host, port = endpoint()
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc.strerror or str(exc) or type(exc).__name__)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s + 1.0)
    if not outcome:
        return f"no answer from {host}:{port} within {timeout_s:.0f} s"
    return None if outcome[0] is None else f"{host}:{port}: {outcome[0]}"


def refuse_if_unreachable(what: str, fix: str) -> None:
    """One line naming `what`, why the Hub cannot be reached and `fix`, before any client retries."""
    from ray_pipeline.errors import PipelineError

    reason = None if offline() else unreachable_reason()
    if reason:
        raise PipelineError(
            f"cannot load {what}: the Hugging Face Hub is unreachable ({reason}); {fix}, "
            "or set HF_HUB_OFFLINE=1 to use a copy in the Hugging Face cache"
        )


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the Hub clients' retry and progress warnings for the duration."""
    saved = {name: logging.getLogger(name).level for name in CHATTY_LOGGERS}
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
