"""Generate N candidates per problem, score them, and write the best answers.

python -m jobs.infer --dataset problems.jsonl --limit 20   (or: bestofn-infer ...)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_pipeline.cli import Interrupted, program, quiet_ray, quiet_ray_warnings, resume_command, run_entry
from ray_pipeline.config import RunConfig, build_parser, config_from_args
from ray_pipeline.data import load_problems
from ray_pipeline.errors import PipelineError
from ray_pipeline.manifest import (
    COMMITTED,
    FAILED,
    PENDING,
    Manifest,
    best_file_name,
    default_run_id,
    fingerprint,
    shards_to_run,
)
from ray_pipeline.manifest import fingerprint_hash as fp_hash
from ray_pipeline.model import check_hub_model, check_tensor_parallel, model_name, resolve_model
from ray_pipeline.progress import Progress
from ray_pipeline.reduce import reduce_run, summary_json
from ray_pipeline.report import COMPARISON_FILES
from ray_pipeline.selection import SelectionParams, get_method
from ray_pipeline.shards import check_no_unplanned_files, expected_rows, remove_stale_temporaries
from ray_pipeline.storage import StorageError, StoragePath


def run(
    config: RunConfig,
    command: str | None = None,
    argv: list[str] | None = None,
    after: Callable[[StoragePath], object] | None = None,
) -> dict:
    """The whole job: plan, generate and score the shards not yet done, then reduce.

    `command` and `argv` (how the user started the job) make the resume command in hints. `after`
    runs on the run folder once the best answers are written, still under the folder's lock.
    """
    get_method(config.method)
    problems = load_problems(
        config.dataset, split=config.dataset_split, limit=config.limit, shard_size=config.shard_size
    )
    # Resolving here fails fast on a bad path and materializes a GGUF once before actors start.
    resolved = resolve_model(config.model_path)
    if resolved == config.model_path and not Path(resolved).exists():
        check_hub_model(resolved)
    check_tensor_parallel(resolved, config.tensor_parallel_size)
    name = model_name(config.model_path)
    output_dir = StoragePath.parse(config.output_dir)
    # The backend as given ('auto' included): the same command names the same folder on any cluster.
    run_id = config.run_id or default_run_id(config.dataset, name, fingerprint(config, problems, resolved))
    run_dir = output_dir / run_id
    resume = resume_command(command or "python -m jobs.infer", argv if argv is not None else [], run_id)
    _make_folder(run_dir)
    with run_dir.lock() as locked:
        if not locked:
            print(f"  note: {run_dir} is on an object store, which has no lock: run one job per run folder", flush=True)
        try:
            report = _run_locked(config, problems, resolved, name, output_dir, run_dir, resume)
            if after is not None:
                after(run_dir)
            return report
        except KeyboardInterrupt:
            raise Interrupted(f"committed shards are kept in {run_dir}; resume with: {resume}") from None


def _run_locked(
    config: RunConfig,
    problems: pa.Table,
    resolved: str,
    name: str,
    output_dir: StoragePath,
    run_dir: StoragePath,
    resume: str,
) -> dict:
    shards_dir = run_dir / "shards"
    # A corrupt manifest must not stop --overwrite from starting over.
    manifest = None if config.overwrite else Manifest.load(run_dir)
    if manifest is None and shards_dir.files() and not config.overwrite:
        raise PipelineError(f"{run_dir} holds shards but no manifest: pass --overwrite or a new --run_id")
    if manifest is not None and not config.resume:
        raise PipelineError(f"run folder {run_dir} exists: drop --no-resume to resume it, or pass --overwrite")
    if manifest is not None:
        # Before Ray starts: everything but the backend, which needs the cluster to resolve 'auto'.
        manifest.check_same_run(fingerprint(config, problems, resolved), run_dir, ignore=("backend",))
        shards_to_run(manifest, shards_dir, config.reprocess_shard_ids(), config.reprocess_failed)

    from actors.generator import GeneratorActor
    from actors.scorer import ScorerActor
    from ray_pipeline.pipeline import init_ray, resolve_execution, run_stages

    init_ray(config)
    quiet_ray_warnings(config.verbose)
    resolved_config = resolve_execution(config, problems.num_rows)
    # Only the backend is taken resolved: other cluster-derived defaults do not change the shards.
    fp = fingerprint(dataclasses.replace(config, backend=resolved_config.backend), problems, resolved)
    config = resolved_config
    n = config.num_return_sequences
    if config.overwrite:
        shards_dir.delete_contents()
        # What the old shards produced goes with them: a report beside new shards would describe a run that is gone.
        for stale in [run_dir / f for f in ("summary.json", *COMPARISON_FILES)] + run_dir.files("best_*.jsonl"):
            if stale.is_file():
                stale.delete()
    if manifest is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d_%H%M%S")
        manifest = Manifest.plan(run_dir.name, stamp, name, fp, expected_rows(problems, n), n)
    else:
        manifest.check_same_run(fp, run_dir)
    best = output_dir / best_file_name(config.dataset, manifest.model_name, run_dir.name)
    shards_dir.mkdir()
    # Safe: this job holds the run folder's lock, so no other writer's temporary is in the making.
    remove_stale_temporaries(shards_dir)
    todo, notes = shards_to_run(manifest, shards_dir, config.reprocess_shard_ids(), config.reprocess_failed)
    for shard_id in todo:
        manifest.set_status(shard_id, PENDING)
    manifest.command = resume
    manifest.save(run_dir)
    config.save(run_dir / "config.json")

    num_shards = len(manifest.shards)
    print(
        f"[1/2] Generating candidates -> {run_dir}/ ({problems.num_rows} problems x {n} candidates, "
        f"{len(todo)} of {num_shards} shards to do, backend {config.backend})",
        flush=True,
    )
    for note in notes:
        print(f"  {note}", flush=True)
    started = time.monotonic()

    def committed(shard_id: int, path: StoragePath) -> None:
        with path.open_input_file() as source:
            errors = sum(e is not None for e in pq.read_table(source, columns=["error"]).column("error").to_pylist())
        manifest.set_status(shard_id, FAILED if errors else COMMITTED)
        manifest.save(run_dir)
        failed = f", {errors} error rows" if errors else ""
        print(f"  shard {shard_id} committed -> {path} ({time.monotonic() - started:.0f} s{failed})", flush=True)

    if todo:
        wanted = pc.is_in(problems.column("shard_id"), pa.array(todo, pa.int32()))
        todo_problems = problems.filter(wanted)
        progress = Progress(todo_problems.num_rows, n)
        try:
            run_stages(
                config, todo_problems, shards_dir, GeneratorActor, ScorerActor, committed, fp_hash(fp), progress.add
            )
        except PipelineError as exc:
            raise PipelineError(f"{exc} (committed shards are kept; resume with: {resume})") from None
    generate_s = time.monotonic() - started

    print(f"[2/2] Evaluating and selecting best answers -> {best}", flush=True)
    check_no_unplanned_files(shards_dir, list(range(num_shards)))
    try:
        summary = reduce_run(
            shards_dir,
            best,
            method=config.method,
            params=SelectionParams.from_config(config),
            expected_shards=list(range(num_shards)),
            allow_partial=config.allow_partial,
        )
    except PipelineError as exc:
        # A shard lost or damaged since it was committed: the resume command redoes it.
        raise PipelineError(f"{exc} (resume with: {resume})") from None
    report = json.loads(summary_json(summary)) | {
        # The fingerprint check guarantees every shard was made by this (resolved) backend.
        "backend": config.backend,
        "generate_and_score_s": generate_s,
        "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    partial = f" PARTIAL: shards {summary.missing_shards} missing," if summary.partial else ""
    print(
        f"  backend {report['backend']}:{partial} {summary.problems} problems, {summary.candidates} candidates, "
        f"accuracy ({config.method}) {summary.accuracy:.3f}, pass@{n} {summary.pass_at_n:.3f}, "
        f"generate+score {generate_s:.0f} s",
        flush=True,
    )
    for problem_id, error in summary.error_problems.items():
        print(f"  no candidates for {problem_id}: {error}", flush=True)
    print(f"✅ Done! Final results saved to: {best}", flush=True)
    return report


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(__doc__.strip().splitlines()[0])
    args = parser.parse_args(argv)
    quiet_ray(args.verbose)
    return run_entry(lambda: run(config_from_args(args), program("jobs.infer"), argv), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
