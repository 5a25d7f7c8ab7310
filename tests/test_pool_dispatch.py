"""Actor pools on real Ray Data: generators run several small batches at once and share the work, even
one that starts late or runs slowly; autoscaling grows the scorer pool."""

from __future__ import annotations

import asyncio
import os
import time

import pyarrow as pa
import pytest

from ray_pipeline.config import RunConfig
from ray_pipeline.pipeline import pool_strategy


def run_batches(udf: type, batches: int, config: RunConfig, pool: str) -> list[dict]:
    """One-row batches through `udf` in the pool `pool_strategy` builds: per batch the pid and its start/end."""
    import ray.data

    # Defined here, not at module level: Ray's workers cannot import this test module.
    def stamp(batch: pa.Table, start: float) -> pa.Table:
        n = batch.num_rows
        batch = batch.append_column("pid", pa.array([os.getpid()] * n))
        return batch.append_column("start", pa.array([start] * n)).append_column("end", pa.array([time.time()] * n))

    if pool == "generators":

        class Stamped(udf):
            async def __call__(self, batch: pa.Table):
                start = time.time()
                await super().__call__(batch)
                yield stamp(batch, start)

    else:

        class Stamped(udf):
            def __call__(self, batch: pa.Table) -> pa.Table:
                start = time.time()
                super().__call__(batch)
                return stamp(batch, start)

    ds = ray.data.from_arrow([pa.table({"i": [i]}) for i in range(batches)]).map_batches(
        Stamped, batch_size=1, batch_format="pyarrow", compute=pool_strategy(config, pool), num_cpus=0.5
    )
    return ds.take_all()


def most_at_once(rows: list[dict]) -> int:
    """The largest number of batches that ran at the same moment in one process."""
    best = 0
    for r in rows:
        best = max(best, sum(o["pid"] == r["pid"] and o["start"] <= r["start"] < o["end"] for o in rows))
    return best


def per_actor(rows: list[dict]) -> list[int]:
    counts: dict[int, int] = {}
    for r in rows:
        counts[r["pid"]] = counts.get(r["pid"], 0) + 1
    return sorted(counts.values())


@pytest.fixture
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("in_flight", [2, 3])
def test_a_generator_that_starts_late_still_gets_its_share(local_ray, tmp_path, in_flight):
    """Like vLLM engines, one actor comes up seconds after the other. The first takes `in_flight` small
    batches and runs them at once; it cannot take the late one's share, which would leave it idle."""
    first = tmp_path / "first"

    class StaggeredGenerator:
        def __init__(self):
            try:
                first.open("x").close()
            except FileExistsError:
                time.sleep(4)  # the second engine is still starting

        async def __call__(self, batch: pa.Table) -> None:
            await asyncio.sleep(8)  # generating the batch

    config = RunConfig(num_generators=2, generate_in_flight=in_flight)
    rows = run_batches(StaggeredGenerator, 2 * in_flight, config, "generators")
    assert len(rows) == 2 * in_flight
    assert per_actor(rows) == [in_flight, in_flight], "one actor ran the other's share while it idled"
    assert most_at_once(rows) == in_flight, "an actor ran its batches one after the other"


def test_a_fast_generator_takes_more_batches_than_a_slow_one(local_ray, tmp_path):
    """Engines share the work: batches left in the queue go to whichever engine finishes one first."""
    first = tmp_path / "first"

    class UnevenGenerator:
        def __init__(self):
            try:
                first.open("x").close()
                self.seconds = 3.0
            except FileExistsError:
                self.seconds = 0.3

        async def __call__(self, batch: pa.Table) -> None:
            await asyncio.sleep(self.seconds)

    rows = run_batches(UnevenGenerator, 12, RunConfig(num_generators=2, generate_in_flight=1), "generators")
    assert len(rows) == 12
    slow, fast = per_actor(rows)
    assert fast >= 2 * slow, f"the fast engine ran {fast} batches, the slow one {slow}"


def test_an_autoscaling_scorer_pool_grows_while_batches_queue(local_ray):
    class SlowScorer:
        def __call__(self, batch: pa.Table) -> None:
            time.sleep(2)

    rows = run_batches(SlowScorer, 12, RunConfig(num_scorers=1, max_scorers=2).validate(), "scorers")
    assert len(rows) == 12
    assert len(per_actor(rows)) == 2, "the pool never grew past its one starting actor"
