"""One run in three steps, which every job calls: plan, execute, select.

`plan` names and locks the run folder and decides, from its manifest and shards, what there is to
do (no Ray); `execute` starts Ray and generates and scores the shards to do; `select` reduces the
shards to the best-answer file and summary.json. `compare` adds every method's report (jobs.main
--method all) and `reselect` re-selects from a finished run folder without a model (jobs.reduce).

    with plan(config) as run:
        select(run, execute(run))
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from ray_pipeline.cli import Interrupted, quiet_ray_warnings, resume_command
from ray_pipeline.config import DEVICE_RESOLVED_FIELDS, RunConfig
from ray_pipeline.data import load_problems
from ray_pipeline.deepconf import FINAL, SKIPPED, OnlineSettings, estimated_savings
from ray_pipeline.errors import ConfigError, PipelineError
from ray_pipeline.manifest import (
    COMMITTED,
    FAILED,
    PENDING,
    Manifest,
    best_file_name,
    choose_shards,
    default_run_id,
    fingerprint,
    shard_faults,
)
from ray_pipeline.model import (
    check_context,
    check_hub_model,
    check_prompts_fit,
    check_tensor_parallel,
    model_name,
    resolve_model,
)
from ray_pipeline.plots import PLOTS
from ray_pipeline.progress import Progress, pools_text
from ray_pipeline.reduce import (
    GradedRun,
    ShardFault,
    ShardPlan,
    Summary,
    grade_run,
    reduce_run,
    summary_json,
    write_best,
)
from ray_pipeline.report import COMPARISON_FILES, compare_run
from ray_pipeline.selection import SelectionParams, get_method
from ray_pipeline.shards import (
    FOREIGN_SHARD,
    check_no_unplanned_files,
    read_shards,
    remove_stale_temporaries,
)
from ray_pipeline.storage import Location, StorageError, StoragePath
from ray_pipeline.timeline import mark


@dataclass
class RunPlan:
    """What a run will do: its problems, its run folder and manifest, the shards to do and where results go."""

    # As given: DEVICE_RESOLVED_FIELDS (the backend, the scorer's passes) may be unresolved until execute.
    config: RunConfig
    problems: pa.Table
    # The model path as the actors open it (a GGUF is materialized to a folder).
    model: str
    run_dir: StoragePath
    # The command that resumes this run, for every hint that names it.
    resume: str
    manifest: Manifest
    # True when this job plans the manifest (its fingerprint gets the resolved device fields); False when loaded.
    new: bool
    todo: list[int]
    # One line per committed shard that is redone or distrusted, and why.
    notes: list[str]
    best: StoragePath
    # The shards checked, graded and grouped by `select`, which `compare` reuses.
    graded: GradedRun | None = None

    @property
    def shards_dir(self) -> StoragePath:
        return self.run_dir / "shards"

    @property
    def shard_ids(self) -> list[int]:
        """Every planned shard: the reducer refuses a run that lacks one."""
        return sorted(self.manifest.expected_rows())


@dataclass
class RunStats:
    """What `execute` did: the configuration with the cluster's settings resolved, and how long it took."""

    config: RunConfig
    generate_and_score_s: float


@contextmanager
def plan(config: RunConfig, command: str = "python -m jobs.infer", argv: list[str] | None = None) -> Iterator[RunPlan]:
    """The run's plan, with its folder made and locked until the block ends; no Ray.

    Refuses bad input (an unknown method, a missing model or data set, an unwritable folder, a run
    folder made with another configuration) before a manifest or shard is written. `command` and `argv` (how
    the user started the job) make the resume command. Ctrl-C inside the block ends in Interrupted,
    whose message names the resume command.
    """
    get_method(config.method)
    problems = load_problems(
        config.dataset, split=config.dataset_split, limit=config.limit, shard_size=config.shard_size
    )
    # Resolving here fails fast on a bad path and materializes a GGUF once before actors start.
    model = resolve_model(config.model_path)
    if model == config.model_path and not Path(model).exists():
        check_hub_model(model)
    check_tensor_parallel(model, config.tensor_parallel_size)
    check_context(model, config.max_tokens, config.max_model_len)
    texts = problems.column("problem").to_pylist()
    check_prompts_fit(model, texts, config.prompt, config.max_tokens, config.max_model_len)
    name = model_name(config.model_path)
    output_dir = StoragePath.parse(config.output_dir)
    # The backend as given ('auto' included): the same command names the same folder on any cluster.
    fp = fingerprint(config, problems, model)
    run_id = config.run_id or default_run_id(config.dataset, name, fp)
    if run_id.lower().endswith(".jsonl"):
        # Best-answer files live beside the run folders: a folder named like one could take another run's name.
        raise PipelineError(f"run_id {run_id!r} ends in .jsonl, as the best-answer files beside it do: pass another")
    run_dir = output_dir / run_id
    resume = resume_command(command, argv if argv is not None else [], run_id)
    _make_folder(run_dir)
    with run_dir.lock() as locked:
        if not locked:
            print(f"  note: {run_dir} is on an object store, which has no lock: run one job per run folder", flush=True)
        try:
            yield _plan_locked(config, problems, model, fp, name, output_dir, run_dir, resume)
        except KeyboardInterrupt:
            raise Interrupted(f"committed shards are kept in {run_dir}; resume with: {resume}") from None


def _plan_locked(
    config: RunConfig,
    problems: pa.Table,
    model: str,
    fp: dict,
    name: str,
    output_dir: StoragePath,
    run_dir: StoragePath,
    resume: str,
) -> RunPlan:
    shards_dir = run_dir / "shards"
    # A corrupt manifest must not stop --overwrite from starting over.
    manifest = None if config.overwrite else Manifest.load(run_dir)
    if manifest is None and shards_dir.files() and not config.overwrite:
        raise PipelineError(f"{run_dir} holds shards but no manifest: pass --overwrite or a new --run_id")
    if manifest is not None and not config.resume:
        raise PipelineError(f"run folder {run_dir} exists: drop --no-resume to resume it, or pass --overwrite")
    new = manifest is None
    if manifest is None:
        # Every shard is to do: the folder has none, or --overwrite removes them (execute, once Ray is up).
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d_%H%M%S")
        n = config.num_return_sequences
        manifest = Manifest.plan(run_dir.name, stamp, name, fp, problems, n)
        faults = dict.fromkeys(manifest.expected_rows(), "missing")
    else:
        # Everything but what the cluster resolves ('auto' backend, scorer passes; execute checks those).
        manifest.check_same_run(fp, run_dir, config)
        manifest.check_plan(run_dir, problems, fix="restore it, or pass --overwrite to start the run folder over")
        faults = shard_faults(manifest, shards_dir)
    todo, notes = choose_shards(manifest, faults, shards_dir, config.reprocess_shard_ids(), config.reprocess_failed)
    best = output_dir / best_file_name(config.dataset, manifest.model_name, run_dir.name)
    return RunPlan(config, problems, model, run_dir, resume, manifest, new, todo, notes, best)


def _make_folder(run_dir: StoragePath) -> None:
    """Create the run folder and prove it writable before any work starts."""
    try:
        run_dir.mkdir()
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.delete()
    except StorageError as exc:
        what = "pass a writable --output_dir" if run_dir.is_local else f"{exc.hint}, or pass another --output_dir"
        raise PipelineError(f"cannot write the run folder {run_dir}: {exc.reason}; {what}") from None


def execute(plan: RunPlan, generator_cls: type, scorer_cls: type, in_process: bool = False) -> RunStats:
    """Start Ray, resolve the cluster's settings, and generate and score the plan's shards to do, committing each.

    The one step that needs a cluster; the job hands in the actor classes, so the library never imports `actors/`.
    `in_process` runs the stages in this process without Ray (`ray_pipeline.inprocess`: tests of what is not
    Ray's or an engine's behaviour).
    """
    from ray_pipeline.cluster import init_ray
    from ray_pipeline.pipeline import resolve_execution, run_stages

    mark("planned")
    if in_process:
        from ray_pipeline.inprocess import has_gpu, run_in_process

        stages, gpu = run_in_process, has_gpu()
    else:
        init_ray(plan.config)
        mark("ray started")
        quiet_ray_warnings(plan.config.verbose)
        stages, gpu = run_stages, None
    config = resolve_execution(plan.config, plan.problems.num_rows, has_gpu=gpu)
    # Only these are taken resolved: other cluster-derived defaults do not change the shards.
    resolved = dataclasses.replace(plan.config, **{name: getattr(config, name) for name in DEVICE_RESOLVED_FIELDS})
    fp = fingerprint(resolved, plan.problems, plan.model)
    manifest, run_dir, shards_dir = plan.manifest, plan.run_dir, plan.shards_dir
    if plan.new:
        manifest.fingerprint = fp
    else:
        manifest.check_same_run(fp, run_dir, resolved)
    if config.overwrite:
        shards_dir.delete_contents()
        # What the old shards produced goes with them: a report beside new shards would describe a run that is gone.
        for stale in [run_dir / f for f in ("summary.json", *COMPARISON_FILES)] + run_dir.files("best_*.jsonl"):
            if stale.is_file():
                stale.delete()
    shards_dir.mkdir()
    # Safe: this job holds the run folder's lock, so no other writer's temporary is in the making.
    remove_stale_temporaries(shards_dir)
    for shard_id in plan.todo:
        manifest.set_status(shard_id, PENDING)
    manifest.command = plan.resume
    manifest.save(run_dir)
    config.save(run_dir / "config.json")

    n = config.num_return_sequences
    print(
        f"[1/2] Generating candidates -> {run_dir}/ ({plan.problems.num_rows} problems x {n} candidates, "
        f"{len(plan.todo)} of {len(manifest.shards)} shards to do, backend {config.backend})",
        flush=True,
    )
    for note in plan.notes:
        print(f"  {note}", flush=True)
    started = time.monotonic()

    def committed(shard_id: int, path: StoragePath, error_rows: int) -> None:
        manifest.set_status(shard_id, FAILED if error_rows else COMMITTED)
        manifest.save(run_dir)
        mark("shard committed")
        failed = f", {error_rows} error rows" if error_rows else ""
        print(f"  shard {shard_id} committed -> {path} ({time.monotonic() - started:.0f} s{failed})", flush=True)

    if plan.todo:
        wanted = pc.is_in(plan.problems.column("shard_id"), pa.array(plan.todo, pa.int32()))
        todo_problems = plan.problems.filter(wanted)
        progress = Progress(todo_problems.num_rows, n, pools=pools_text(config.num_generators, config.num_scorers))
        try:
            stages(
                config,
                todo_problems,
                shards_dir,
                generator_cls,
                scorer_cls,
                on_commit=committed,
                # The folder's own: a resume may differ from it only in fields that change no value.
                fingerprint=manifest.fingerprint_hash,
                on_batch=progress.add,
                on_generating=progress.generating,
            )
        except PipelineError as exc:
            raise PipelineError(f"{exc} (committed shards are kept; resume with: {plan.resume})") from None
    mark("executed")
    return RunStats(config, time.monotonic() - started)


def select(plan: RunPlan, stats: RunStats) -> Summary:
    """Reduce the run's shards to its best-answer file (the method of `stats.config`) and write summary.json."""
    config = stats.config
    print(f"[2/2] Evaluating and selecting best answers -> {plan.best}", flush=True)
    check_no_unplanned_files(plan.shards_dir, plan.shard_ids)
    params = SelectionParams.from_config(config)
    try:
        shards = ShardPlan.of(plan.manifest)
        online = OnlineSettings.from_config(config)
        graded = grade_run(plan.shards_dir, params, plan=shards, allow_partial=config.allow_partial, online=online)
        summary = write_best(graded, plan.best, config.method, params, verified=True)
        plan.graded = graded
    except PipelineError as exc:
        # A shard lost or damaged since it was committed: the resume command redoes it.
        raise PipelineError(f"{exc} (resume with: {plan.resume})") from None
    report = json.loads(summary_json(summary)) | {
        # The fingerprint check guarantees every shard was made by this (resolved) backend.
        "backend": config.backend,
        "generate_and_score_s": stats.generate_and_score_s,
        "run_dir": str(plan.run_dir),
    }
    (plan.run_dir / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    partial = f" PARTIAL: shards {summary.missing_shards} missing," if summary.partial else ""
    n = config.num_return_sequences
    ungraded = f" ({summary.ungraded} without a gold answer, not graded)" if summary.ungraded else ""
    accuracy, oracle = _number(summary.accuracy), _number(summary.pass_at_n)
    print(
        f"  backend {config.backend}:{partial} {summary.problems} problems{ungraded}, {summary.candidates} candidates, "
        f"accuracy ({config.method}) {accuracy}, pass@{n} {oracle}, generate+score {stats.generate_and_score_s:.0f} s",
        flush=True,
    )
    for problem_id, error in summary.error_problems.items():
        print(f"  no candidates for {problem_id}: {error}", flush=True)
    if config.generation == "deepconf-online":
        print(online_tokens_line(plan.shards_dir, stats.generate_and_score_s), flush=True)
    print(f"✅ Done! Final results saved to: {plan.best}", flush=True)
    mark("selected")
    return summary


def online_tokens_line(shards_dir: StoragePath, generate_and_score_s: float | None = None) -> str:
    """What DeepConf online saved in a run: tokens generated, traces stopped and skipped, and an estimate of the
    tokens (and, given this run's generate+score seconds, the time) running every trace to its end would have
    taken (`deepconf.estimated_savings`; time counted in proportion to the tokens the engine generated)."""
    table = read_shards(shards_dir, ["problem_id", "phase", "stopped_at", "token_count", "engine_token_count"])
    phase = table.column("phase").to_pylist()
    stopped = [s is not None for s in table.column("stopped_at").to_pylist()]
    counts = table.column("token_count").to_pylist()
    generated, estimate = estimated_savings(table.column("problem_id").to_pylist(), phase, stopped, counts)
    final = sum(p == FINAL for p in phase)
    engine = max(generated, sum(c or 0 for c in table.column("engine_token_count").to_pylist()))
    spent = f" (+{engine - generated:,} generated and not kept)" if engine > generated else ""
    saved = 1 - engine / estimate if estimate else 0.0
    seconds = ""
    if generate_and_score_s and engine and estimate > engine:
        full_s = generate_and_score_s * estimate / engine
        seconds = f" and about {full_s - generate_and_score_s:.0f} s of {full_s:.0f} s"
    return (
        f"  deepconf-online: {generated:,} tokens generated{spent}; {sum(stopped)} of {final} final traces stopped "
        f"early, {sum(p == SKIPPED for p in phase)} skipped; about {max(0, estimate - engine):,} tokens ({saved:.0%})"
        f"{seconds} saved against running every trace to its end (estimate: a cut trace counted at its problem's "
        f"mean complete length, time in proportion to tokens)"
    )


def compare(plan: RunPlan) -> dict:
    """Compare every selection method on the run's shards: report.md, debug.jsonl, the plots and summary.json.

    Call it inside `plan`'s block: under the folder's lock no other job rewrites the shards while they are read.
    """
    run_dir = plan.run_dir
    print(f"Comparing every selection method -> {run_dir / 'report.md'}", flush=True)
    params = SelectionParams.from_config(plan.config)
    shard_plan = ShardPlan.of(plan.manifest)
    graded = plan.graded if plan.graded is not None and plan.graded.params == params else None
    comparison = compare_run(
        run_dir,
        params,
        plan=shard_plan,
        allow_partial=plan.config.allow_partial,
        graded=graded,
        online=OnlineSettings.from_config(plan.config),
    )
    print_comparison(comparison)
    print(f"Plots: {', '.join(str(run_dir / name) for name in PLOTS.values())}", flush=True)
    print(f"✅ Done! Comparison saved to: {run_dir / 'report.md'}", flush=True)
    mark("compared")
    return comparison


def _number(value: float | None) -> str:
    """A share or score as the console prints it: three decimals, or — when there is none (nothing graded)."""
    return "—" if value is None else f"{value:.3f}"


def print_comparison(comparison: dict) -> None:
    n = comparison["candidates_per_problem"]
    ungraded = comparison.get("ungraded", 0)
    graded = f" ({ungraded} without a gold answer, not graded)" if ungraded else ""
    oracle = _number(comparison["pass_at_n"])
    print(f"{comparison['problems']} problems x {n} candidates{graded}, pass@{n} {oracle}", flush=True)
    for name, m in comparison["methods"].items():
        accuracy = f"{_number(m['accuracy'])} [{_number(m['ci95'][0])}, {_number(m['ci95'][1])}]"
        print(f"  {name:<22} accuracy {accuracy}  AUROC {_number(m['auroc'])}", flush=True)
    for name, reason in comparison["unavailable"].items():
        print(f"  {name:<22} not available: {reason}", flush=True)


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
    with run_dir.lock(fix="then reduce it"):
        return _reselect_locked(run_dir, overrides)


def _reselect_locked(run_dir: StoragePath, overrides: dict) -> Summary | dict:
    config = reselect_config(run_dir, overrides)
    # The reducer starts nothing over: the job that made the folder does.
    fix = "rerun the jobs.infer or jobs.main command that made it with --overwrite"
    manifest = Manifest.load(run_dir, fix=fix)
    if manifest is not None:
        manifest.check_plan(run_dir, None, fix=f"restore it, or {fix}")
    # The plan says which shards must exist and what each must hold: the resume's shard check runs on each.
    shard_plan = ShardPlan.of(manifest) if manifest else None
    if shard_plan is not None:
        check_no_unplanned_files(run_dir / "shards", shard_plan.shard_ids)
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
