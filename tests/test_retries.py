"""Bounded retries without `ray_remote_args`: real Ray Data actor pools whose actors die.

Ray 2.60 deprecates map_batches' `**ray_remote_args`, the only way to set max_restarts and
max_task_retries; without them Ray Data restarts a dead actor and retries its batch without end.
The pipeline counts each batch's attempts in a StageMonitor actor instead (pipeline.monitored).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import pyarrow as pa
import pytest
from ray.util.annotations import RayDeprecationWarning

from ray_pipeline.config import RunConfig
from ray_pipeline.pipeline import BatchRetriesExhausted, actor_resources, monitored, start_monitor


class Echo:
    """A map_batches class that dies (its whole process) on every batch holding problem `dies_on`,
    and once only on `dies_once` (a marker file remembers across the restart)."""

    def __init__(self, config: RunConfig):
        self.config = config

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("problem_id").to_pylist()
        marker = Path(os.environ["ECHO_MARKER"])
        if "dies_on" in ids:
            os._exit(1)
        if "dies_once" in ids and not marker.exists():
            marker.touch()
            os._exit(1)
        return batch


class AsyncEcho(Echo):
    async def __call__(self, batch: pa.Table):
        yield Echo.__call__(self, batch)


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    import ray

    marker = tmp_path_factory.mktemp("marker") / "died"
    os.environ["ECHO_MARKER"] = str(marker)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # A GPU Ray declares but does not have: the GPU pools' resources are then scheduled as on a GPU cluster.
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield marker
    ray.shutdown()


def run(cls: type, ids: list[str], retries: int) -> list[str]:
    import ray.data

    config = RunConfig(max_task_retries=retries, cpus_per_actor=0.5)
    ds = ray.data.from_arrow([pa.table({"problem_id": [i]}) for i in ids])
    with warnings.catch_warnings():
        # What the pipeline passes must not be among what Ray deprecates (ray_remote_args among them).
        warnings.simplefilter("error", RayDeprecationWarning)
        ds = ds.map_batches(
            monitored(cls, "generator"),
            fn_constructor_kwargs={"config": config, "monitor": start_monitor()},
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=1),
            **actor_resources(0.5, 0, None),
        )
    return sorted(r["problem_id"] for r in ds.take_all())


def test_a_batch_whose_actor_dies_once_is_retried(ray_session):
    ray_session.unlink(missing_ok=True)
    assert run(AsyncEcho, ["a", "dies_once", "b"], retries=1) == ["a", "b", "dies_once"]
    assert ray_session.exists()


# Both kinds of call (the scorer's plain one, the generator's async generator), each with another bound.
@pytest.mark.parametrize(("cls", "retries"), [(Echo, 0), (AsyncEcho, 1)])
def test_a_batch_that_keeps_killing_its_actor_stops_after_its_retries(ray_session, cls, retries):
    with pytest.raises(Exception) as err:
        run(cls, ["a", "dies_on"], retries=retries)
    text = str(err.value)
    assert BatchRetriesExhausted.__name__ in text and f"was started {retries + 2} times" in text, text[-2000:]
    assert f"--max_task_retries {retries} is used up" in text


@pytest.mark.fast
def test_the_monitored_class_keeps_its_name_and_kind():
    for cls in (Echo, AsyncEcho):
        wrapped = monitored(cls, "scorer")
        assert wrapped.__name__ == cls.__name__ and issubclass(wrapped, cls)
    import inspect

    assert inspect.isasyncgenfunction(monitored(AsyncEcho, "g").__call__)
    assert not inspect.isasyncgenfunction(monitored(Echo, "g").__call__)


@pytest.mark.fast
@pytest.mark.parametrize(
    ("cpus", "gpus", "resource", "expected"),
    [
        (1.0, 0.6, None, {"num_gpus": 0.6}),
        (2.0, 0.6, None, {"num_gpus": 0.6, "num_cpus": 2.0}),
        (0.0, 1.0, None, {"num_gpus": 1.0, "num_cpus": 0.0}),
        (1.0, 0.0, "gen", {"num_gpus": 0.0, "num_cpus": 1.0, "resources": {"gen": 1.0}}),
    ],
)
def test_a_gpu_actor_leaves_out_the_one_cpu_ray_data_reserves_anyway(cpus, gpus, resource, expected):
    """Naming 1 CPU beside GPUs only adds Ray Data's "experimental" warning: it reserves 1 CPU anyway."""
    assert actor_resources(cpus, gpus, resource) == expected


class RecordedWarnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_gpu_actors_draw_no_experimental_warning(ray_session):
    """The pools as a GPU cluster gets them (0.6 and 0.4 of a GPU, 1 CPU each), on a Ray that declares a GPU
    it does not have: Ray Data warns "Specifying both num_cpus and num_gpus ... is experimental" for none."""
    import ray.data

    from ray_pipeline.pipeline import GENERATOR_GPU_SHARE, SCORER_GPU_SHARE

    # Ray Data's loggers do not propagate to the root logger: listen on its own.
    recorded = RecordedWarnings()
    ray_data_logger = logging.getLogger("ray.data")
    ray_data_logger.addHandler(recorded)
    try:
        ds = ray.data.from_arrow([pa.table({"problem_id": ["a"]})])
        with warnings.catch_warnings():
            warnings.simplefilter("error", RayDeprecationWarning)
            for share in (GENERATOR_GPU_SHARE, SCORER_GPU_SHARE):
                ds = ds.map_batches(
                    monitored(Echo, "scorer"),
                    fn_constructor_kwargs={"config": RunConfig(), "monitor": start_monitor()},
                    batch_size=1,
                    batch_format="pyarrow",
                    compute=ray.data.ActorPoolStrategy(size=1),
                    **actor_resources(1.0, share, None),
                )
        assert [r["problem_id"] for r in ds.take_all()] == ["a"]
    finally:
        ray_data_logger.removeHandler(recorded)
    assert not [m for m in recorded.messages if "num_cpus and num_gpus" in m], recorded.messages
