"""The original main.py: sample N candidates per problem, score them, and select; --method all compares every method.

python -m jobs.main --dataset problems.jsonl --limit 20 --n_repetitive_sampling 4 --method all   (or: bestofn-main ...)
"""

from __future__ import annotations

import dataclasses
import sys

if __name__ == "__main__":
    # First, before the imports: a stop signal from the process's start on ends it with its own line.
    from ray_pipeline.cluster.signals import stop_before_the_job

    stop_before_the_job()

from actors import pipeline_actors
from ray_pipeline import run
from ray_pipeline.cli import exit_process, program, quiet_ray, run_entry
from ray_pipeline.config import RunConfig, build_parser, config_from_args
from ray_pipeline.timeline import mark, mark_process_start


def main_job(config: RunConfig, command: str, argv: list[str]) -> None:
    """The infer job with `config.method`; with 'all' it selects with the default method, then compares all."""
    compare_all = config.method == "all"
    selected = dataclasses.replace(config, method=RunConfig().method) if compare_all else config
    with run.plan(selected, command, argv) as plan:
        run.select(plan, run.execute(plan, *pipeline_actors()))
        if compare_all:
            run.compare(plan)


def main(argv: list[str] | None = None) -> int:
    mark_process_start("driver started")
    mark("driver imported")
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(__doc__.strip().splitlines()[0]).parse_args(argv)
    quiet_ray(args.verbose)
    return run_entry(lambda: main_job(config_from_args(args), program("jobs.main"), argv), verbose=args.verbose)


if __name__ == "__main__":
    exit_process(main())
