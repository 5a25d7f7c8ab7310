"""A run folder: its fingerprint (what its shards depend on), its manifest (the plan and each shard's status), the
shard check a resume and the reducer run on it, the shards a (re)run redoes, and its lock. `run.plan` and
`run.execute` ask it; nothing else reads or writes a run folder's manifest.

    folder = RunFolder.for_run(config, problems, model, model_name)
    folder.make()
    with folder.lock():
        folder.plan(resume_command)             # folder.todo, folder.notes: the shards to do, and why
        folder.prepare(job_config, stale)       # once the cluster resolved the config
        ... folder.commit(shard_id, error_rows) as each shard is written
    folder.shard_plan()                         # what the reducer checks the shards against

`run.plan` yields the folder, planned, as the run's plan: `run.execute`, `run.select` and `run.compare` read it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import pyarrow as pa

from ray_pipeline.config import DEVICE_RESOLVED_FIELDS, RunConfig
from ray_pipeline.config.stored import resume_differences, stored_values
from ray_pipeline.errors import PipelineError
from ray_pipeline.manifest import (
    COMMITTED,
    FAILED,
    PENDING,
    Manifest,
    best_file_name,
    content_entries,
    default_run_id,
)
from ray_pipeline.shards import (
    FOREIGN_SHARD,
    NOT_A_FILE,
    PlannedShard,
    check_no_unplanned_files,
    check_shard,
    remove_stale_temporaries,
    shard_path,
)
from ray_pipeline.storage import Location, StorageError, StoragePath

if TYPE_CHECKING:
    # Only the annotation: graded_run reads the shards through this module's ShardPlan.
    from ray_pipeline.graded_run import GradedRun

# What a finished run leaves beside its shards: an --overwrite removes them with the shards (report.COMPARISON_FILES
# adds the comparison's files).
RESULT_FILES = ("summary.json",)


def fingerprint(config: RunConfig, problems: pa.Table, resolved_model: str) -> dict:
    """Everything that changes a run's shards: the configuration's stored values (`config.stored`: every samples
    and scores field where it changes values), the data set's content, the model's identity, the prompt template and
    the code version. A resume with a different one is refused, naming what differs (`check_same_run`).

    Settings left to the cluster stay as given (generate_batch_size None); `RunFolder.prepare` takes the
    DEVICE_RESOLVED_FIELDS resolved, since 'auto' means another backend or scorer pass on another cluster.
    """
    return stored_values(config) | content_entries(problems, resolved_model, config.prompt)


def check_same_run(made_with: dict, fp: dict, run_dir: Location, config: RunConfig) -> None:
    """Refuse to resume the folder `run_dir`, made with fingerprint `made_with`, with another configuration
    (`config`, whose fingerprint is `fp`), naming what differs."""
    changed = "; ".join(resume_differences(made_with, fp, config))
    if changed:
        raise PipelineError(
            f"run folder {run_dir} was made with another configuration ({changed}): "
            "rerun with the same settings, a new --run_id, or --overwrite"
        )


@dataclass(frozen=True)
class ShardPlan:
    """The shards a run folder's manifest plans, and the fingerprint they must carry: what the shard check needs."""

    shards: dict[int, PlannedShard]
    fingerprint: str

    @classmethod
    def of(cls, manifest) -> ShardPlan:
        return cls(manifest.planned_shards(), manifest.fingerprint_hash)

    @property
    def shard_ids(self) -> list[int]:
        return sorted(self.shards)


class ShardFault(PipelineError):
    """A planned shard that the reducer cannot trust (another configuration, another schema, wrong keys …)."""

    def __init__(self, shard_id: int, fault: str, message: str):
        super().__init__(message)
        self.shard_id, self.fault = shard_id, fault


def check_planned_shards(shards_dir: StoragePath, plan: ShardPlan, allow_partial: bool) -> list[int]:
    """The shard check of the resume (`shards.check_shard`) on every planned shard; returns the missing ones.

    A missing shard is refused unless `allow_partial`; any other fault is refused, naming the shard.
    """
    faults = {s: check_shard(shard_path(shards_dir, s), shard, plan.fingerprint) for s, shard in plan.shards.items()}
    missing = sorted(s for s, fault in faults.items() if fault == "missing")
    if missing and not allow_partial:
        raise PipelineError(
            f"shards {', '.join(map(str, missing))} are missing from {shards_dir}: "
            "rerun the job to finish them, or pass --allow_partial"
        )
    broken = {s: fault for s, fault in sorted(faults.items()) if fault and fault != "missing"}
    if broken:
        shard_id, fault = next(iter(broken.items()))
        more = f" (and {len(broken) - 1} more shards)" if len(broken) > 1 else ""
        raise ShardFault(shard_id, fault, f"shard {shard_id} in {shards_dir} cannot be used: {fault}{more}")
    return missing


def shard_faults(manifest: Manifest, shards_dir: Location) -> dict[int, str | None]:
    """Why each planned shard in `shards_dir` cannot be trusted ("missing", "unreadable ..."), or None when it can."""
    shards_dir = StoragePath.parse(shards_dir)
    check_no_unplanned_files(shards_dir, sorted(manifest.expected_rows()))
    return {
        shard_id: check_shard(shard_path(shards_dir, shard_id), planned, manifest.fingerprint_hash)
        for shard_id, planned in sorted(manifest.planned_shards().items())
    }


def choose_shards(
    manifest: Manifest,
    faults: dict[int, str | None],
    shards_dir: Location,
    reprocess: list[int],
    reprocess_failed: bool,
) -> tuple[list[int], list[str]]:
    """The shards a (re)run must produce, given each one's fault in `shards_dir` (shard_faults; a new run's are all
    "missing"), and a note for each committed one it redoes or distrusts."""
    unknown = sorted(set(reprocess) - set(manifest.expected_rows()))
    if unknown:
        raise PipelineError(f"--reprocess_shards names shards {unknown} that the plan does not have")
    todo, notes = [], []
    for shard_id in sorted(manifest.expected_rows()):
        fault = faults[shard_id]
        if fault and fault.startswith(NOT_A_FILE):
            raise PipelineError(f"{shard_path(StoragePath.parse(shards_dir), shard_id)} is {fault}")
        if shard_id in reprocess:
            todo.append(shard_id)
            notes.append(f"shard {shard_id}: redo (--reprocess_shards)")
        elif fault and fault.startswith(FOREIGN_SHARD):
            raise PipelineError(
                f"shard {shard_id} in {shards_dir} was {fault}: remove it, or pass --reprocess_shards {shard_id}"
            )
        elif fault:
            todo.append(shard_id)
            if fault != "missing":
                notes.append(f"shard {shard_id}: {fault}: redo")
        elif reprocess_failed and manifest.shards[str(shard_id)]["status"] == FAILED:
            todo.append(shard_id)
            notes.append(f"shard {shard_id}: redo (--reprocess_failed)")
    return todo, notes


def shards_to_run(
    manifest: Manifest, shards_dir: Location, reprocess: list[int], reprocess_failed: bool
) -> tuple[list[int], list[str]]:
    """The shards a (re)run must produce, and a note for each committed one it redoes or distrusts."""
    faults = shard_faults(manifest, shards_dir)
    return choose_shards(manifest, faults, shards_dir, reprocess, reprocess_failed)


@dataclass
class RunFolder:
    """One run folder: where its shards go, its manifest once planned or loaded, its lock; for a run (`for_run`,
    `plan`), what the run will do."""

    path: StoragePath
    manifest: Manifest | None = None
    # True when this job plans the manifest (its fingerprint gets the resolved device fields); False when loaded.
    new: bool = False
    # A run's folder (`for_run`): the configuration as given, its problems, the model's short name, and the
    # configuration's fingerprint with the part of it that is no setting (`content_entries`: data, model files,
    # prompt template, code version; read once, `prepare` reuses it); `plan` adds the best-answer file.
    config: RunConfig | None = None
    problems: pa.Table | None = None
    model_name: str | None = None
    contents: dict | None = None
    fingerprint: dict | None = None
    best: StoragePath | None = None
    # Once planned: the command that resumes the run (for every hint that names it), the shards to do, and one line
    # per committed shard that is redone or distrusted, and why.
    resume_command: str = ""
    todo: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # The shards checked, graded and grouped by `run.select`, which `run.compare` reuses.
    graded: GradedRun | None = None

    @classmethod
    def for_run(cls, config: RunConfig, problems: pa.Table, model: str, model_name: str) -> RunFolder:
        """The folder a run with this configuration writes: --run_id, else named after what the run computes (its
        fingerprint, with the backend as given, 'auto' included: the same command names the same folder on any
        cluster)."""
        contents = content_entries(problems, model, config.prompt)
        fp = stored_values(config) | contents
        run_id = config.run_id or default_run_id(config.dataset, model_name, fp)
        if run_id.lower().endswith(".jsonl"):
            # Best-answer files live beside the run folders: a folder named like one could take another run's name.
            raise PipelineError(
                f"run_id {run_id!r} ends in .jsonl, as the best-answer files beside it do: pass another"
            )
        path = StoragePath.parse(config.output_dir) / run_id
        return cls(path, config=config, problems=problems, model_name=model_name, contents=contents, fingerprint=fp)

    @property
    def shards_dir(self) -> StoragePath:
        return self.path / "shards"

    @property
    def shard_ids(self) -> list[int]:
        """Every planned shard: the reducer refuses a run that lacks one."""
        return sorted(self.manifest.expected_rows())

    def make(self) -> None:
        """Create the run folder and prove it writable before any work starts."""
        try:
            self.path.mkdir()
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.delete()
        except StorageError as exc:
            what = "pass a writable --output_dir" if self.path.is_local else f"{exc.hint}, or pass another --output_dir"
            raise PipelineError(f"cannot write the run folder {self.path}: {exc.reason}; {what}") from None

    @contextmanager
    def lock(self, **kwargs) -> Iterator[bool]:
        """The folder's lock for the block (`StoragePath.lock`: True when held; an object store has none)."""
        with self.path.lock(**kwargs) as locked:
            yield locked

    def plan(self, resume_command: str) -> None:
        """Load the manifest, or plan a new one (`new`), and say which shards to do (`todo`) and why each committed
        one is redone (`notes`); `resume_command` is the command that resumes the run. A folder made by another
        configuration, a hand-edited plan, shards without a manifest or --no-resume on an existing run are refused.
        """
        config, run_dir, shards_dir, problems = self.config, self.path, self.shards_dir, self.problems
        fp = self.fingerprint
        # A corrupt manifest must not stop --overwrite from starting over.
        manifest = None if config.overwrite else Manifest.load(run_dir)
        if manifest is None and shards_dir.files() and not config.overwrite:
            raise PipelineError(f"{run_dir} holds shards but no manifest: pass --overwrite or a new --run_id")
        if manifest is not None and not config.resume:
            raise PipelineError(f"run folder {run_dir} exists: drop --no-resume to resume it, or pass --overwrite")
        self.new = manifest is None
        if manifest is None:
            # Every shard is to do: the folder has none, or --overwrite removes them (`prepare`, once Ray is up).
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d_%H%M%S")
            n = config.num_return_sequences
            manifest = Manifest.plan(run_dir.name, stamp, self.model_name, fp, problems, n)
            faults = dict.fromkeys(manifest.expected_rows(), "missing")
        else:
            # Everything but what the cluster resolves ('auto' backend, scorer passes; `prepare` checks those).
            check_same_run(manifest.fingerprint, fp, run_dir, config)
            manifest.check_plan(run_dir, problems, fix="restore it, or pass --overwrite to start the run folder over")
            faults = shard_faults(manifest, shards_dir)
        self.manifest = manifest
        best = best_file_name(config.dataset, manifest.model_name, run_dir.name)
        self.best = StoragePath.parse(config.output_dir) / best
        self.resume_command = resume_command
        self.todo, self.notes = choose_shards(
            manifest, faults, shards_dir, config.reprocess_shard_ids(), config.reprocess_failed
        )

    def prepare(self, config: RunConfig, stale: tuple[str, ...]) -> None:
        """Before the shards to do are written: take the fingerprint of the configuration as given with what the
        cluster decided (`config`, the one the job runs) for its DEVICE_RESOLVED_FIELDS, for a new run, or check it
        against the folder's; clear the folder on --overwrite (its shards and `stale` result files), drop
        temporaries, mark the shards to do pending and save the manifest, with the resume command, and `config`."""
        manifest, run_dir, shards_dir = self.manifest, self.path, self.shards_dir
        # Only these are taken resolved: other cluster-derived defaults do not change the shards.
        resolved = dataclasses.replace(self.config, **{name: getattr(config, name) for name in DEVICE_RESOLVED_FIELDS})
        fp = stored_values(resolved) | self.contents
        if self.new:
            manifest.fingerprint = fp
        else:
            check_same_run(manifest.fingerprint, fp, run_dir, resolved)
        if config.overwrite:
            shards_dir.delete_contents()
            # What the old shards produced goes with them: a report beside new shards would describe a run that is
            # gone.
            for old in [run_dir / f for f in (*RESULT_FILES, *stale)] + run_dir.files("best_*.jsonl"):
                if old.is_file():
                    old.delete()
        shards_dir.mkdir()
        # Safe: this job holds the run folder's lock, so no other writer's temporary is in the making.
        remove_stale_temporaries(shards_dir)
        for shard_id in self.todo:
            manifest.set_status(shard_id, PENDING)
        manifest.command = self.resume_command
        manifest.save(run_dir)
        config.save(run_dir / "config.json")

    def commit(self, shard_id: int, error_rows: int) -> None:
        """A shard was written: committed, or failed when rows of it hold errors."""
        self.manifest.set_status(shard_id, FAILED if error_rows else COMMITTED)
        self.manifest.save(self.path)

    def shard_plan(self) -> ShardPlan:
        return ShardPlan.of(self.manifest)

    def check_no_unplanned_files(self) -> None:
        check_no_unplanned_files(self.shards_dir, self.shard_ids)

    def load_for_reduce(self, fix: str) -> ShardPlan | None:
        """For the reducer of a finished folder: its manifest, checked, as the plan its shards are checked against;
        None for a folder without one (its output is then unverified)."""
        self.manifest = Manifest.load(self.path, fix=fix)
        if self.manifest is None:
            return None
        self.manifest.check_plan(self.path, None, fix=f"restore it, or {fix}")
        # The plan says which shards must exist and what each must hold: the resume's shard check runs on each.
        self.check_no_unplanned_files()
        return self.shard_plan()
