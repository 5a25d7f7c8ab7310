"""The cluster: the actor pools, what each actor reserves, and which Ray the job joins."""

from __future__ import annotations

from dataclasses import dataclass

from ray_pipeline.config.options import Section, _opt
from ray_pipeline.errors import ConfigError


@dataclass
class Cluster(Section):
    """The pools' sizes, the resources each actor asks for, the wait for them, and the Ray address."""

    TITLE = "cluster"
    ROLE = "execution"

    num_generators: int = _opt(1, "generator actors in the pool", low=1, high=4096)
    num_scorers: int = _opt(1, "scorer actors in the pool", low=1, high=4096)
    max_generators: int | None = _opt(
        None,
        "autoscale the generator pool between num_generators and this many actors as work queues up "
        "(default: a fixed pool of num_generators)",
        low=1,
        high=4096,
    )
    max_scorers: int | None = _opt(
        None,
        "autoscale the scorer pool between num_scorers and this many actors (default: fixed)",
        low=1,
        high=4096,
    )
    gpus_per_generator: float | None = _opt(
        None,
        "GPUs per generator actor (default: 0.6 on a GPU node, so no two generators share a GPU; "
        "tensor_parallel_size whole GPUs when that is > 1; else 0)",
        low=0.0,
    )
    gpus_per_scorer: float | None = _opt(
        None,
        "GPUs per scorer actor (default: 0.4 on a GPU node, the rest of a generator's GPU; else 0)",
        low=0.0,
    )
    cpus_per_actor: float = _opt(1.0, "CPUs reserved by each actor (also its torch threads on CPU)", low=0.0)
    generator_resource: str | None = _opt(
        None,
        "custom Ray resource each generator actor needs one unit of (places the pool on nodes that have it)",
    )
    scorer_resource: str | None = _opt(None, "custom Ray resource each scorer actor needs one unit of")
    resource_wait_s: float = _opt(
        600.0,
        "seconds the job waits while a pool has no actor running and the cluster lacks what one needs (its nodes "
        "busy, or the node that had it lost) before it stops, saying what it waited for (committed shards are "
        "kept); meanwhile it says so every 10 s; 0 waits for ever",
        low=0.0,
    )
    verbose: bool = _opt(False, "show Ray's own INFO lines and progress bars")
    ray_address: str | None = _opt(None, "Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")

    def check(self) -> None:
        for pool in ("generators", "scorers"):
            low, high = self.pool_bounds(pool)
            if high < low:
                raise ConfigError(f"max_{pool} must be in [num_{pool}={low}, 4096], got {high}")

    def pool_bounds(self, pool: str) -> tuple[int, int]:
        """(min, max) actors of the 'generators' or 'scorers' pool; equal for a fixed pool."""
        low, high = getattr(self, f"num_{pool}"), getattr(self, f"max_{pool}")
        return low, high if high is not None else low
