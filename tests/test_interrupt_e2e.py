"""Ctrl-C, the same command resuming, quiet Ray, progress and run-folder refusals, end to end.

Real Ray, the embedded SmolLM2 weights (transformers backend), real Parquet; one run folder
serves every check, so the module starts Ray three times.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_console import foreign_lines

from conftest import ROOT, run_job


def args(out, *extra):
    # No --run_id: the folder name is derived, so the same command must find the same folder.
    return [
        "--dataset", "embedded:8", "--shard_size", "2", "--num_return_sequences", "2",
        "--max_tokens", "16", "--backend", "hf", "--seed", "3", "--score_batch_size", "2", "--output_dir", str(out),
        *extra,
    ]  # fmt: skip


def last_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


def one_line_error(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run stopped with SIGINT (Ctrl-C) once its first shard is committed."""
    out = tmp_path_factory.mktemp("out")
    driver = subprocess.Popen(
        [sys.executable, "-m", "jobs.infer", *args(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and driver.poll() is None and not list(out.glob("*/shards/shard-*.parquet")):
            time.sleep(0.2)
        driver.send_signal(signal.SIGINT)
        stdout, stderr = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    return out, driver.returncode, stdout, stderr


def test_ctrl_c_prints_the_resume_command_and_the_same_command_resumes(interrupted, tmp_path):
    out, returncode, stdout, stderr = interrupted
    (run_dir,) = out.iterdir()
    assert run_dir.name.startswith("embedded8_candidates_SmolLM2-135M-Instruct_")
    assert returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    # Nothing of Ray's on the way out either (the actors the stop kills make Ray push notes to the console).
    assert foreign_lines(stdout) == []
    line = last_line(stderr)
    assert line.startswith("interrupted: committed shards are kept in ")
    resume = line.split("resume with: ", 1)[1]
    assert resume == "python -m jobs.infer " + " ".join(args(out)) + f" --run_id {run_dir.name}"
    assert json.loads((run_dir / "manifest.json").read_text())["command"] == resume
    done = sorted(p.name for p in (run_dir / "shards").glob("shard-*.parquet"))
    assert 1 <= len(done) < 4, "SIGINT must land between the first and the last shard"
    kept = {name: (run_dir / "shards" / name).read_bytes() for name in done}

    # The same command, without --run_id, finds the folder and does only the rest; Ray stays quiet.
    again = run_job("jobs.infer", *args(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{4 - len(done)} of 4 shards to do" in again.stdout and str(run_dir) in again.stdout
    assert {name: (run_dir / "shards" / name).read_bytes() for name in done} == kept
    assert " INFO " not in again.stderr and "Running Dataset" not in again.stderr + again.stdout
    progress = [line for line in again.stdout.splitlines() if line.startswith("  progress: ")]
    todo = 2 * (4 - len(done))
    assert progress and progress[-1].startswith(f"  progress: {todo}/{todo} problems scored (100%)")
    assert "tokens/s" in progress[-1] and "done in" in progress[-1]
    best = out / f"embedded8_best_SmolLM2-135M-Instruct_{run_dir.name.rsplit('_', 1)[1]}.jsonl"
    assert f"Final results saved to: {best}" in again.stdout
    assert len(best.read_text().splitlines()) == 8


def test_run_folder_refusals(interrupted, tmp_path):
    out, *_ = interrupted
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    shards = run_dir / "shards"
    before = {p.name: p.read_bytes() for p in shards.iterdir()}

    # A file the plan does not know is named, by the job and by the reducer.
    stray = shards / "shard-00007.parquet"
    shutil.copy(shards / "shard-00000.parquet", stray)
    assert "does not know: shard-00007.parquet" in one_line_error(run_job("jobs.infer", *args(out)))
    assert "does not know: shard-00007.parquet" in one_line_error(run_job("jobs.reduce", str(run_dir)))
    stray.unlink()

    # Without a manifest the reducer cannot know the plan: its output never claims to be whole.
    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare)
    (bare / "manifest.json").unlink()
    reduced = run_job("jobs.reduce", str(bare), "--method", "baseline")
    assert reduced.returncode == 0, reduced.stderr[-2000:]
    assert "UNVERIFIED" in reduced.stdout
    summary = json.loads(reduced.stdout[reduced.stdout.index("{") : reduced.stdout.rindex("}") + 1])
    assert summary["partial"] is True

    # A corrupt manifest is named; --overwrite then really starts over.
    (run_dir / "manifest.json").write_text("{broken")
    assert "is not a readable manifest" in one_line_error(run_job("jobs.infer", *args(out)))
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before
    over = run_job("jobs.infer", *args(out, "--overwrite"))
    assert over.returncode == 0, over.stderr[-3000:]
    assert "4 of 4 shards to do" in over.stdout
    assert json.loads((run_dir / "manifest.json").read_text())["run_id"] == run_dir.name


def test_a_run_id_outside_the_output_folder_is_refused(tmp_path):
    for run_id in ("../escape", "a/b", ".."):
        proc = run_job("jobs.infer", *args(tmp_path / "out", "--run_id", run_id))
        assert "run_id must be a plain folder name" in one_line_error(proc)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "out").exists()


def test_console_scripts_are_installed():
    bin_dir = Path(sys.executable).parent
    for name in ("bestofn-infer", "bestofn-main", "bestofn-reduce"):
        script = bin_dir / name
        assert script.is_file(), f"{name}: pip install -e . installs it"
        proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, env=os.environ)
        assert proc.returncode == 0 and "--" in proc.stdout
