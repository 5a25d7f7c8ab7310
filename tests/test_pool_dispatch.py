"""Actor pools on real Ray Data: every generator gets a share, even one that starts late; autoscaling grows."""

from __future__ import annotations

import os
import time

import pyarrow as pa
import pytest

from ray_pipeline.config import RunConfig
from ray_pipeline.pipeline import pool_strategy


def pids_per_batch(udf: type, batches: int, config: RunConfig, pool: str) -> list[int]:
    """Run one-row batches through `udf` in the pool `pool_strategy` builds; the pid that ran each."""
    import ray.data

    class Stamped(udf):
        def __call__(self, batch: pa.Table) -> pa.Table:
            super().__call__(batch)
            return batch.append_column("pid", pa.array([os.getpid()] * batch.num_rows))

    ds = ray.data.from_arrow([pa.table({"i": [i]}) for i in range(batches)]).map_batches(
        Stamped, batch_size=1, batch_format="pyarrow", compute=pool_strategy(config, pool), num_cpus=0.5
    )
    return [row["pid"] for row in ds.take_all()]


@pytest.fixture
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_a_generator_that_starts_late_still_gets_its_batch(local_ray, tmp_path):
    """Like vLLM engines, one actor comes up seconds after the other; each batch is one actor's share.

    With Ray Data's default of two tasks in flight per actor, the first actor takes both shares and
    runs them one after the other while the second idles.
    """
    first = tmp_path / "first"

    class StaggeredGenerator:
        def __init__(self):
            try:
                first.open("x").close()
            except FileExistsError:
                time.sleep(4)  # the second engine is still starting

        def __call__(self, batch: pa.Table) -> None:
            time.sleep(8)  # generating the share

    pids = pids_per_batch(StaggeredGenerator, 2, RunConfig(num_generators=2), "generators")
    assert len(pids) == 2
    assert len(set(pids)) == 2, "one actor ran both shares while the other idled"


def test_an_autoscaling_scorer_pool_grows_while_batches_queue(local_ray):
    class SlowScorer:
        def __call__(self, batch: pa.Table) -> None:
            time.sleep(2)

    pids = pids_per_batch(SlowScorer, 12, RunConfig(num_scorers=1, max_scorers=2).validate(), "scorers")
    assert len(pids) == 12
    assert len(set(pids)) == 2, "the pool never grew past its one starting actor"
