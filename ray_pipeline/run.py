"""One run in three steps, which every job calls: plan, execute, select.

`plan` names and locks the run folder and decides, from its manifest and shards, what there is to
do (no Ray); `execute` starts Ray and generates and scores the shards to do; `select` reduces the
shards to the best-answer file and summary.json. `compare` adds every method's report (jobs.main
--method all); `reselect.reselect` re-selects from a finished run folder without a model (jobs.reduce).

    with plan(config) as run:
        select(run, execute(run))
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from ray_pipeline.cli import Interrupted, quiet_ray_warnings, resume_command
from ray_pipeline.config import RunConfig
from ray_pipeline.data import load_problems
from ray_pipeline.deepconf import FINAL, SKIPPED, OnlineSettings, estimated_savings
from ray_pipeline.errors import PipelineError
from ray_pipeline.graded_run import grade_run
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
from ray_pipeline.reduce import Summary, summary_json, write_best
from ray_pipeline.report import COMPARISON_FILES, compare_run
from ray_pipeline.run_folder import RunFolder
from ray_pipeline.selection import SelectionParams, get_method
from ray_pipeline.shards import read_shards
from ray_pipeline.storage import StoragePath
from ray_pipeline.timeline import mark


@dataclass
class RunStats:
    """What `execute` did: the configuration with the cluster's settings resolved, and how long it took."""

    config: RunConfig
    generate_and_score_s: float


@contextmanager
def plan(
    config: RunConfig, command: str = "python -m jobs.infer", argv: list[str] | None = None
) -> Iterator[RunFolder]:
    """The run's plan: its folder (RunFolder) made, planned (`todo`, `notes`, `resume_command`) and locked until
    the block ends; no Ray.

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
    folder = RunFolder.for_run(config, problems, model, model_name(config.model_path))
    resume = resume_command(command, argv if argv is not None else [], folder.path.name)
    folder.make()
    with folder.lock() as locked:
        if not locked:
            note = "is on an object store, which has no lock: run one job per run folder"
            print(f"  note: {folder.path} {note}", flush=True)
        try:
            folder.plan(resume)
            yield folder
        except KeyboardInterrupt:
            raise Interrupted(f"committed shards are kept in {folder.path}; resume with: {resume}") from None


def execute(plan: RunFolder, generator_cls: type, scorer_cls: type, in_process: bool = False) -> RunStats:
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
    plan.prepare(config, stale=COMPARISON_FILES)
    manifest, run_dir, shards_dir = plan.manifest, plan.path, plan.shards_dir

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
        plan.commit(shard_id, error_rows)
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
            raise PipelineError(f"{exc} (committed shards are kept; resume with: {plan.resume_command})") from None
    mark("executed")
    return RunStats(config, time.monotonic() - started)


def select(plan: RunFolder, stats: RunStats) -> Summary:
    """Reduce the run's shards to its best-answer file (the method of `stats.config`) and write summary.json."""
    config = stats.config
    print(f"[2/2] Evaluating and selecting best answers -> {plan.best}", flush=True)
    plan.check_no_unplanned_files()
    params = SelectionParams.from_config(config)
    try:
        shards = plan.shard_plan()
        online = OnlineSettings.from_config(config)
        graded = grade_run(plan.shards_dir, params, plan=shards, allow_partial=config.allow_partial, online=online)
        summary = write_best(graded, plan.best, config.method, params, verified=True)
        plan.graded = graded
    except PipelineError as exc:
        # A shard lost or damaged since it was committed: the resume command redoes it.
        raise PipelineError(f"{exc} (resume with: {plan.resume_command})") from None
    report = json.loads(summary_json(summary)) | {
        # The fingerprint check guarantees every shard was made by this (resolved) backend.
        "backend": config.backend,
        "generate_and_score_s": stats.generate_and_score_s,
        "run_dir": str(plan.path),
    }
    (plan.path / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
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


def compare(plan: RunFolder) -> dict:
    """Compare every selection method on the run's shards: report.md, debug.jsonl, the plots and summary.json.

    Call it inside `plan`'s block: under the folder's lock no other job rewrites the shards while they are read.
    """
    run_dir = plan.path
    print(f"Comparing every selection method -> {run_dir / 'report.md'}", flush=True)
    params = SelectionParams.from_config(plan.config)
    shard_plan = plan.shard_plan()
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
