"""Ctrl-C, the same command resuming, quiet Ray, progress and run-folder refusals, end to end.

The stop-and-resume capability on its real parts: real Ray, the embedded SmolLM2 weights (transformers
backend), real Parquet. `interrupted` is one job stopped with Ctrl-C between two shards (its generator holds
shards 1-3, tests/held_job.py, so the signal comes once shard 0 is committed, at any speed); the same command then
resumes it on the session's Ray. The run-folder refusals work on a copy of the interrupted folder; what
`--overwrite` does with a corrupt manifest is the plan's logic, so it runs on the in-process seam.
"""

import json
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from held_job import HeldJob
from test_console import foreign_lines

from conftest import run_job


def args(out, *extra):
    # No --run_id: the folder name is derived, so the same command must find the same folder. 4 shards of one
    # generator batch each, all in the generator at once (--generate_in_flight 4): Ray Data hands them over in no
    # set order, and the held batches of shards 1-3 must not keep shard 0's out (test_signals.SHARDS says more).
    return [
        "--dataset", "embedded:8", "--shard_size", "2", "--generate_in_flight", "4", "--num_return_sequences", "2",
        "--max_tokens", "16", "--backend", "hf", "--seed", "3", "--score_batch_size", "2", "--output_dir", str(out),
        *extra,
    ]  # fmt: skip


def last_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


def one_line_error(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


@dataclass(frozen=True)
class InterruptedRun:
    """The run `interrupted` stopped: its --output_dir, how the job ended, and an untouched copy of its output
    folder as the job left it (`copy` gives a test its own copy of that)."""

    out: Path
    returncode: int
    stdout: str
    stderr: str
    pristine: Path

    def copy(self, parent: Path) -> Path:
        """A copy of the output folder as the interrupted job left it: the same command on it finds the same run."""
        copy = parent / "out"
        shutil.copytree(self.pristine, copy)
        return copy


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> InterruptedRun:
    """A run stopped with SIGINT (Ctrl-C) once shard 0 is committed, its generator holding the later shards."""
    folder = tmp_path_factory.mktemp("interrupted")
    out = folder / "out"
    job = HeldJob(folder, args(out))
    try:
        job.wait_until_held({0})
        job.driver.send_signal(signal.SIGINT)
        job.driver.wait(timeout=300)
    finally:
        job.kill()
    pristine = folder / "pristine"
    shutil.copytree(out, pristine)
    return InterruptedRun(out, job.driver.returncode, *job.output(), pristine)


def test_ctrl_c_prints_the_resume_command_and_the_same_command_resumes(interrupted, ray_cluster):
    out, stdout, stderr = interrupted.out, interrupted.stdout, interrupted.stderr
    (run_dir,) = out.iterdir()
    assert run_dir.name.startswith("embedded8_candidates_SmolLM2-135M-Instruct_")
    assert interrupted.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    # Nothing of Ray's on the way out either (the actors the stop kills make Ray push notes to the console).
    assert foreign_lines(stdout) == []
    line = last_line(stderr)
    assert line.startswith("interrupted: committed shards are kept in ")
    resume = line.split("resume with: ", 1)[1]
    assert resume == "python -m jobs.infer " + " ".join(args(out)) + f" --run_id {run_dir.name}"
    assert json.loads((run_dir / "manifest.json").read_text())["command"] == resume
    done = sorted(p.name for p in (run_dir / "shards").glob("shard-*.parquet"))
    assert done == ["shard-00000.parquet"], "exactly the shards before the hold are committed"
    kept = {name: (run_dir / "shards" / name).read_bytes() for name in done}

    # The same command, without --run_id, finds the folder and does only the rest; Ray stays quiet.
    again = run_job("jobs.infer", *args(out), cluster=ray_cluster)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{4 - len(done)} of 4 shards to do" in again.stdout and str(run_dir) in again.stdout
    assert {name: (run_dir / "shards" / name).read_bytes() for name in done} == kept
    assert " INFO " not in again.stderr and "Running Dataset" not in again.stderr + again.stdout
    # The console as test_console checks it on the tiny model, here on the real weights: the project's lines only.
    assert again.stderr == "" and foreign_lines(again.stdout) == [], again.stderr[-3000:] + again.stdout[-3000:]
    progress = [line for line in again.stdout.splitlines() if line.startswith("  progress: ")]
    todo = 2 * (4 - len(done))
    assert progress and progress[-1].startswith(f"  progress: {todo}/{todo} problems scored (100%)")
    assert "tokens/s" in progress[-1] and "done in" in progress[-1]
    best = out / f"embedded8_best_SmolLM2-135M-Instruct_{run_dir.name.rsplit('_', 1)[1]}.jsonl"
    assert f"Final results saved to: {best}" in again.stdout
    assert len(best.read_text().splitlines()) == 8


def in_process(main, *argv: str, capsys) -> subprocess.CompletedProcess:
    """What `python -m jobs.X ARGV` exits with and prints, run by its `main` in this process (no Ray)."""
    capsys.readouterr()
    status = main(list(argv))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, status, captured.out, captured.err)


def test_run_folder_refusals(interrupted, tmp_path, capsys):
    from actors import pipeline_actors
    from jobs import reduce
    from ray_pipeline import run
    from ray_pipeline.config import build_parser, config_from_args

    out = interrupted.copy(tmp_path)
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    shards = run_dir / "shards"
    before = {p.name: p.read_bytes() for p in shards.iterdir()}

    # A file the plan does not know is named, by the job and by the reducer.
    stray = shards / "shard-00007.parquet"
    shutil.copy(shards / "shard-00000.parquet", stray)
    assert "does not know: shard-00007.parquet" in one_line_error(run_job("jobs.infer", *args(out)))
    assert "does not know: shard-00007.parquet" in one_line_error(in_process(reduce.main, str(run_dir), capsys=capsys))
    stray.unlink()

    # Without a manifest the reducer cannot know the plan: its output never claims to be whole.
    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare)
    (bare / "manifest.json").unlink()
    reduced = in_process(reduce.main, str(bare), "--method", "baseline", capsys=capsys)
    assert reduced.returncode == 0, reduced.stderr[-2000:]
    assert "UNVERIFIED" in reduced.stdout
    summary = json.loads(reduced.stdout[reduced.stdout.index("{") : reduced.stdout.rindex("}") + 1])
    assert summary["partial"] is True

    # A corrupt manifest is named; --overwrite then really starts over (the plan's logic: in this process, no Ray).
    (run_dir / "manifest.json").write_text("{broken")
    assert "is not a readable manifest" in one_line_error(run_job("jobs.infer", *args(out)))
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before
    argv = args(out, "--overwrite")
    config = config_from_args(build_parser("jobs.infer").parse_args(argv))
    with run.plan(config, "python -m jobs.infer", argv) as plan:
        run.select(plan, run.execute(plan, *pipeline_actors(), in_process=True))
    assert "4 of 4 shards to do" in capsys.readouterr().out
    assert json.loads((run_dir / "manifest.json").read_text())["run_id"] == run_dir.name
    assert sorted(p.name for p in shards.iterdir()) == [f"shard-{i:05d}.parquet" for i in range(4)]


def test_a_run_id_outside_the_output_folder_is_refused(tmp_path):
    for run_id in ("../escape", "a/b", ".."):
        proc = run_job("jobs.infer", *args(tmp_path / "out", "--run_id", run_id))
        assert "run_id must be a plain folder name" in one_line_error(proc)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "out").exists()


def test_console_scripts_are_installed():
    bin_dir = Path(sys.executable).parent
    scripts = {name: bin_dir / name for name in ("bestofn-infer", "bestofn-main", "bestofn-reduce")}
    for name, script in scripts.items():
        assert script.is_file(), f"{name}: pip install -e . installs it"
    # The three at once: each is its own process, and each only imports its job and prints its help.
    helps = {
        name: subprocess.Popen([str(script), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, script in scripts.items()
    }
    for name, proc in helps.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "--" in stdout, f"{name}: {stderr[-2000:]}"
