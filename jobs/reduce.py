"""Re-select from an existing run's shards, without a model: one method's best answers, or every method's comparison.

python -m jobs.reduce results/<run_id> --method all --alpha 0.5 --num_return_sequences 2

Flags not given keep the run's values (its config.json); --num_return_sequences K takes each
question's first K candidates (K <= the run's N).
"""

from __future__ import annotations

import dataclasses
import sys
import time

from ray_pipeline.cli import run_entry
from ray_pipeline.config import RunConfig, build_parser
from ray_pipeline.errors import PipelineError
from ray_pipeline.manifest import Manifest
from ray_pipeline.reduce import reduce_run, summary_json
from ray_pipeline.report import compare_run
from ray_pipeline.selection import SelectionParams, get_method
from ray_pipeline.shards import check_no_unplanned_files
from ray_pipeline.storage import Location, StoragePath

REDUCE_FIELDS = (
    "method",
    "alpha",
    "lambda_weight",
    "borda_power",
    "borda_score",
    "answerless_last",
    "answer_extraction",
    "deepconf_window",
    "num_return_sequences",
    "allow_partial",
    "verbose",
)


def reduce_config(run_dir: StoragePath, overrides: dict) -> RunConfig:
    """The run's saved configuration with the given flags replacing its values, validated."""
    saved = run_dir / "config.json"
    if not saved.is_file():
        raise PipelineError(f"{run_dir} has no config.json: pass a run folder written by jobs.infer or jobs.main")
    config = dataclasses.replace(RunConfig.load(saved), **overrides).validate()
    if config.method != "all":
        get_method(config.method)
    return config


def run(run_dir: Location, overrides: dict) -> dict:
    """Write `best_<method>.jsonl` into the run folder, or with method 'all' the comparison report."""
    run_dir = StoragePath.parse(run_dir)
    config = reduce_config(run_dir, overrides)
    params = SelectionParams.from_config(config)
    num_candidates = overrides.get("num_return_sequences")
    manifest = Manifest.load(run_dir)
    if manifest is not None:
        check_no_unplanned_files(run_dir / "shards", sorted(manifest.expected_rows()))
    # The plan says which shards must exist: a missing one is refused unless --allow_partial.
    shards = {
        "expected_shards": sorted(manifest.expected_rows()) if manifest else None,
        "allow_partial": config.allow_partial,
    }
    started = time.monotonic()
    try:
        return _reduce(run_dir, config, params, num_candidates, manifest, shards, started)
    except PipelineError as exc:
        if manifest is None or not manifest.command or "shard" not in str(exc):
            raise
        # A missing or damaged shard: the job that made the folder redoes it.
        raise PipelineError(f"{exc} (the run resumes with: {manifest.command})") from None


def _reduce(run_dir, config, params, num_candidates, manifest, shards, started) -> dict:
    if config.method == "all":
        comparison = compare_run(run_dir, params, num_candidates=num_candidates, **shards)
        print_comparison(comparison)
        if manifest is None:
            print(f"UNVERIFIED: {run_dir} has no manifest.json, so the comparison may be partial", flush=True)
        print(f"✅ Done! Comparison saved to: {run_dir / 'report.md'} ({time.monotonic() - started:.1f} s)", flush=True)
        return comparison
    output = run_dir / f"best_{config.method}.jsonl"
    summary = reduce_run(
        run_dir / "shards", output, method=config.method, params=params, num_candidates=num_candidates, **shards
    )
    if summary.partial and manifest is None:
        print(f"UNVERIFIED: {run_dir} has no manifest.json, so {output} may be partial", flush=True)
    elif summary.partial:
        print(f"PARTIAL: shards {summary.missing_shards} are missing; their problems are not in {output}", flush=True)
    print(summary_json(summary), flush=True)
    print(f"✅ Done! Final results saved to: {output} ({time.monotonic() - started:.1f} s)", flush=True)
    return dataclasses.asdict(summary)


def print_comparison(comparison: dict) -> None:
    n = comparison["candidates_per_problem"]
    print(f"{comparison['problems']} problems x {n} candidates, pass@{n} {comparison['pass_at_n']:.3f}", flush=True)
    for name, m in comparison["methods"].items():
        auroc = "—" if m["auroc"] is None else f"{m['auroc']:.3f}"
        low, high = m["ci95"]
        print(f"  {name:<22} accuracy {m['accuracy']:.3f} [{low:.3f}, {high:.3f}]  AUROC {auroc}", flush=True)
    for name, reason in comparison["unavailable"].items():
        print(f"  {name:<22} not available: {reason}", flush=True)


def main(argv: list[str] | None = None) -> int:
    # Only the flags given on the command line replace the run's values.
    parser = build_parser(__doc__.strip().splitlines()[0], REDUCE_FIELDS, with_defaults=False)
    parser.add_argument("run_dir", help="a run folder (holds config.json and shards/): a path or a URI such as s3://…")
    args = vars(parser.parse_args(argv))
    run_dir = args.pop("run_dir")
    # How the job reports, not what it selects: never part of the run's configuration.
    verbose = args.pop("verbose", False)
    return run_entry(lambda: run(run_dir, args), verbose=verbose)


if __name__ == "__main__":
    sys.exit(main())
