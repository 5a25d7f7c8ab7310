"""The job's Ray connection, in one package: join a cluster (its address checked, its token refused in one line) or
start a local Ray that goes with this process (here); the stop signals around the job and ray.init (`signals`); the
watcher that stops a local Ray whose job was killed, and `ray start` nodes for tests and benchmarks (`local`)."""

from __future__ import annotations

import os
import re
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ray_pipeline.cluster.signals import stop_signals_held_over_ray_init
from ray_pipeline.errors import PipelineError, first_line

if TYPE_CHECKING:
    # Only for the annotations: the watcher (`python -m ray_pipeline.cluster.local`) imports this package, and
    # stays as light as it was without the configuration's modules.
    from ray_pipeline.config import RunConfig

# Whether this process started the Ray it runs on (init_ray without an address), rather than joining a cluster.
_started_local_ray = False


def init_ray(config: RunConfig) -> None:
    """Join the cluster at --ray_address / $RAY_ADDRESS, else start a local Ray that goes with this process."""
    import ray
    from ray.exceptions import AuthenticationError

    if ray.is_initialized():
        return
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if address and address.strip().lower() == "auto":
        address = _resolve_auto("--ray_address" if config.ray_address else "$RAY_ADDRESS")
    if address:
        _check_reachable(address)
        _check_token(address)
        try:
            # A stop signal while ray.init runs is acted on once it has returned (signals.py says why).
            with stop_signals_held_over_ray_init(), native_lines_hidden(config.verbose):
                ray.init(address=address, log_to_driver=config.verbose)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise PipelineError(f"cannot reach the Ray cluster at {address}: {first_line(exc)}") from None
        except AuthenticationError as exc:
            raise token_missing(address, exc) from None
        return
    # Actors reserve logical CPUs; a small machine still runs both pools (their torch threads
    # are capped at cpus_per_actor), so declare at least what the pools ask for.
    wanted = (config.pool_bounds("generators")[1] + config.pool_bounds("scorers")[1]) * config.cpus_per_actor + 1
    # The actors' own output (model loading, warnings) reaches the driver only with --verbose.
    # address="local" starts a Ray of our own even while a `ray start` cluster runs on this machine:
    # without it ray.init joins that cluster and refuses num_cpus.
    # Imported here: the watcher runs as `python -m ray_pipeline.cluster.local`, which must not find that module
    # already imported by this package.
    from ray_pipeline.cluster.local import reap_local_ray_with_this_process

    # Before ray.init: a job killed while Ray starts leaves nothing behind either.
    reap_local_ray_with_this_process()
    global _started_local_ray
    try:
        with stop_signals_held_over_ray_init():
            with native_lines_hidden(config.verbose):
                ray.init(
                    address="local",
                    num_cpus=max(os.cpu_count() or 1, int(wanted + 0.999)),
                    include_dashboard=False,
                    log_to_driver=config.verbose,
                )
            # Set before a held stop signal is acted on: the Ray this process started is then shut down.
            _started_local_ray = True
    except (ConnectionError, RuntimeError, ValueError, OSError) as exc:
        fix = "pass --ray_address to use a running cluster"
        raise PipelineError(f"cannot start a local Ray ({first_line(exc)}); {fix}") from None


# The one line the C++ core writes when RAY_BACKEND_LOG_LEVEL is set (cli.quiet_ray sets it): it
# announces the level at INFO before that level applies, so the setting that hides the core's lines
# always shows this one.
_LEVEL_ANNOUNCEMENT = re.compile(r"logging\.cc:\d+: Set ray log level from environment variable RAY_BACKEND_LOG_LEVEL")


@contextmanager
def native_lines_hidden(verbose: bool):
    """Around ray.init: what the process writes to its stderr (fd 2) comes through, less the level announcement.

    The C++ core writes to the file descriptor, past sys.stderr, so the descriptor is pointed at a
    temporary file for the call and that file is copied back after it, less the announcement.
    """
    if verbose:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [
                line
                for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True)
                if not _LEVEL_ANNOUNCEMENT.search(line)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def _resolve_auto(given: str) -> str:
    """`auto` as ray.init reads it: the last `ray start` on this machine, else any Ray GCS running here.

    Resolved before ray.init so that the checks of an address (reachable, token) apply to what it finds: ray.init
    retried a refused token for 20 s, and with nothing found it named an `--address` flag this job does not have.
    """
    from ray._private.services import find_bootstrap_address, find_gcs_addresses

    found = find_bootstrap_address(None) or next(iter(find_gcs_addresses()), None)
    if found is None:
        drop = "drop --ray_address" if given == "--ray_address" else "unset RAY_ADDRESS"
        raise PipelineError(
            f"{given} is 'auto', but no Ray runs on this machine: start one (ray start --head), pass its address, "
            f"or {drop} to start a local Ray for this job"
        )
    return found


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse an address nothing listens on at once: ray.init would retry it for minutes."""
    host_port = address.split("://", 1)[-1].rstrip("/")
    if host_port in ("auto", "local") or ":" not in host_port:
        return
    host, _, port = host_port.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise PipelineError(
            f"cannot reach the Ray cluster at {address}: {reason}; check --ray_address / $RAY_ADDRESS"
        ) from None


def _check_token(address: str, timeout_s: float = 5.0) -> None:
    """Refuse at once a cluster that refuses this process's authentication token.

    ray.init retries a refused token for 20 s and then reports that it could not connect. One call
    to the GCS (the address ray.init joins), with the token Ray would present, says which it is.
    Ray has no public call for this; where its internals differ, ray.init decides as before.
    """
    if "://" in address or address in ("auto", "local"):
        return
    try:
        import grpc
        from ray._private.gcs_utils import create_gcs_channel
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
        from ray.exceptions import AuthenticationError
    except ImportError:
        return
    try:
        with create_gcs_channel(address) as channel:
            stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise PipelineError(
                f"the Ray cluster at {address} refused this job's authentication token ({exc.details()}); "
                f"{token_fix()}"
            ) from None
    except AuthenticationError as exc:
        raise token_missing(address, exc) from None
    except Exception:  # noqa: BLE001 - the probe only speeds up a refusal; ray.init still decides
        return


def token_missing(address: str, exc: BaseException) -> PipelineError:
    """Ray's own refusal to connect without a token (RAY_AUTH_MODE=token and none found), in one line."""
    reason = first_line(getattr(exc, "message", None) or exc).rstrip(".")
    return PipelineError(
        f"cannot join the Ray cluster at {address} without an authentication token ({reason}); {token_fix()}"
    )


def token_fix() -> str:
    """What to do about a refused token, naming where this process looked for one."""
    mode = os.environ.get("RAY_AUTH_MODE", "")
    if os.environ.get("RAY_AUTH_TOKEN"):
        source = "$RAY_AUTH_TOKEN"
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        source = f"the file $RAY_AUTH_TOKEN_PATH names ({os.environ['RAY_AUTH_TOKEN_PATH']})"
    elif (Path.home() / ".ray" / "auth_token").is_file():
        source = "~/.ray/auth_token"
    else:
        source = ""
    now = f"this job presented the token from {source}" if source else "this job found no token"
    if mode != "token":
        now += f" and RAY_AUTH_MODE is {mode or 'unset'}"
    return (
        f"{now}; set RAY_AUTH_MODE=token and give the cluster's token in $RAY_AUTH_TOKEN, in a file named by "
        "$RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token"
    )


def cluster_has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def ray_joined() -> bool:
    """Whether this process is connected to a Ray (without importing ray where it is not)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def started_local_ray() -> bool:
    """Whether this process started the Ray it runs on (`init_ray` without an address), rather than joining one."""
    return _started_local_ray
