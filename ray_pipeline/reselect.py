"""Re-selecting from a finished run folder without a model (jobs.reduce): the run's saved configuration with the
flags given, the folder's shard check, then one method's best-answer file or every method's comparison."""

from __future__ import annotations

import dataclasses
import time
import typing

from ray_pipeline.config import RunConfig
from ray_pipeline.deepconf import OnlineSettings
from ray_pipeline.errors import ConfigError, PipelineError
from ray_pipeline.reduce import Summary, reduce_run, summary_json
from ray_pipeline.report import compare_run
from ray_pipeline.run import print_comparison
from ray_pipeline.run_folder import RunFolder, ShardFault, ShardPlan
from ray_pipeline.selection import SelectionParams, get_method
from ray_pipeline.shards import FOREIGN_SHARD
from ray_pipeline.storage import Location, StoragePath


def reselect_config(run_dir: StoragePath, overrides: dict) -> RunConfig:
    """The run's saved configuration with the given flags replacing its values, validated."""
    saved = run_dir / "config.json"
    if not saved.is_file():
        raise PipelineError(f"{run_dir} has no config.json: pass a run folder written by jobs.infer or jobs.main")
    fix = "fix that value in the file, or rerun the jobs.infer or jobs.main command that made the run (it rewrites it)"
    loaded = RunConfig.load(saved)
    wrong = wrong_type_field(loaded)
    if wrong:
        raise ConfigError(f"run configuration {saved}: {wrong}; {fix}")
    window = overrides.get("deepconf_window")
    if loaded.generation == "deepconf-online" and window is not None and window != loaded.deepconf_window:
        # An online run's traces were stopped by its own window: another would let stopped traces vote as if whole.
        raise ConfigError(
            f"deepconf_window {window}: this run was generated online with --deepconf_window "
            f"{loaded.deepconf_window}, which decided where its traces stopped; reduce it with that window (drop the "
            "flag), or compare windows on a run generated in full"
        )
    try:
        config = dataclasses.replace(loaded, **overrides).validate()
    except ConfigError as exc:
        # A refused value the flags did not give is the file's: the line names the file, not a flag.
        if str(exc).split(" ", 1)[0] in overrides:
            raise
        raise ConfigError(f"run configuration {saved}: {exc}; {fix}") from None
    if config.method != "all":
        get_method(config.method)
    return config


def wrong_type_field(config: RunConfig) -> str | None:
    """The first field holding a value of another type than its annotation allows (a hand-edited config.json)."""
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        value, hint = getattr(config, f.name), hints[f.name]
        allowed = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if value is None and type(None) in typing.get_args(hint):
            continue
        kinds = tuple(allowed)
        fits = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            fits = True
        if not fits:
            return f"'{f.name}' is {type(value).__name__} {value!r}, not {' or '.join(a.__name__ for a in allowed)}"
    return None


def reselect(run_dir: Location, overrides: dict) -> Summary | dict:
    """Re-select from a run folder's shards without a model: `best_<method>.jsonl`, or with method 'all' the comparison.

    `overrides` are the flags given, which replace the run's saved values; `num_return_sequences` K
    takes each question's first K candidates.
    """
    run_dir = StoragePath.parse(run_dir)
    if run_dir.is_local and not run_dir.is_dir():
        raise PipelineError(f"run folder {run_dir} does not exist: pass one written by jobs.infer or jobs.main")
    # A job writing the folder holds its lock: its shards, manifest and config.json are not all there yet.
    with RunFolder(run_dir).lock(fix="then reduce it"):
        return _reselect_locked(run_dir, overrides)


def _reselect_locked(run_dir: StoragePath, overrides: dict) -> Summary | dict:
    config = reselect_config(run_dir, overrides)
    # The reducer starts nothing over: the job that made the folder does.
    fix = "rerun the jobs.infer or jobs.main command that made it with --overwrite"
    folder = RunFolder(run_dir)
    shard_plan = folder.load_for_reduce(fix)
    manifest = folder.manifest
    started = time.monotonic()
    try:
        return _reselect(run_dir, config, overrides.get("num_return_sequences"), shard_plan, started)
    except ShardFault as exc:
        if manifest is None or not manifest.command:
            raise
        if exc.fault.startswith(FOREIGN_SHARD):
            # The resume keeps another configuration's shard: it must be named to be redone.
            redo = f"{manifest.command} --reprocess_shards {exc.shard_id}"
            raise PipelineError(f"{exc}: remove it, or redo it with: {redo}") from None
        raise PipelineError(f"{exc} (the run resumes with: {manifest.command})") from None
    except PipelineError as exc:
        if manifest is None or not manifest.command or "shard" not in str(exc):
            raise
        # A missing shard: the job that made the folder redoes it.
        raise PipelineError(f"{exc} (the run resumes with: {manifest.command})") from None


def _reselect(
    run_dir: StoragePath,
    config: RunConfig,
    num_candidates: int | None,
    shard_plan: ShardPlan | None,
    started: float,
) -> Summary | dict:
    params = SelectionParams.from_config(config)
    shards = {"plan": shard_plan, "allow_partial": config.allow_partial}
    if config.method == "all":
        online = OnlineSettings.from_config(config)
        comparison = compare_run(run_dir, params, num_candidates=num_candidates, online=online, **shards)
        print_comparison(comparison)
        if shard_plan is None:
            print(f"UNVERIFIED: {run_dir} has no manifest.json, so the comparison may be partial", flush=True)
        print(f"✅ Done! Comparison saved to: {run_dir / 'report.md'} ({time.monotonic() - started:.1f} s)", flush=True)
        return comparison
    output = run_dir / f"best_{config.method}.jsonl"
    summary = reduce_run(
        run_dir / "shards", output, method=config.method, params=params, num_candidates=num_candidates, **shards
    )
    if summary.partial and shard_plan is None:
        print(f"UNVERIFIED: {run_dir} has no manifest.json, so {output} may be partial", flush=True)
    elif summary.partial:
        print(f"PARTIAL: shards {summary.missing_shards} are missing; their problems are not in {output}", flush=True)
    print(summary_json(summary), flush=True)
    print(f"✅ Done! Final results saved to: {output} ({time.monotonic() - started:.1f} s)", flush=True)
    return summary
