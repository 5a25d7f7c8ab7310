"""Re-select from an existing run's shards, without a model: one method's best answers, or every method's comparison.

python -m jobs.reduce results/<run_id> --method all --alpha 0.5 --num_return_sequences 2

Flags not given keep the run's values (its config.json); --num_return_sequences K takes each
question's first K candidates (K <= the run's N).
"""

from __future__ import annotations

if __name__ == "__main__":
    # First, before the imports: a stop signal from the process's start on ends it with its own line.
    from ray_pipeline.cluster.signals import stop_before_the_job

    stop_before_the_job()

from ray_pipeline.cli import exit_process, run_entry
from ray_pipeline.config import build_parser, config_fields
from ray_pipeline.reselect import reselect

# Every selection setting, how many candidates to take, and how the job reports.
RESELECT_FIELDS = [f.name for f in config_fields("selection")] + [
    "num_return_sequences",
    "allow_partial",
    "verbose",
]


def main(argv: list[str] | None = None) -> int:
    # Only the flags given on the command line replace the run's values.
    parser = build_parser(__doc__.strip().splitlines()[0], RESELECT_FIELDS, with_defaults=False)
    parser.add_argument("run_dir", help="a run folder (holds config.json and shards/): a path or a URI such as s3://…")
    overrides = vars(parser.parse_args(argv))
    run_dir = overrides.pop("run_dir")
    # How the job reports, not what it selects: never part of the run's configuration.
    verbose = overrides.pop("verbose", False)
    return run_entry(lambda: reselect(run_dir, overrides), verbose=verbose)


if __name__ == "__main__":
    exit_process(main())
