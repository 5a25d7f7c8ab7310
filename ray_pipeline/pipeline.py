"""The Ray Data pipeline: problems -> generator actor pool -> scorer actor pool -> committed shards."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from ray_pipeline.backends import resolve_backend
from ray_pipeline.config import RunConfig, default_generate_batch_size, resolve_scoring
from ray_pipeline.errors import PipelineError, first_line
from ray_pipeline.shards import ShardWriter, expected_rows
from ray_pipeline.storage import StoragePath

# Ray Data packs a UDF's outputs into blocks of up to DataContext.target_max_block_size (128 MiB by
# default) before handing them on, which would hold back a streaming generator's candidates until its
# whole batch is done. Small blocks let the scorer pool start while generation goes on.
STREAMING_BLOCK_BYTES = 1 << 20
# Default GPU shares of a generator and a scorer actor (see actor_gpus).
GENERATOR_GPU_SHARE, SCORER_GPU_SHARE = 0.6, 0.4


def init_ray(config: RunConfig) -> None:
    """Join the cluster at --ray_address / $RAY_ADDRESS, else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=config.verbose)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise PipelineError(f"cannot reach the Ray cluster at {address}: {first_line(exc)}") from None
        return
    # Actors reserve logical CPUs; a small machine still runs both pools (their torch threads
    # are capped at cpus_per_actor), so declare at least what the pools ask for.
    wanted = (config.pool_bounds("generators")[1] + config.pool_bounds("scorers")[1]) * config.cpus_per_actor + 1
    # The actors' own output (model loading, warnings) reaches the driver only with --verbose.
    # address="local" starts a Ray of our own even while a `ray start` cluster runs on this machine:
    # without it ray.init joins that cluster and refuses num_cpus.
    try:
        ray.init(
            address="local",
            num_cpus=max(os.cpu_count() or 1, int(wanted + 0.999)),
            include_dashboard=False,
            log_to_driver=config.verbose,
        )
    except (ConnectionError, RuntimeError, ValueError, OSError) as exc:
        fix = "pass --ray_address to use a running cluster"
        raise PipelineError(f"cannot start a local Ray ({first_line(exc)}); {fix}") from None


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


def cluster_has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def resolve_execution(config: RunConfig, num_problems: int) -> RunConfig:
    """The config with 'auto' settings made concrete for this cluster: backend, batch size, batches in
    flight, and the scorer's passes and logit tiles (`DEVICE_RESOLVED_FIELDS` among them)."""
    backend = resolve_backend(config.backend, cluster_has_gpu())
    if config.reproducible and backend == "vllm" and not actor_gpus(config)[0]:
        raise PipelineError(
            "--reproducible needs vLLM with a GPU per generator (vLLM on CPUs takes no per-request seeds, so a "
            "redone shard would sample anew); use --backend hf (always reproducible) or drop --reproducible"
        )
    # Small batches: engines that run at different speeds share the work, and a retry redoes a few
    # problems. A size dividing shard_size cuts every shard into whole batches (problem_blocks), so
    # transformers, which seeds a batch from its problem ids, samples a resumed shard as before.
    batch = config.generate_batch_size or default_generate_batch_size(config.shard_size)
    in_flight = config.generate_in_flight
    if in_flight is None:
        # vLLM schedules best when it sees many requests at once: a generator holds up to its share of
        # all problems (sized for the largest pool), so every problem is in flight once all engines run,
        # and an engine that comes up first cannot take another's share. transformers runs one batch at a time.
        share = math.ceil(num_problems / config.pool_bounds("generators")[1])
        in_flight = math.ceil(share / batch) if backend == "vllm" else 1
    config = dataclasses.replace(config, backend=backend, generate_batch_size=batch, generate_in_flight=in_flight)
    return resolve_scoring(config, on_gpu=actor_gpus(config)[1] > 0)


def actor_gpus(config: RunConfig) -> tuple[float, float]:
    """GPUs per generator and per scorer: on a GPU cluster one generator and one scorer share each GPU.

    Ray packs fractional GPU requests onto as few GPUs as it can, so two 0.5-GPU generators land
    on one GPU while another holds only scorers (seen on 4 x H200), and two vLLM engines starting
    on one GPU race in memory profiling: one was left a 1 GiB KV cache. A generator takes 0.6, so
    no two share a GPU, and a scorer 0.4, the rest of one (Ray Data starts an operator's inputs
    first, so the generators are placed before the scorers fill the gaps). A tensor-parallel
    generator holds `tensor_parallel_size` whole GPUs, one per shard of the model.
    """
    gpu = cluster_has_gpu()
    gen = config.gpus_per_generator if config.gpus_per_generator is not None else (GENERATOR_GPU_SHARE if gpu else 0.0)
    if config.tensor_parallel_size > 1 and gpu:
        gen = float(config.tensor_parallel_size)
    score = config.gpus_per_scorer if config.gpus_per_scorer is not None else (SCORER_GPU_SHARE if gpu else 0.0)
    return gen, score


def pool_strategy(config: RunConfig, pool: str):
    """A fixed actor pool, or an autoscaling one when max_{pool} exceeds num_{pool}.

    Ray Data grows an autoscaling pool while batches queue up and the cluster has room (on a
    launcher cluster that room can be new nodes) and shrinks it when actors sit idle.
    """
    import ray.data

    low, high = config.pool_bounds(pool)
    if pool != "generators":
        # Scorer batches are small and run one at a time: they keep Ray Data's defaults.
        return ray.data.ActorPoolStrategy(min_size=low, max_size=high)
    # A generator's async __call__ runs `generate_in_flight` batches at once, no more: Ray Data's default
    # of more tasks than that per actor let the first engine to come up take others' shares while they
    # idled (on 2 and 4 H200s all generation ran on half the generators).
    in_flight = config.generate_in_flight or 1
    return ray.data.ActorPoolStrategy(
        min_size=low, max_size=high, max_tasks_in_flight_per_actor=in_flight, max_concurrent_calls_per_actor=in_flight
    )


def _resources(name: str | None) -> dict[str, float] | None:
    return {name: 1.0} if name else None


def problem_blocks(problems: pa.Table, batch_size: int) -> list[pa.Table]:
    """Input blocks of `batch_size` problems cut within each shard: a generator batch is one block.

    Ray Data bundles blocks up to batch_size rows before a task, so only a shard's short last block
    can share a batch with the next shard's first; with a batch size dividing shard_size (the
    default) only the last, short shard has one, and batches never mix shards.
    """
    ids = problems.column("shard_id")
    blocks = []
    for s in sorted(set(ids.to_pylist())):
        shard = problems.filter(pc.equal(ids, s))
        blocks += [shard.slice(start, batch_size) for start in range(0, shard.num_rows, batch_size)]
    return blocks


def generate_stage(config: RunConfig, problems: pa.Table, generator_cls: type):
    """The generator pool's dataset: batches of problems in, one row per problem with its N candidates out."""
    import ray.data

    ray.data.DataContext.get_current().target_max_block_size = STREAMING_BLOCK_BYTES
    ds = ray.data.from_arrow(problem_blocks(problems, config.generate_batch_size))
    return ds.map_batches(
        generator_cls,
        fn_constructor_kwargs={"config": config},
        batch_size=config.generate_batch_size,
        batch_format="pyarrow",
        compute=pool_strategy(config, "generators"),
        num_cpus=config.cpus_per_actor,
        num_gpus=actor_gpus(config)[0],
        resources=_resources(config.generator_resource),
        **_fault_tolerance(config),
    )


def run_stages(
    config: RunConfig,
    problems: pa.Table,
    shards_dir: StoragePath | Path,
    generator_cls: type,
    scorer_cls: type,
    on_commit: Callable[[int, StoragePath, int], None] | None = None,
    fingerprint: str = "",
    on_batch: Callable[[pa.Table], None] | None = None,
) -> ShardWriter:
    """Stream `problems` through both actor pools and commit every complete shard under `shards_dir`.

    `config` is the resolved one (see `resolve_execution`); `on_batch` sees each scored batch (progress).
    """
    score_gpus = actor_gpus(config)[1]
    ds = generate_stage(config, problems, generator_cls)
    ds = ds.map_batches(
        scorer_cls,
        fn_constructor_kwargs={"config": config},
        # Rows here are problems (N candidates each, see GENERATED_SCHEMA): about score_batch_size candidates.
        batch_size=max(1, config.score_batch_size // config.num_return_sequences),
        batch_format="pyarrow",
        compute=pool_strategy(config, "scorers"),
        num_cpus=config.cpus_per_actor,
        num_gpus=score_gpus,
        resources=_resources(config.scorer_resource),
        # A problem row in, its N candidate rows out.
        udf_modifying_row_count=True,
        **_fault_tolerance(config),
    )
    writer = ShardWriter(shards_dir, expected_rows(problems, config.num_return_sequences), on_commit, fingerprint)
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            fresh = writer.add(batch)
            if on_batch and fresh.num_rows:
                on_batch(fresh)
    except PipelineError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever stopped Ray Data, committed shards stay and the rest is redone
        raise PipelineError(
            f"the pipeline stopped ({stop_reason(exc)[:300]}); shards {writer.missing()} are not done"
        ) from None
    if writer.missing():
        raise PipelineError(f"shards {writer.missing()} did not receive all their rows")
    return writer


# A line of a Python traceback that names what was raised: "module.SomeError: what happened".
_RAISED = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception|Exit))\b: (.+)$")


def stop_reason(exc: BaseException) -> str:
    """What stopped the pipeline, in one line.

    An actor that died in its constructor (a model that does not load, a GPU out of memory) comes
    back as an ActorDiedError whose text carries the actor's traceback: its last raised line is
    the cause, where the first line only says that the actor died.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    raised = [m for m in map(_RAISED.match, lines[1:]) if m]
    if raised:
        return f"{type(exc).__name__}: {raised[-1].group(1)}: {raised[-1].group(2)}"
    return f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"


def _fault_tolerance(config: RunConfig) -> dict:
    """A dead actor (OOM, killed) is restarted and its batch retried, a bounded number of times.

    Ray Data's default retries forever, which would loop on a batch that kills every actor.
    """
    return {"max_restarts": -1, "max_task_retries": config.max_task_retries}
