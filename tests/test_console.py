"""What a job prints: only the project's own lines by default, everything with --verbose; the progress lines.

"The project's lines" are exactly those PROJECT_LINES describes: each line a job prints on stdout
matches one of them, and a job that succeeds prints nothing on stderr. The end-to-end tests run
real jobs as a user runs them (each its own local Ray, transformers backend) on the embedded set, with
the embedded weights: the quiet run is the suite's one job that runs to its end as `make run` does.
--verbose is checked on the quiet run's own command, rerun on a copy of its finished folder: the job
starts Ray as the quiet one did (its start is what a quiet run hides), with no shard left to do.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import run_job
from ray_pipeline.progress import Progress, duration, pools_text

# Every line a job prints on stdout, as a pattern. A line that matches none is not the project's.
PROJECT_LINES = [
    r"\[1/2\] Generating candidates -> .+/ \(\d+ problems x \d+ candidates, \d+ of \d+ shards to do, backend \w+\)",
    r"  note: .+",
    r"  shard \d+: .+",
    r"  starting \d+ generators? and \d+ scorers?…",
    r"  started \d+ generators? and \d+ scorers? in \d.*",
    r"  shard \d+ committed -> .+\.parquet \(\d+ s(, \d+ error rows)?\)",
    r"  waiting for resources: .+ (of --resource_wait_s [\d.]+|\(no limit\))",
    r"  progress: \d+/\d+ problems scored \(\d+%\), \d+/\d+ candidates, [\d.]+ tokens/s, "
    r"(elapsed .+, ETA .+|done in .+)",
    r"\[2/2\] Evaluating and selecting best answers -> .+\.jsonl",
    r"  backend \w+:( PARTIAL: .+,)? \d+ problems( \(\d+ without a gold answer, not graded\))?, \d+ candidates, "
    r"accuracy \(.+\) ([\d.]+|—), pass@\d+ ([\d.]+|—), generate\+score \d+ s",
    r"  no candidates for .+: .+",
    r"✅ Done! Final results saved to: .+\.jsonl",
    # jobs.main --method all
    r"Comparing every selection method -> .+report\.md",
    r"\d+ problems x \d+ candidates( \(\d+ without a gold answer, not graded\))?, pass@\d+ ([\d.]+|—)",
    r"  \S+ +accuracy ([\d.]+|—) \[([\d.]+|—), ([\d.]+|—)\]  AUROC (—|[\d.]+)",
    r"  \S+ +not available: .+",
    r"Plots: .+\.png",
    r"✅ Done! Comparison saved to: .+report\.md",
]
PROJECT_LINE = re.compile("|".join(f"(?:{p})" for p in PROJECT_LINES))


def foreign_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not PROJECT_LINE.fullmatch(line)]


def job_args(out, *extra: str) -> list[str]:
    return [
        "--dataset", "embedded:4", "--shard_size", "2", "--num_return_sequences", "2", "--max_tokens", "12",
        "--prompt", "chat", "--backend", "hf", "--seed", "1", "--output_dir", str(out), *extra,
    ]  # fmt: skip


@dataclass(frozen=True)
class QuietRun:
    """`jobs.main --method all` as a user runs it: its --output_dir, its flags (less --method) and what it printed."""

    out: Path
    args: list[str]
    proc: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory) -> QuietRun:
    # The suite's one job that runs to its end as `make run` does: its own local Ray, the real embedded weights.
    out = tmp_path_factory.mktemp("quiet") / "out"
    args = job_args(out)
    return QuietRun(out, args, run_job("jobs.main", *args, "--method", "all"))


def test_a_job_prints_only_the_project_lines(quiet_run):
    proc = quiet_run.proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == "", proc.stderr[-3000:]
    assert not foreign_lines(proc.stdout), foreign_lines(proc.stdout)
    lines = proc.stdout.splitlines()
    # The start is its own phase, before any shard and any progress line.
    starting = lines.index("  starting 1 generator and 1 scorer…")
    started = next(i for i, line in enumerate(lines) if line.startswith("  started 1 generator and 1 scorer in "))
    first_shard = next(i for i, line in enumerate(lines) if " committed -> " in line)
    first_progress = next(i for i, line in enumerate(lines) if line.startswith("  progress: "))
    assert starting < started < min(first_shard, first_progress)


def test_verbose_shows_what_a_quiet_run_hides(quiet_run, tmp_path):
    # The quiet run's command with --verbose, on a copy of its folder: it finds the run done, and starts its Ray.
    out = tmp_path / "out"
    shutil.copytree(quiet_run.out, out)
    args = [str(out) if arg == str(quiet_run.out) else arg for arg in quiet_run.args]
    proc = run_job("jobs.infer", *args, "--verbose")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 of 2 shards to do" in proc.stdout, proc.stdout[-3000:]
    # Ray's own lines (its start) are back: the quiet run, which started a Ray as this one did, showed none.
    foreign = foreign_lines(proc.stdout + "\n" + proc.stderr)
    assert any("Started a local Ray instance" in line for line in foreign), foreign


@pytest.mark.fast
def test_the_lines_a_run_would_hide_are_not_the_projects():
    """The noise the quiet console removes, as a GPU run printed it: none of it passes for a project line."""
    noise = [
        "[2026-11-30 10:00:00,000 I 1 1] logging.cc:303: Set ray log level from environment variable "
        "RAY_BACKEND_LOG_LEVEL to 3",
        "2026-11-30 10:00:00,000\tWARNING map_operator.py:937 -- Specifying both num_cpus and num_gpus for map "
        "tasks is experimental, and may result in scheduling or stability issues.",
        "[2026-11-30 10:00:00,000 E 1 1] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches(X))' "
        "has constructor arguments in the object store and max_restarts > 0.",
        "/x/pipeline.py:1: RayDeprecationWarning: `ray_remote_args` is deprecated and will be removed in Ray 2.64.",
        "2026-11-30 10:00:00,000\tINFO worker.py:2038 -- Started a local Ray instance.",
    ]
    assert foreign_lines("\n".join(noise)) == noise


# --------------------------------------------------------------------------------------------- progress


def run_progress(start_s: float, batches: int, every_s: float = 4.0, generated_early_s: float = 0.0):
    """A job whose actors take `start_s` to start, then score a 2-candidate batch (100 tokens) every `every_s`."""
    now = [0.0]
    lines: list[str] = []
    progress = Progress(10, 2, every_s=10, write=lines.append, clock=lambda: now[0], pools=pools_text(1, 1))
    batch = pa.table({"token_count": pa.array([50, 50], pa.int32())})
    now[0] = start_s
    for _ in range(batches):
        now[0] += every_s
        if progress.generating_since is None:
            # The first candidate was generated before its batch was scored.
            progress.generating(now[0] - generated_early_s)
        progress.add(batch)
    return lines


@pytest.mark.fast
@pytest.mark.parametrize("start_s", [0.0, 83.0, 600.0])
def test_rate_and_eta_count_from_the_first_generated_candidate(start_s):
    lines = run_progress(start_s, 10, generated_early_s=4.0)
    assert lines[0] == "  starting 1 generator and 1 scorer…"
    # Generation began at start_s: the first batch, scored 4 s later, was generated from then on.
    assert lines[1] == f"  started 1 generator and 1 scorer in {duration(start_s)}"
    # 100 tokens every 4 s from the first generated candidate on: 25 tokens/s, however long the start took.
    progress = [line for line in lines if line.startswith("  progress: ")]
    assert progress and all(", 25.0 tokens/s, " in line for line in progress), progress
    # Half a candidate a second since generation began, at every line: the ETA is what is left at that rate.
    for line in progress[:-1]:
        scored = int(re.search(r"(\d+)/20 candidates", line).group(1))
        assert line.endswith(f"ETA {duration((20 - scored) / 0.5)}"), line
    assert progress[-1].endswith(f"done in {duration(start_s + 40)}")


@pytest.mark.fast
def test_pools_are_named_in_the_plural_when_there_are_several():
    assert pools_text(1, 1) == "1 generator and 1 scorer"
    assert pools_text(4, 2) == "4 generators and 2 scorers"
