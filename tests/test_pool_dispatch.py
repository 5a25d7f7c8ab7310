"""Actor pools on real Ray Data: generators run several small batches at once and share the work, even
one that starts late or runs slowly; autoscaling grows the scorer pool.

Every wait is on an event the test makes (a file one actor writes and another waits for), never on a duration,
so the outcome is the same on a fast machine and on a loaded one. The pools run on the session's Ray.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time

import pyarrow as pa
import pytest

from ray_pipeline.config import RunConfig
from ray_pipeline.pipeline import pool_strategy


def run_batches(udf: type, batches: int, config: RunConfig, pool: str) -> list[dict]:
    """One-row batches through `udf` in the pool `pool_strategy` builds: per batch the pid and its start/end."""
    import ray.data

    # The session's Ray cannot import this test module: its classes and functions travel by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

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


def wait_for(condition, what: str, timeout_s: float = 600) -> None:
    """Poll `condition` (inside an actor) until it holds; past `timeout_s` give up, so the test fails, not hangs."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(0.05)


async def wait_for_async(condition, what: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        await asyncio.sleep(0.05)


def per_actor(rows: list[dict]) -> list[int]:
    counts: dict[int, int] = {}
    for r in rows:
        counts[r["pid"]] = counts.get(r["pid"], 0) + 1
    return sorted(counts.values())


@pytest.mark.parametrize("in_flight", [2, 3])
def test_a_generator_that_starts_late_still_gets_its_share(joined_ray, tmp_path, in_flight):
    """Like vLLM engines, one actor comes up long after the other. The first takes `in_flight` small batches
    and runs them at once; it cannot take the late one's share, which would leave it idle.

    The late actor's start lasts until the first has started `in_flight` batches, and those last until the late
    one has started its own: only a first actor that could take more than `in_flight` would take any more.
    """
    first = tmp_path / "first"

    class StaggeredGenerator:
        def __init__(self):
            try:
                first.open("x").close()
                self.late = False
            except FileExistsError:
                self.late = True
                wait_for(lambda: len(list(tmp_path.glob("first-*"))) >= in_flight, "the first actor's batches")

        async def __call__(self, batch: pa.Table) -> None:
            i = batch.column("i")[0].as_py()
            if self.late:
                (tmp_path / f"late-{i}").touch()
                return
            (tmp_path / f"first-{i}").touch()
            await wait_for_async(lambda: len(list(tmp_path.glob("late-*"))) >= in_flight, "the late actor's batches")

    config = RunConfig(num_generators=2, generate_in_flight=in_flight)
    rows = run_batches(StaggeredGenerator, 2 * in_flight, config, "generators")
    assert len(rows) == 2 * in_flight
    assert per_actor(rows) == [in_flight, in_flight], "one actor ran the other's share while it idled"
    assert most_at_once(rows) == in_flight, "an actor ran its batches one after the other"


def test_a_fast_generator_takes_more_batches_than_a_slow_one(joined_ray, tmp_path):
    """Engines share the work: batches left in the queue go to whichever engine finishes one first.

    The slow engine's first batch lasts until the fast one has finished 8 of the 12 (and the fast one starts
    only once the slow one holds a batch): the slow one cannot end up with more than the 4 left over, so the
    fast one runs at least twice as many.
    """
    first = tmp_path / "first"
    holding = tmp_path / "slow-holds-a-batch"

    class UnevenGenerator:
        def __init__(self):
            try:
                first.open("x").close()
                self.slow = True
            except FileExistsError:
                self.slow = False

        async def __call__(self, batch: pa.Table) -> None:
            if self.slow:
                if not holding.exists():
                    holding.touch()
                    await wait_for_async(lambda: len(list(tmp_path.glob("fast-*"))) >= 8, "8 fast batches")
                return
            await wait_for_async(holding.exists, "the slow actor's first batch")
            (tmp_path / f"fast-{batch.column('i')[0].as_py()}").touch()

    rows = run_batches(UnevenGenerator, 12, RunConfig(num_generators=2, generate_in_flight=1), "generators")
    assert len(rows) == 12
    slow, fast = per_actor(rows)
    assert fast >= 2 * slow, f"the fast engine ran {fast} batches, the slow one {slow}"


def test_an_autoscaling_scorer_pool_grows_while_batches_queue(joined_ray, tmp_path):
    """While the one starting scorer holds its batches, the queue grows and Ray Data adds a second actor. The
    first actor's batches last until the second has run one, so a pool that never grows fails (after the wait)
    instead of finishing alone."""
    first = tmp_path / "first"
    second_ran = tmp_path / "second-ran"

    class SlowScorer:
        def __init__(self):
            try:
                first.open("x").close()
                self.first = True
            except FileExistsError:
                self.first = False

        def __call__(self, batch: pa.Table) -> None:
            if self.first:
                wait_for(second_ran.exists, "a batch on a second scorer actor")
            else:
                second_ran.touch()

    rows = run_batches(SlowScorer, 12, RunConfig(num_scorers=1, max_scorers=2).validate(), "scorers")
    assert len(rows) == 12
    assert len(per_actor(rows)) == 2, "the pool never grew past its one starting actor"


class BatchRecorder:
    """A generator stand-in: one output row per call, naming the problems of the batch it was handed."""

    def __init__(self, config: RunConfig):
        self.config = config

    async def __call__(self, batch: pa.Table):
        yield pa.table({"batch": [",".join(batch.column("problem_id").to_pylist())]})


def batch_cases(count: int, seed: int) -> list[tuple[int, int, int, int]]:
    """(problems, shard_size, generate_batch_size, generate_in_flight), sizes that do and do not divide each other."""
    rng = random.Random(seed)
    return [(rng.randint(3, 13), rng.randint(1, 5), rng.randint(1, 6), rng.randint(1, 3)) for _ in range(count)]


@pytest.mark.parametrize("problems,shard_size,batch_size,in_flight", batch_cases(6, seed=1))
def test_each_generator_batch_is_one_block_of_one_shard(joined_ray, problems, shard_size, batch_size, in_flight):
    """What Ray Data hands the generators is exactly `problem_blocks`: each shard cut from its own first problem, no
    batch across two shards (a batch is seeded from its problems, so a shard redone alone must get the same ones)."""
    import ray

    from ray_pipeline.pipeline import generate_stage, problem_blocks

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ids = [f"p{i}" for i in range(problems)]
    table = pa.table({"problem_id": ids, "shard_id": [i // shard_size for i in range(problems)]})
    config = RunConfig(shard_size=shard_size, generate_batch_size=batch_size, generate_in_flight=in_flight)
    handed = sorted(row["batch"] for row in generate_stage(config, table, BatchRecorder).take_all())
    blocks = problem_blocks(table, batch_size)
    assert handed == sorted(",".join(block.column("problem_id").to_pylist()) for block in blocks)


@pytest.mark.parametrize("problems,shard_size,batch_size", [(7, 4, 2), (9, 3, 3), (5, 2, 1), (6, 6, 3)])
def test_gpu_generators_get_one_block_of_one_shard_per_batch(joined_ray, monkeypatch, problems, shard_size, batch_size):
    """Ray Data refuses GPU actors without a batch size (it raised on every GPU run): there the generators get the
    blocks' own size, and, with a batch size that divides the shard size (transformers on a GPU is held to one),
    each batch is still one block of one shard. Run on this CPU with the GPU path's batch size."""
    import ray

    from ray_pipeline import pipeline

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ids = [f"p{i}" for i in range(problems)]
    table = pa.table({"problem_id": ids, "shard_id": [i // shard_size for i in range(problems)]})
    gpu = RunConfig(shard_size=shard_size, generate_batch_size=batch_size, gpus_per_generator=0.5)
    # The GPU pool's plan is accepted by Ray Data (it is not run: no GPU here).
    pipeline.generate_stage(gpu, table, BatchRecorder)
    assert pipeline.generator_batch_size(gpu, 0.5) == batch_size
    monkeypatch.setattr(pipeline, "generator_batch_size", lambda config, gpus: config.generate_batch_size)
    config = RunConfig(shard_size=shard_size, generate_batch_size=batch_size)
    handed = sorted(row["batch"] for row in pipeline.generate_stage(config, table, BatchRecorder).take_all())
    blocks = pipeline.problem_blocks(table, batch_size)
    assert handed == sorted(",".join(block.column("problem_id").to_pylist()) for block in blocks)
