"""A job as a user runs it, whose generator holds every batch of shard HELD_FROM_SHARD and later until the file
HELD_RELEASE exists: a test then stops, kills or signals it at a known point, on any machine, at any speed.

    HELD_FROM_SHARD=1 HELD_RELEASE=/tmp/go python tests/held_job.py jobs.infer --dataset embedded:8 ...

The shards before HELD_FROM_SHARD are generated, scored and committed as usual; the job then waits in its
generator (its actor alive, a batch in flight) until the release file appears, or for ever. Once it holds a
batch, the file HELD_RELEASE + ".holding" exists (`holding`): a test then knows the actor has it. Everything else is
the job itself: its flags, its Ray (a local one, whose actors inherit this environment), its signal handling,
its output. The held generator is defined here, in `__main__`, so Ray ships it to the actor by value.

Two flags keep the wait where it is meant to be:
- `--generate_in_flight` at least the number of generator batches: Ray Data hands an actor its batches in no set
  order, and with transformers' one batch at a time a held batch that came first would keep the earlier shards'
  out for good; with all of them in, the held ones wait while the others are generated;
- a scorer call of at most one shard's problems (`--score_batch_size` at most N x shard_size): Ray Data fills a
  scorer batch before calling the scorer, so a larger one would wait for the held shard's rows.

`HeldJob` starts one from a test and waits until it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The line the job prints once the manifest records a committed shard.
COMMITTED = re.compile(r"^  shard (\d+) committed -> ", re.MULTILINE)

HOLD_FROM = int(os.environ.get("HELD_FROM_SHARD", "0"))
RELEASE = os.environ.get("HELD_RELEASE", "")


def holding(release: str | os.PathLike) -> str:
    """The file that exists while a held job's generator holds a batch whose release file is `release`."""
    return f"{os.fspath(release)}.holding"


class HeldJob:
    """`python -m MODULE ARGS` as a user runs it (its own local Ray, or the cluster `env` names), except that its
    generator holds every batch of shard `hold_from` and later until `release` exists (for good when it never does).
    Its own session, so a test can signal the driver alone and still SIGKILL the whole group; its output goes to
    files in `folder` (a pipe nobody reads while it waits could fill)."""

    def __init__(self, folder: Path, args: list[str], hold_from: int = 1, release: Path | None = None,
                 module: str = "jobs.infer", env: dict | None = None):  # fmt: skip
        self.release = release or folder / "never"
        self.stdout_path, self.stderr_path = folder / "job.stdout", folder / "job.stderr"
        held = {"HELD_FROM_SHARD": str(hold_from), "HELD_RELEASE": str(self.release)}
        with self.stdout_path.open("w") as stdout, self.stderr_path.open("w") as stderr:
            self.driver = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), module, *args], cwd=ROOT,
                env={**os.environ, **(env or {}), **held}, stdout=stdout, stderr=stderr, start_new_session=True,
            )  # fmt: skip

    def output(self) -> tuple[str, str]:
        return self.stdout_path.read_text(), self.stderr_path.read_text()

    def committed(self) -> set[int]:
        """The shards the job says it committed."""
        return {int(shard_id) for shard_id in COMMITTED.findall(self.output()[0])}

    def wait_until_held(self, shards: set[int], timeout_s: float = 600) -> None:
        """Until exactly `shards` (those before the hold) are committed and the generator holds a later batch."""
        deadline = time.monotonic() + timeout_s
        while self.driver.poll() is None and not (
            self.committed() == shards and os.path.exists(holding(self.release))
        ):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for shards {sorted(shards)} and a held batch")
            time.sleep(0.1)
        assert self.driver.poll() is None, f"the held job ended on its own: {self.output()[1][-3000:]}"

    def let_through(self) -> None:
        """Release the held batches: the job goes on to its end."""
        self.release.touch()

    def kill(self) -> None:
        """SIGKILL the driver's group if the driver still runs."""
        if self.driver.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.driver.pid, signal.SIGKILL)
            self.driver.wait()


def held_actors():
    from actors.generator import GeneratorActor
    from actors.scorer import ScorerActor

    class HeldGenerator(GeneratorActor):
        async def __call__(self, batch):
            if min(batch.column("shard_id").to_pylist()) >= HOLD_FROM and not os.path.exists(RELEASE):
                with open(holding(RELEASE), "a"):
                    pass
                while not os.path.exists(RELEASE):
                    await asyncio.sleep(0.05)
            async for table in super().__call__(batch):
                yield table

    # Ray names the actors after the class: the held one is still a GeneratorActor to `pgrep` and the state API.
    HeldGenerator.__name__ = HeldGenerator.__qualname__ = "GeneratorActor"
    return HeldGenerator, ScorerActor


if __name__ == "__main__":
    if not RELEASE or "HELD_FROM_SHARD" not in os.environ:
        sys.exit("usage: HELD_FROM_SHARD=N HELD_RELEASE=FILE python tests/held_job.py JOB_MODULE FLAGS...")
    import actors

    # Before the job's module binds `pipeline_actors` (at its import).
    actors.pipeline_actors = held_actors
    job = importlib.import_module(sys.argv[1])
    sys.argv = [f"{sys.argv[1]}", *sys.argv[2:]]
    sys.exit(job.main(sys.argv[1:]))
