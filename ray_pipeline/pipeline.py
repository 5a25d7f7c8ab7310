"""The Ray Data pipeline: problems -> generator actor pool -> scorer actor pool -> committed shards."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from ray_pipeline.backends import get_backend, resolve_backend
from ray_pipeline.cluster import cluster_has_gpu, ray_joined, started_local_ray
from ray_pipeline.config import RunConfig, check_traces, default_generate_batch_size, resolve_scoring
from ray_pipeline.errors import ConfigError, PipelineError
from ray_pipeline.placement import actor_demand, check_placement
from ray_pipeline.resource_watch import ResourceWatch
from ray_pipeline.shards import ShardWriter, expected_rows
from ray_pipeline.stage_monitor import StageMonitor
from ray_pipeline.storage import StoragePath
from ray_pipeline.timeline import mark

# Ray Data packs a UDF's outputs into blocks of up to DataContext.target_max_block_size (128 MiB by
# default) before handing them on, which would hold back a streaming generator's candidates until its
# whole batch is done. Small blocks let the scorer pool start while generation goes on.
STREAMING_BLOCK_BYTES = 1 << 20
# Default GPU shares of a generator and a scorer actor (see actor_gpus).
GENERATOR_GPU_SHARE, SCORER_GPU_SHARE = 0.6, 0.4
def resolve_execution(config: RunConfig, num_problems: int, has_gpu: bool | None = None) -> RunConfig:
    """The config with 'auto' settings made concrete for this cluster: backend, batch size, batches in
    flight, and the scorer's passes and logit tiles (`DEVICE_RESOLVED_FIELDS` among them).

    `has_gpu` says whether the actors get GPUs; None asks the Ray cluster, and then a pool that no node of the
    cluster can hold one actor of, and no autoscaler can add a node for, is refused here, before any actor starts
    (`placement.check_placement`).
    """
    gpu = cluster_has_gpu() if has_gpu is None else has_gpu
    backend = get_backend(resolve_backend(config.backend, gpu))
    check_traces(config, backend)
    if config.reproducible and backend.reproducible_needs_gpu and not actor_gpus(config, gpu)[0]:
        raise PipelineError(backend.reproducible_needs_gpu)
    # Small batches: engines that run at different speeds share the work, and a retry redoes a few
    # problems. Every shard is cut into batches from its own first problem (problem_blocks), so
    # transformers, which seeds a batch from its problem ids, samples a resumed shard as before.
    batch = config.generate_batch_size or default_generate_batch_size(config.shard_size)
    in_flight = config.generate_in_flight
    if in_flight is None:
        # An engine that schedules many requests together (vLLM) does best when it sees many at once: a generator
        # holds up to its share of all problems (sized for the largest pool), so every problem is in flight once
        # all engines run, and an engine that comes up first cannot take another's share. Others (transformers)
        # run one batch at a time.
        share = math.ceil(num_problems / config.pool_bounds("generators")[1])
        in_flight = math.ceil(share / batch) if backend.schedules_many else 1
    config = dataclasses.replace(
        config, backend=backend.name, generate_batch_size=batch, generate_in_flight=in_flight
    )
    config = resolve_scoring(config, on_gpu=actor_gpus(config, gpu)[1] > 0)
    check_gpu_batches(config, actor_gpus(config, gpu)[0] > 0)
    if has_gpu is None and ray_joined():
        check_placement(pool_demands(config, gpu), local=started_local_ray())
    return config


def generator_batch_size(config: RunConfig, gpus: float) -> int | None:
    """map_batches' batch size for the generator pool: None (each block one batch) unless its actors ask for GPUs,
    which Ray Data refuses without one; then the blocks' own size (`generate_stage`)."""
    return config.generate_batch_size if gpus > 0 else None


def check_gpu_batches(config: RunConfig, generator_on_gpu: bool) -> None:
    """A backend that seeds a batch from its problems (transformers) gets fixed-size batches from Ray Data on a GPU
    (`generate_stage`): a batch size that does not divide the shard size would put two shards' problems in one
    batch, and a redone shard would sample other candidates. Refused before anything starts."""
    batch, shard = config.generate_batch_size, config.shard_size
    backend = get_backend(config.backend)
    if generator_on_gpu and backend.seeds_batches and batch and shard % batch:
        raise ConfigError(
            f"generate_batch_size must divide shard_size with {backend.label} on a GPU (a batch must not hold two "
            f"shards' problems), got generate_batch_size {batch} with shard_size {shard}; pass --generate_batch_size "
            f"{default_generate_batch_size(shard)} or leave it out"
        )


def pool_demands(config: RunConfig, has_gpu: bool | None = None) -> dict[str, dict[str, float]]:
    """What one actor of each pool reserves on a node ('generator', 'scorer'): CPU, GPU and custom resources, as
    map_batches asks for them (`actor_resources`). `has_gpu` as in `resolve_execution`."""
    gen, score = actor_gpus(config, has_gpu)
    return {
        "generator": actor_demand(actor_resources(config.cpus_per_actor, gen, config.generator_resource)),
        "scorer": actor_demand(actor_resources(config.cpus_per_actor, score, config.scorer_resource)),
    }


def actor_gpus(config: RunConfig, has_gpu: bool | None = None) -> tuple[float, float]:
    """GPUs per generator and per scorer: on a GPU cluster one generator and one scorer share each GPU.

    Ray packs fractional GPU requests onto as few GPUs as it can, so two 0.5-GPU generators land
    on one GPU while another holds only scorers (seen on 4 x H200), and two vLLM engines starting
    on one GPU race in memory profiling: one was left a 1 GiB KV cache. A generator takes 0.6, so
    no two share a GPU, and a scorer 0.4, the rest of one (Ray Data starts an operator's inputs
    first, so the generators are placed before the scorers fill the gaps). A tensor-parallel
    generator holds `tensor_parallel_size` whole GPUs, one per shard of the model. `has_gpu` as in
    `resolve_execution`.
    """
    gpu = cluster_has_gpu() if has_gpu is None else has_gpu
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


def actor_resources(cpus: float, gpus: float, resource: str | None) -> dict:
    """map_batches' resource arguments for one actor of a pool.

    Ray Data reserves 1 CPU for a map worker that names none, and warns that naming CPUs beside
    GPUs is experimental: a GPU actor that wants the 1 CPU Ray Data reserves anyway leaves it out.
    """
    wanted: dict = {"num_gpus": gpus}
    if not (gpus and cpus == 1):
        wanted["num_cpus"] = cpus
    if resource:
        wanted["resources"] = {resource: 1.0}
    return wanted


def problem_blocks(problems: pa.Table, batch_size: int) -> list[pa.Table]:
    """Input blocks of `batch_size` problems cut within each shard: a generator batch is one block.

    A batch is seeded from its problems (transformers), so a shard redone alone must be cut into the
    batches it had in the full run: every shard is cut from its own first problem, and no batch holds
    problems of two shards whatever the batch and shard sizes.
    """
    ids = problems.column("shard_id")
    blocks = []
    for s in sorted(set(ids.to_pylist())):
        shard = problems.filter(pc.equal(ids, s))
        blocks += [shard.slice(start, batch_size) for start in range(0, shard.num_rows, batch_size)]
    return blocks


def generate_stage(config: RunConfig, problems: pa.Table, generator_cls: type, monitor=None):
    """The generator pool's dataset: batches of problems in, one row per problem with its N candidates out.

    `monitor` (a StageMonitor actor, made here when not given) counts each batch's attempts and
    notes when the first candidate was generated.
    """
    import ray.data

    monitor = monitor or start_monitor()
    ray.data.DataContext.get_current().target_max_block_size = STREAMING_BLOCK_BYTES
    ds = ray.data.from_arrow(problem_blocks(problems, config.generate_batch_size))
    gpus = actor_gpus(config)[0]
    return ds.map_batches(
        monitored(generator_cls, "generator"),
        fn_constructor_kwargs={"config": config, "monitor": monitor},
        # One block, one batch: with a batch size Ray Data bundles blocks up to that many rows and cuts the
        # bundle into batches again, so a shard's short last block shared a batch with the next shard's first
        # (seeded from both: that shard, redone alone, sampled other candidates). Ray Data refuses GPU actors
        # without a batch size: there the batch size is the blocks' own, which every block but a shard's short
        # last one has (vLLM seeds each problem, not its batch; transformers on a GPU is held to a batch size
        # that divides the shard size, `check_gpu_batches`).
        batch_size=generator_batch_size(config, gpus),
        batch_format="pyarrow",
        compute=pool_strategy(config, "generators"),
        **actor_resources(config.cpus_per_actor, gpus, config.generator_resource),
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
    on_generating: Callable[[float], None] | None = None,
) -> ShardWriter:
    """Stream `problems` through both actor pools and commit every complete shard under `shards_dir`.

    `config` is the resolved one (see `resolve_execution`); `on_batch` sees each scored batch (progress);
    `on_generating` learns, with the first scored batch, when (time.monotonic()) the first candidate was generated.
    """
    monitor = start_monitor()
    ds = generate_stage(config, problems, generator_cls, monitor)
    ds = ds.map_batches(
        monitored(scorer_cls, "scorer"),
        fn_constructor_kwargs={"config": config, "monitor": monitor},
        # Rows here are problems (N candidates each, see GENERATED_SCHEMA): about score_batch_size candidates.
        batch_size=max(1, config.score_batch_size // config.num_return_sequences),
        batch_format="pyarrow",
        compute=pool_strategy(config, "scorers"),
        # A problem row in, its N candidate rows out.
        udf_modifying_row_count=True,
        **actor_resources(config.cpus_per_actor, actor_gpus(config)[1], config.scorer_resource),
    )
    writer = ShardWriter(shards_dir, expected_rows(problems, config.num_return_sequences), on_commit, fingerprint)
    if not config.verbose:
        hide_hang_warning()
    # What the job waits for while a pool has no actor running (a lost node, busy nodes), and for how long.
    names = {"generator": generator_cls.__name__, "scorer": scorer_cls.__name__}
    watch = ResourceWatch(pool_demands(config), names, config.resource_wait_s)
    try:
        with watch.run() as waiting:
            # No prefetching: with Ray Data's default of one batch, the driver got a scored block only once the next
            # one existed, so a shard whose last rows were scored waited uncommitted while the generators worked on
            # (and was lost to a stop or a kill meanwhile). The driver's own work per block is a few milliseconds.
            batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0))
            while True:
                with waiting():
                    batch = next(batches, None)
                if batch is None:
                    break
                if on_generating is not None:
                    on_generating(first_generated(monitor))
                    on_generating = None
                fresh = writer.add(batch)
                if on_batch and fresh.num_rows:
                    on_batch(fresh)
    except PipelineError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever stopped Ray Data, committed shards stay and the rest is redone
        raise PipelineError(
            f"the pipeline stopped ({stop_reason(exc)[:300]}{watch.lost_text()}); shards {writer.missing()} are not "
            "done"
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


def start_monitor():
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # No CPU: it must fit beside the pools on any node, the head included. On the driver's node, where it can: a
    # worker node lost mid-run must not take the run's attempt counts with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0, scheduling_strategy=here)(StageMonitor).remote()


# Ray Data's warning when the cluster lacks what its first operator needs: the job says what it waits for itself.
_HANG_WARNING = "may hang forever"


def _not_the_hang_warning(record) -> bool:
    return _HANG_WARNING not in record.getMessage()


def hide_hang_warning() -> None:
    """Leave Ray Data's "The job may hang forever unless the cluster scales up" out (the waiting line says it)."""
    import logging

    logger = logging.getLogger("ray.data._internal.execution.resource_manager")
    if _not_the_hang_warning not in logger.filters:
        logger.addFilter(_not_the_hang_warning)


def first_generated(monitor) -> float:
    """When the first candidate was generated, on this process's monotonic clock (now if nobody said)."""
    import ray

    at = ray.get(monitor.first_generated.remote())
    now = time.monotonic()
    return now if at is None else min(now, now - (time.time() - at))


class BatchRetriesExhausted(RuntimeError):
    """A batch whose actor kept dying: its retries are used up."""


def batch_key(stage: str, batch: pa.Table) -> str:
    """The same key for every attempt of one batch: its stage and its problems."""
    ids = "\n".join(map(str, batch.column("problem_id").to_pylist()))
    return f"{stage}:{hashlib.sha1(ids.encode('utf-8', 'surrogatepass')).hexdigest()}"


def monitored(cls: type, stage: str) -> type:
    """`cls` (a Ray Data callable class taking `config`) whose calls report to a StageMonitor first.

    A call counts its batch's attempt and refuses one past `config.max_task_retries` retries, with
    an error that stops the run (committed shards stay); a generator's call also reports when it
    yields its first rows. The subclass keeps `cls`'s name, which names the actors in Ray.
    """
    generator = stage == "generator"

    def __init__(self, config: RunConfig, monitor):
        self._monitor, self._retries, self._reported = monitor, config.max_task_retries, not generator
        cls.__init__(self, config)

    async def _check_async(self, batch):
        self._refuse_if_exhausted(batch, await self._monitor.attempt.remote(batch_key(stage, batch)))

    def _refuse_if_exhausted(self, batch, attempt: int) -> None:
        if attempt > self._retries + 1:
            first = batch.column("problem_id")[0].as_py() if batch.num_rows else "none"
            raise BatchRetriesExhausted(
                f"a {stage} batch of {batch.num_rows} problems (the first {first}) was started {attempt} times: its "
                f"actor died each time (out of memory, or killed) and --max_task_retries {self._retries} is used up"
            )

    def _report(self) -> None:
        if not self._reported:
            self._reported = True
            mark("first candidate")
            self._monitor.generated.remote(time.time())

    namespace = {"__init__": __init__, "_refuse_if_exhausted": _refuse_if_exhausted, "_report": _report}
    if inspect.isasyncgenfunction(cls.__call__):

        async def __call__(self, batch):
            await _check_async(self, batch)
            async for out in cls.__call__(self, batch):
                self._report()
                yield out

    elif inspect.iscoroutinefunction(cls.__call__):

        async def __call__(self, batch):
            await _check_async(self, batch)
            out = await cls.__call__(self, batch)
            self._report()
            return out

    else:

        def __call__(self, batch):
            import ray

            self._refuse_if_exhausted(batch, ray.get(self._monitor.attempt.remote(batch_key(stage, batch))))
            out = cls.__call__(self, batch)
            self._report()
            return out

    namespace |= {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
    return type(cls.__name__, (cls,), namespace)
