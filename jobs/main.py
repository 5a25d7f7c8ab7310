"""The original main.py: sample N candidates per problem, score them, and select; --method all compares every method.

python -m jobs.main --dataset problems.jsonl --limit 20 --n_repetitive_sampling 4 --method all   (or: bestofn-main ...)
"""

from __future__ import annotations

import dataclasses
import sys

from jobs import infer
from jobs.reduce import print_comparison
from ray_pipeline.cli import program, quiet_ray, run_entry
from ray_pipeline.config import RunConfig, build_parser, config_from_args
from ray_pipeline.manifest import Manifest
from ray_pipeline.report import PLOTS, compare_run
from ray_pipeline.selection import SelectionParams
from ray_pipeline.storage import StoragePath

DEFAULT_METHOD = next(f.default for f in dataclasses.fields(RunConfig) if f.name == "method")


def run(config: RunConfig, command: str | None = None, argv: list[str] | None = None) -> dict:
    """The infer job with `config.method`; with 'all' it selects with the default method, then compares all."""
    compare_all = config.method == "all"
    selected = dataclasses.replace(config, method=DEFAULT_METHOD) if compare_all else config
    comparison: dict = {}

    def compare(run_dir: StoragePath) -> None:
        # Inside the job's lock on the run folder: no other job rewrites the shards while they are read.
        print(f"Comparing every selection method -> {run_dir / 'report.md'}", flush=True)
        plan = Manifest.load(run_dir)
        comparison.update(
            compare_run(
                run_dir,
                SelectionParams.from_config(config),
                expected_shards=sorted(plan.expected_rows()) if plan else None,
                allow_partial=config.allow_partial,
            )
        )
        print_comparison(comparison)
        print(f"Plots: {', '.join(str(run_dir / name) for name in PLOTS.values())}", flush=True)
        print(f"✅ Done! Comparison saved to: {run_dir / 'report.md'}", flush=True)

    report = infer.run(selected, command or "python -m jobs.main", argv, after=compare if compare_all else None)
    if compare_all:
        report["comparison"] = comparison
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(__doc__.strip().splitlines()[0])
    args = parser.parse_args(argv)
    quiet_ray(args.verbose)
    return run_entry(lambda: run(config_from_args(args), program("jobs.main"), argv), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
