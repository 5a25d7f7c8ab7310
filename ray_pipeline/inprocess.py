"""The pipeline's stages in this process, without Ray: `run.execute(..., in_process=True)`.

The generator and scorer classes are the actors' own (callable classes that also run on a batch without
Ray). Here one of each is made and called on every batch in turn: the generator on the problem blocks Ray
Data would hand it (`pipeline.problem_blocks`), the scorer on `score_batch_size // N` problems at a time, and
each scored batch goes to the same `ShardWriter` the Ray stages use. A candidate's stored values depend on
neither its batch nor its process, so the shards are the ones a Ray job writes with the same configuration.

It is the seam where what is not Ray's or an engine's behaviour (plans, resumes, shard commits, error rows,
selection) is checked in seconds; it has no pools, no retries and no other process, so a job runs on Ray.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable

import pyarrow as pa

from ray_pipeline.config import RunConfig
from ray_pipeline.errors import PipelineError
from ray_pipeline.pipeline import problem_blocks
from ray_pipeline.shards import ShardWriter, expected_rows
from ray_pipeline.storage import StoragePath


def has_gpu() -> bool:
    """Whether the actors made in this process get a GPU (they use one when torch sees it)."""
    import torch

    return torch.cuda.is_available()


def run_in_process(
    config: RunConfig,
    problems: pa.Table,
    shards_dir: StoragePath,
    generator_cls: type,
    scorer_cls: type,
    on_commit: Callable[[int, StoragePath, int], None] | None = None,
    fingerprint: str = "",
    on_batch: Callable[[pa.Table], None] | None = None,
    on_generating: Callable[[float], None] | None = None,
) -> ShardWriter:
    """`pipeline.run_stages` in this process: the same arguments, the same shards committed."""
    writer = ShardWriter(shards_dir, expected_rows(problems, config.num_return_sequences), on_commit, fingerprint)
    generator, scorer = generator_cls(config), scorer_cls(config)
    per_call = max(1, config.score_batch_size // config.num_return_sequences)
    # One event loop for every call: an engine's async state is bound to the loop it was first used on.
    loop = asyncio.new_event_loop()
    try:
        for block in problem_blocks(problems, config.generate_batch_size):
            generated = pa.concat_tables(_outputs(generator, block, loop))
            if on_generating is not None:
                on_generating(time.monotonic())
                on_generating = None
            for start in range(0, generated.num_rows, per_call):
                scored = pa.concat_tables(_outputs(scorer, generated.slice(start, per_call), loop))
                fresh = writer.add(scored)
                if on_batch and fresh.num_rows:
                    on_batch(fresh)
    finally:
        loop.close()
    if writer.missing():
        raise PipelineError(f"shards {writer.missing()} did not receive all their rows")
    return writer


def _outputs(actor: Callable, batch: pa.Table, loop: asyncio.AbstractEventLoop) -> list[pa.Table]:
    """What one call of a Ray Data callable class gives: a table, or the tables an async generator yields."""
    result = actor(batch)
    if inspect.isasyncgen(result):

        async def collect() -> list[pa.Table]:
            return [table async for table in result]

        return loop.run_until_complete(collect())
    if inspect.iscoroutine(result):
        return [loop.run_until_complete(result)]
    return [result]
