"""Run folders: derived names, the lock, the resume command and refusals (no model, no Ray; roles: test_field_roles)."""

import json
import random
import re
import subprocess
import sys

import pyarrow as pa
import pytest
from filelock import FileLock

from conftest import ROOT
from ray_pipeline.cli import resume_command
from ray_pipeline.config import RunConfig
from ray_pipeline.data import load_problems
from ray_pipeline.errors import ConfigError, PipelineError
from ray_pipeline.manifest import Manifest, best_file_name, dataset_name, default_run_id
from ray_pipeline.progress import Progress, duration
from ray_pipeline.run_folder import fingerprint, shards_to_run
from ray_pipeline.shards import check_no_unplanned_files, shard_path
from ray_pipeline.storage import LOCK_NAME, StoragePath


@pytest.fixture
def problems():
    return load_problems("embedded:4", shard_size=2)


def test_default_run_folder_is_the_same_for_the_same_command(problems):
    fp = fingerprint(RunConfig(), problems, "x/y")
    first = default_run_id("HuggingFaceH4/MATH-500", "SmolLM2", fp)
    assert first == default_run_id("HuggingFaceH4/MATH-500", "SmolLM2", fingerprint(RunConfig(), problems, "x/y"))
    assert first.startswith("math500_candidates_SmolLM2_")
    other = fingerprint(RunConfig(temperature=0.7), problems, "x/y")
    assert default_run_id("HuggingFaceH4/MATH-500", "SmolLM2", other) != first
    # Selection and execution settings resume the same folder.
    same = fingerprint(RunConfig(alpha=0.9, num_scorers=3, output_dir="elsewhere"), problems, "x/y")
    assert default_run_id("HuggingFaceH4/MATH-500", "SmolLM2", same) == first


@pytest.mark.parametrize(
    ("dataset", "name"),
    [
        ("HuggingFaceH4/MATH-500", "math500"),
        ("data/math500.jsonl", "math500"),
        ("/x/GSM8K test.parquet", "gsm8ktest"),
        ("openai/gsm8k", "gsm8k"),
        ("./__.json", "data"),
    ],
)
def test_dataset_names(dataset, name):
    assert dataset_name(dataset) == name


def test_each_run_has_its_own_best_file():
    runs = ("a", "b", "d_candidates_M_0123456789", "d_candidates_M_5678abcdef")
    names = {best_file_name("d.jsonl", "M", run) for run in runs}
    assert len(names) == 4
    assert best_file_name("d.jsonl", "M", "d_candidates_M_0123456789") == "d_best_M_0123456789.jsonl"
    assert best_file_name("HuggingFaceH4/MATH-500", "M", "run") == "math500_best_M_run.jsonl"


def readme_best_file(ds: str, model: str, run_id: str, default_hash: str | None) -> str:
    """The best-answer file name as README's "What a run writes" states it (transcribed, not imported)."""
    if default_hash is not None:
        return f"{ds}_best_{model}_{default_hash}.jsonl"
    if "_" in run_id or re.fullmatch(r"[0-9a-f]{10}", run_id) or run_id.startswith("run-"):
        return f"{ds}_best_{model}_run-{run_id.replace('%', '%25').replace('_', '%5F')}.jsonl"
    return f"{ds}_best_{model}_{run_id}.jsonl"


def test_the_readme_describes_every_best_file_name():
    """Run ids of every kind (with `_`, `%`, 10 hex digits, a `run-` prefix, plain, default): the name is the one
    README's rule gives, splits back at its last `_`, and README names the escapes."""
    readme = (ROOT / "README.md").read_text()
    assert "`%5F`" in readme and "`%25`" in readme and "run-{R'}" in readme
    rng = random.Random(0)
    alphabet = "ab_%-9f0"
    ids = ["my_run", "0123456789", "run-x", "plain", "50%", "a_b%5Fc", "run-_", "abcdef0123"]
    ids += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(300)]
    seen = {}
    for run_id in ids:
        name = best_file_name("d.jsonl", "M_x", run_id)
        assert name == readme_best_file("d", "M_x", run_id, None), run_id
        tail = name.removesuffix(".jsonl").rsplit("_", 1)[1]
        back = tail.removeprefix("run-").replace("%5F", "_").replace("%25", "%") if tail.startswith("run-") else tail
        assert back == run_id, (run_id, name)  # the part after the last `_` gives the run id back
        assert seen.setdefault(name, run_id) == run_id  # never one file for two run ids
    default = "d_candidates_M_x_0123456789"
    assert best_file_name("d.jsonl", "M_x", default) == readme_best_file("d", "M_x", default, "0123456789")


def test_sampling_settings_the_backends_refuse_are_refused_before_the_run():
    cases = [
        ({"temperature": 0.0, "num_return_sequences": 2}, "num_return_sequences must be 1 with temperature 0, got 2"),
        ({"temperature": 2.5}, "temperature must be in [0.0, 2.0], got 2.5"),
        ({"top_p": 0.0}, "top_p must be in (0.0, 1.0], got 0.0"),
        ({"top_p": 1.5}, "top_p must be in (0.0, 1.0], got 1.5"),
    ]
    for change, message in cases:
        with pytest.raises(ConfigError) as err:
            RunConfig(**change).validate()
        assert message in str(err.value)
    assert RunConfig(temperature=0.0, num_return_sequences=1).validate()
    assert RunConfig(temperature=2.0, top_p=1e-6).validate()


def test_run_ids_that_leave_the_output_folder_are_refused():
    rng = random.Random(0)
    bad = ["..", ".", "", " ", "../x", "a/b", "a\\b", "/abs", "x/..", "a\nb", "a\x00b"]
    bad += ["".join(rng.choice("ab./\\") for _ in range(6)) for _ in range(50)]
    for run_id in bad:
        if run_id.strip() and run_id not in (".", "..") and not set(run_id) & set("/\\\n\x00"):
            continue  # the random draw made a plain name
        with pytest.raises(ConfigError, match="run_id must be a plain folder name"):
            RunConfig(run_id=run_id).validate()
    for good in ("run", "a.b", "math500_candidates_M_1f2e", "..x", "x y"):
        assert RunConfig(run_id=good).validate().run_id == good


def test_a_corrupt_manifest_is_named(tmp_path):
    bad_plan = {"run_id": "r", "stamp": "s", "model_name": "m", "fingerprint": {}, "shards": {"0": {"rows": "many"}}}
    for data in (b"{broken", b"[]", b'"x"', b'{"run_id": 1}', b"\xff", json.dumps(bad_plan).encode()):
        (tmp_path / "manifest.json").write_bytes(data)
        with pytest.raises(PipelineError, match="is not a readable manifest .* pass --overwrite"):
            Manifest.load(tmp_path)


def test_files_the_plan_does_not_know_are_refused(tmp_path, problems):
    fp = fingerprint(RunConfig(backend="hf"), problems, "x/y")
    manifest = Manifest.plan("run", "s", "M", fp, {0: 4, 1: 4}, 2)
    check_no_unplanned_files(tmp_path, [0, 1])
    (tmp_path / ".shard-00001.parquet.tmp-7").write_bytes(b"")  # a writer's temporary: known
    for stray in ("shard-00002.parquet", "extra.parquet", "notes.txt"):
        (tmp_path / stray).write_bytes(b"x")
        with pytest.raises(PipelineError, match=f"does not know: {stray}"):
            shards_to_run(manifest, tmp_path, [], False)
        (tmp_path / stray).unlink()
    shard_path(tmp_path, 1).write_bytes(b"x")
    assert shards_to_run(manifest, tmp_path, [], False)[0] == [0, 1]


def test_the_run_folder_lock_refuses_a_second_holder(tmp_path):
    folder = StoragePath.parse(tmp_path / "run")
    with folder.lock() as locked:
        assert locked
        with pytest.raises(PipelineError, match="is in use by another job"):
            with folder.lock():
                pass
    with folder.lock():
        pass


def test_a_second_job_on_a_locked_run_folder_is_refused_and_cleans_nothing(tmp_path):
    """The refusal comes before the stale-temporary clean-up: the holder's shard in the making survives."""
    shards = tmp_path / "run" / "shards"
    shards.mkdir(parents=True)
    writing = shards / ".shard-00000.parquet.tmp-4242"
    writing.write_bytes(b"being written")
    with FileLock(str(tmp_path / "run" / LOCK_NAME)):
        proc = subprocess.run(
            [sys.executable, "-m", "jobs.infer", "--dataset", "embedded:2", "--output_dir",
             str(tmp_path), "--run_id", "run", "--backend", "hf"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: run folder") and "is in use by another job" in lines[0]
    assert writing.read_bytes() == b"being written"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--limit", "2"], "prog --limit 2 --run_id R"),
        (["--run_id", "mine", "--overwrite"], "prog --run_id mine"),
        (["--no-resume", "--reprocess_shards", "1,2", "--reprocess_failed", "--seed", "3"], "prog --seed 3 --run_id R"),
        (["--reprocess_shards=1", "--dataset", "my file.jsonl"], "prog --dataset 'my file.jsonl' --run_id R"),
    ],
)
def test_resume_command(argv, expected):
    assert resume_command("prog", argv, "R") == expected


def test_progress_lines_are_bounded_and_end_with_done():
    now = [0.0]
    lines = []
    progress = Progress(10, 2, every_s=10, write=lines.append, clock=lambda: now[0])
    progress.generating(0.0)
    batch = pa.table({"token_count": pa.array([50, 50], pa.int32())})
    for _ in range(10):
        now[0] += 4
        progress.add(batch)
    assert len(lines) == 4  # t=12, 24, 36, and the last batch
    # 14 candidates left at 0.5 per second since the first batch (t=4): ETA 28 s.
    assert lines[0] == "  progress: 3/10 problems scored (30%), 6/20 candidates, 25.0 tokens/s, elapsed 12 s, ETA 28 s"
    assert lines[-1] == "  progress: 10/10 problems scored (100%), 20/20 candidates, 25.0 tokens/s, done in 40 s"
    assert (duration(5), duration(125), duration(7325)) == ("5 s", "2 min 05 s", "2 h 02 min")


def test_every_failure_ends_with_one_error_line(capsys):
    """A refusal, an unforeseen exception and Ctrl-C each end with one line on stderr and their exit status."""
    from ray_pipeline.cli import Interrupted, run_entry

    VERBOSE = "(rerun with --verbose for the traceback)"

    def raises(exc):
        def job():
            raise exc

        return job

    cases = [
        (PipelineError("bad input"), 2, "error: bad input"),
        (RuntimeError("boom\nmore"), 2, f"error: unexpected RuntimeError: boom {VERBOSE}"),
        (ValueError(""), 2, f"error: unexpected ValueError: no message {VERBOSE}"),
        (Interrupted("resume with: x"), 130, "interrupted: resume with: x"),
        (KeyboardInterrupt(), 130, "interrupted: stopped before any work was committed"),
    ]
    for exc, status, line in cases:
        assert run_entry(raises(exc)) == status
        assert capsys.readouterr().err.splitlines() == [line]
    assert run_entry(lambda: None) == 0


def test_the_reducer_names_the_command_that_redoes_a_lost_shard(tmp_path, problems):
    fp = fingerprint(RunConfig(backend="hf", shard_size=2, num_return_sequences=2), problems, "x/y")
    manifest = Manifest.plan("run", "s", "M", fp, {0: 4, 1: 4}, 2)
    manifest.command = "python -m jobs.infer --limit 4 --run_id run"
    manifest.save(tmp_path)
    RunConfig(backend="hf").save(tmp_path / "config.json")
    (tmp_path / "shards").mkdir()
    shard_path(tmp_path / "shards", 0).write_bytes(b"PAR1 truncated")
    for extra, problem in (([], "shards 1 are missing"), (["--allow_partial"], "shards cannot be used: unreadable")):
        proc = subprocess.run(
            [sys.executable, "-m", "jobs.reduce", str(tmp_path), "--method", "baseline", *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert problem in lines[0] and lines[0].endswith(f"(the run resumes with: {manifest.command})")
