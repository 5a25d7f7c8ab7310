"""A job as a user runs it, whose generator holds every batch of shard HELD_FROM_SHARD and later until the file
HELD_RELEASE exists: a test then stops, kills or signals it at a known point, on any machine, at any speed.

    HELD_FROM_SHARD=1 HELD_RELEASE=/tmp/go python tests/held_job.py jobs.infer --dataset embedded:8 ...

The shards before HELD_FROM_SHARD are generated, scored and committed as usual; the job then waits in its
generator (its actor alive, a batch in flight) until the release file appears, or for ever. Everything else is
the job itself: its flags, its Ray (a local one, whose actors inherit this environment), its signal handling,
its output. The held generator is defined here, in `__main__`, so Ray ships it to the actor by value.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys

HOLD_FROM = int(os.environ["HELD_FROM_SHARD"])
RELEASE = os.environ["HELD_RELEASE"]


def held_actors():
    from actors.generator import GeneratorActor
    from actors.scorer import ScorerActor

    class HeldGenerator(GeneratorActor):
        async def __call__(self, batch):
            if min(batch.column("shard_id").to_pylist()) >= HOLD_FROM:
                while not os.path.exists(RELEASE):
                    await asyncio.sleep(0.05)
            async for table in super().__call__(batch):
                yield table

    # Ray names the actors after the class: the held one is still a GeneratorActor to `pgrep` and the state API.
    HeldGenerator.__name__ = HeldGenerator.__qualname__ = "GeneratorActor"
    return HeldGenerator, ScorerActor


if __name__ == "__main__":
    import actors

    # Before the job's module binds `pipeline_actors` (at its import).
    actors.pipeline_actors = held_actors
    job = importlib.import_module(sys.argv[1])
    sys.argv = [f"{sys.argv[1]}", *sys.argv[2:]]
    sys.exit(job.main(sys.argv[1:]))
