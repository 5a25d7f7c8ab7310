"""Resume, kill and bad-input tests (transformers backend).

`finished` is one real job (real Ray, the real SmolLM2 weights, real Parquet) that the refused jobs run against
and that a driver killed with SIGKILL resumes to, bit for bit. What a rerun plans and redoes (lost, truncated and
forced shards, --overwrite) and error rows are plan and resume logic: they run on the in-process seam
(run.execute(..., in_process=True)) with the tiny model. Kills land at a known point: tests/held_job.py holds the
generator's batches from a given shard on.
"""

import contextlib
import hashlib
import json
import re
import shutil
import signal
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from held_job import HeldJob

from conftest import run_in_process, run_job
from ray_pipeline.problem_set import embedded_records
from ray_pipeline.shards import FINGERPRINT_KEY, shard_path

RAY_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING) ")
# The title Ray gives a generator actor's process (Ray Data's map worker around the GeneratorActor class).
GENERATOR_TITLE = "MapWorker(MapBatches(GeneratorActor))"


def job_args(out, run_id, limit=8, max_tokens=24, *extra):
    return [
        "--dataset", "embedded:8", "--limit", str(limit), "--num_return_sequences", "2",
        "--max_tokens", str(max_tokens), "--shard_size", "2", "--backend", "hf", "--seed", "5",
        "--score_batch_size", "4", "--output_dir", str(out), "--run_id", run_id, *extra,
    ]  # fmt: skip


def tiny_args(out, run_id, tiny_model, *extra):
    """A run of 4 problems (2 shards) on the tiny model."""
    return job_args(out, run_id, 4, 24, "--model_path", tiny_model, *extra)


def run_ok(*args, cluster=None):
    proc = run_job("jobs.infer", *args, cluster=cluster)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def best_file(stdout: str) -> Path:
    return Path(stdout.split("Final results saved to: ")[1].splitlines()[0].strip())


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.parquet"))}


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def same_answers(a: list[dict], b: list[dict]) -> None:
    """Equal lines, scores included: a candidate's scores do not depend on its scorer batch."""
    assert a == b


def same_shards(a: Path, b: Path) -> None:
    """Every shard of `a` equals `b`'s in every column, per-token scores included, bit for bit."""
    names = sorted(f.name for f in a.glob("shard-*.parquet"))
    assert names == sorted(f.name for f in b.glob("shard-*.parquet"))
    for name in names:
        assert pq.read_table(a / name).equals(pq.read_table(b / name)), name


def keys(shards: Path) -> list[tuple[str, int]]:
    return [
        (pid, k)
        for f in sorted(shards.glob("*.parquet"))
        for pid, k in zip(*pq.read_table(f, columns=["problem_id", "candidate_index"]).to_pydict().values())
    ]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, ray_cluster):
    """A finished run of 8 problems in 4 shards on the real weights, on the session's Ray: the refused jobs run
    against it, and the killed driver's run resumes to it."""
    out = tmp_path_factory.mktemp("finished")
    proc = run_ok(*job_args(out, "run"), cluster=ray_cluster)
    return out, proc


def test_rerun_redoes_nothing_and_a_lost_shard_only(tiny_model, tmp_path):
    first_out = tmp_path / "first"
    first = run_in_process("jobs.infer", *tiny_args(first_out, "run", tiny_model))
    run_dir = tmp_path / "run"
    shutil.copytree(first_out / "run", run_dir)
    before = digests(run_dir / "shards")
    again = run_in_process("jobs.infer", *tiny_args(tmp_path, "run", tiny_model))
    assert "0 of 2 shards to do" in again
    assert digests(run_dir / "shards") == before
    same_answers(records(best_file(first)), records(best_file(again)))

    shard_path(run_dir / "shards", 1).unlink()
    data = shard_path(run_dir / "shards", 0).read_bytes()
    shard_path(run_dir / "shards", 0).write_bytes(data[: len(data) // 3])  # truncated: footer unreadable
    # Without --self_eval a candidate's scores do not depend on its scorer batch: another --score_batch_size resumes,
    # and the shards it writes carry the folder's fingerprint (the runs below trust them).
    redone = run_in_process("jobs.infer", *tiny_args(tmp_path, "run", tiny_model, "--score_batch_size", "2"))
    assert "2 of 2 shards to do" in redone and "shard 0: unreadable" in redone
    assert sorted(keys(run_dir / "shards")) == sorted(set(keys(first_out / "run" / "shards")))
    same_answers(records(best_file(first)), records(best_file(redone)))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {s["status"] for s in manifest["shards"].values()} == {"committed"}

    forced = run_in_process("jobs.infer", *tiny_args(tmp_path, "run", tiny_model, "--reprocess_shards", "1"))
    assert "1 of 2 shards to do" in forced and "shard 1: redo (--reprocess_shards)" in forced
    stale = b"from the run --overwrite replaces"
    for old_output in ("report.md", "debug.jsonl", "accuracy_vs_n.png", "best_borda.jsonl"):
        (run_dir / old_output).write_bytes(stale)
    other = run_in_process("jobs.infer", *tiny_args(tmp_path, "run", tiny_model, "--temperature", "0.5", "--overwrite"))
    assert "2 of 2 shards to do" in other
    assert not [f.name for f in run_dir.iterdir() if f.is_file() and f.read_bytes() == stale]
    assert json.loads((run_dir / "manifest.json").read_text())["fingerprint"]["temperature"] == 0.5


def one_line_error(proc):
    """The job's own output on stderr is one `error:` line; Ray's start-up log lines are not counted."""
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not RAY_LOG.match(line)]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


def bad_data_files(tmp_path):
    no_problem = tmp_path / "no_problem.jsonl"
    no_problem.write_text('{"question": "1+1"}\n')
    empty = tmp_path / "empty_problem.jsonl"
    empty.write_text('{"problem": ""}\n')
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"problem": "caf\xe9"}\n')
    no_tokenizer = tmp_path / "model"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text('{"model_type": "llama"}')
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    return {
        "model": ["--model_path", "/nonexistent/model"],
        "tokenizer": ["--model_path", str(no_tokenizer)],
        "data": ["--dataset", str(tmp_path / "missing.jsonl")],
        "column": ["--dataset", str(no_problem)],
        "empty": ["--dataset", str(empty)],
        "utf8": ["--dataset", str(latin1)],
        "n": ["--num_return_sequences", "0"],
        "temperature": ["--temperature", "-1"],
        "alpha": ["--alpha", "1.5"],
        "max_tokens": ["--max_tokens", "0"],
        "method": ["--method", "magic"],
        "ray": ["--ray_address", "127.0.0.1:1"],
        "config": ["--temperature", "0.7"],
        "unwritable": ["--output_dir", str(blocker / "sub")],
    }


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("model", "model path /nonexistent/model does not exist"),
        ("tokenizer", "has no tokenizer"),
        ("data", "missing.jsonl does not exist"),
        ("column", "row 1 has no 'problem' field"),
        ("empty", "row 1: 'problem' is empty"),
        ("utf8", "is not UTF-8 text"),
        ("n", "num_return_sequences must be in [1, 1024], got 0"),
        ("temperature", "temperature must be in [0.0, 2.0], got -1.0"),
        ("alpha", "alpha must be in [0.0, 1.0], got 1.5"),
        ("max_tokens", "max_tokens must be in [1, 1000000], got 0"),
        ("method", "method must be one of"),
        ("ray", "cannot reach the Ray cluster at 127.0.0.1:1"),
        ("config", "was made with another configuration (temperature 0.1 -> 0.7)"),
        ("unwritable", "cannot write the run folder"),
    ],
)
def test_bad_input_is_refused_and_finished_shards_are_untouched(finished, tmp_path, case, message):
    out, _ = finished
    before = digests(out / "run" / "shards")
    base = job_args(out, "run")
    override = bad_data_files(tmp_path)[case]
    args = base + override  # argparse: the last occurrence of a flag wins
    proc = run_job("jobs.infer", *args, timeout=300)
    assert message in one_line_error(proc)
    assert digests(out / "run" / "shards") == before


def test_truncated_and_foreign_shards_are_named(finished, tmp_path):
    out, _ = finished
    run_dir = tmp_path / "run"
    shutil.copytree(out / "run", run_dir)
    shard = shard_path(run_dir / "shards", 1)
    table = pq.read_table(shard)
    pq.write_table(table.replace_schema_metadata({FINGERPRINT_KEY: b"0123456789abcdef"}), shard)
    foreign = run_job("jobs.infer", *job_args(tmp_path, "run"))
    assert "shard 1 in" in one_line_error(foreign) and "written by another configuration" in foreign.stderr
    data = shard.read_bytes()
    shard.write_bytes(data[:100])
    truncated = run_job("jobs.reduce", str(run_dir), "--method", "baseline")
    assert f"shard 1 in {run_dir / 'shards'} cannot be used: unreadable" in one_line_error(truncated)
    assert shard_path(run_dir / "shards", 0).is_file()


def wait_for(predicate, timeout=600, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_driver_resumes_to_the_uninterrupted_result(finished, ray_cluster, tmp_path):
    out, whole = finished
    # Every generator batch in the generator at once, so the held ones wait beside the others (tests/held_job.py).
    killed_args = job_args(tmp_path, "killed", 8, 24, "--generate_in_flight", "4")
    # The generator holds shard 3's batch for good: the driver dies with shards 0 to 2 committed and shard 3 in
    # flight. Its own session: the SIGKILL of its group takes the driver and the local Ray it started, as a crash.
    job = HeldJob(tmp_path, killed_args, hold_from=3)
    try:
        job.wait_until_held({0, 1, 2})
    finally:
        job.kill()
    assert job.driver.returncode == -signal.SIGKILL, job.output()[1][-3000:]
    shards = tmp_path / "killed" / "shards"
    done_before = sorted(f.name for f in shards.glob("shard-*.parquet"))
    assert done_before == [shard_path(shards, s).name for s in (0, 1, 2)], done_before
    resumed = run_ok(*killed_args, cluster=ray_cluster)
    assert "1 of 4 shards to do" in resumed.stdout
    assert keys(shards) == keys(out / "run" / "shards")
    assert len(set(keys(shards))) == len(keys(shards)) == 16
    # The redone shards hold exactly what the uninterrupted run wrote: the same samples and the same scores.
    same_shards(out / "run" / "shards", shards)
    same_answers(records(best_file(whole.stdout)), records(best_file(resumed.stdout)))


def generator_actors(driver_pid: int) -> list[psutil.Process]:
    """The generator actors' processes among the driver's descendants (its local Ray's workers), none elsewhere."""
    found = []
    for process in psutil.Process(driver_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if GENERATOR_TITLE in " ".join(process.cmdline()):
                found.append(process)
    return found


def test_killed_actor_is_restarted_and_the_run_completes(tiny_model, tmp_path):
    """A generator actor killed with a batch in its hands is restarted by Ray, the batch is done on its successor,
    once, and the run exits 0.

    Ray's own note on the retry (`… so the task will be retried`) is not asserted: whether Ray prints it depends on
    whether the failed call or the actor's death reaches the driver first (it was missing in one of three runs here,
    with the batch retried all the same).
    """
    args = job_args(tmp_path, "run", 8, 24, "--model_path", tiny_model, "--generate_in_flight", "4")
    # The generator holds shard 2's batch until it is let through: once shards 0 and 1 are committed and it holds
    # that batch, the kill lands with a batch in its hands, and the run cannot end before it.
    job = HeldJob(tmp_path, args, hold_from=2, release=tmp_path / "release")
    shards = tmp_path / "run" / "shards"
    try:
        job.wait_until_held({0, 1})
        victims = generator_actors(job.driver.pid)
        assert victims, "no generator actor process found"
        for victim in victims:
            victim.kill()
        _, alive = psutil.wait_procs(victims, timeout=60)
        assert not alive, alive
        killed = {victim.pid for victim in victims}
        wait_for(
            lambda: any(p.pid not in killed for p in generator_actors(job.driver.pid)) or job.driver.poll() is not None,
            what="a restarted generator actor",
        )
        assert job.driver.poll() is None, job.output()[1][-3000:]
        # Held still: shards 2 and 3 wait for the restarted generator, which is let through now.
        assert not shard_path(shards, 2).exists() and not shard_path(shards, 3).exists()
        job.let_through()
        job.driver.wait(timeout=600)
    finally:
        job.kill()
    stdout, stderr = job.output()
    assert job.driver.returncode == 0, stderr[-3000:]
    assert len(list(shards.glob("shard-*.parquet"))) == 4
    # Every key once: the batch the killed actor held was done again, and only on its successor.
    assert sorted(keys(shards)) == sorted(set(keys(shards))) and len(keys(shards)) == 16
    assert len(records(best_file(stdout))) == 8


# A word problem whose prompt needs more than 100 tokens (written for this test, in MATH-500's row format).
LONG_PROBLEM = {
    "problem": "A farmer plants rows of trees along the four sides of a rectangular field that is $120$ meters long "
    "and $80$ meters wide. She puts one tree at every corner and then one tree every $5$ meters along each side, "
    "never planting two trees at the same spot. Later she removes every third tree, counting clockwise from the "
    "north-west corner, and replaces each removed tree with two bushes. How many bushes does she plant in total?",
    "answer": "53",
    "unique_id": "test/word_problems/long.json",
    "subject": "Prealgebra",
    "level": 4,
}


def test_a_problem_that_cannot_be_generated_becomes_error_rows(tiny_model, tmp_path):
    """Problem 1's prompt and --max_tokens 24 do not fit --max_model_len 100: its rows say so, the run finishes.

    The tiny model has SmolLM2's tokenizer and chat template, so the prompts have the real model's lengths.
    """
    from transformers import AutoTokenizer

    from ray_pipeline.prompts import build_prompt

    rows = embedded_records("embedded:4")
    rows[1] = LONG_PROBLEM
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    lengths = [len(tokenizer(build_prompt(r["problem"], "original"))["input_ids"]) for r in rows]
    length = lengths[1]
    assert length + 24 > 100 and max(lengths[0], *lengths[2:]) + 24 <= 100, lengths
    refusing = ("--max_model_len", "100", "--dataset", str(data))
    first = run_in_process("jobs.infer", *tiny_args(tmp_path, "run", tiny_model, *refusing))
    long_id = LONG_PROBLEM["unique_id"]
    assert f"no candidates for {long_id}: prompt has {length} tokens" in first
    table = pq.read_table(shard_path(tmp_path / "run" / "shards", 0)).to_pylist()
    errors = {(r["problem_id"], r["candidate_index"]): r["error"] for r in table if r["error"]}
    assert sorted(errors) == [(long_id, 0), (long_id, 1)]
    assert all(r["token_count"] > 0 for r in table if not r["error"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert list(summary["error_problems"]) == [long_id]
    lines = {r["unique_id"]: r for r in records(best_file(first))}
    assert (
        len(lines) == 4
        and lines[long_id]["error"].startswith(f"prompt has {length} tokens")
        and not lines[long_id]["correct"]
    )
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [manifest["shards"][s]["status"] for s in ("0", "1")] == ["failed", "committed"]
    report = run_job("jobs.reduce", str(tmp_path / "run"), "--method", "all")
    assert report.returncode == 0, report.stderr[-2000:]
    assert f"- `{long_id}`: prompt has {length} tokens" in (tmp_path / "run" / "report.md").read_text()
    again = run_in_process("jobs.infer", *tiny_args(tmp_path, "run", tiny_model, *refusing, "--reprocess_failed"))
    assert "1 of 2 shards to do" in again and "shard 0: redo (--reprocess_failed)" in again


def test_reducer_refuses_a_silently_partial_answer_file(finished, tmp_path):
    out, _ = finished
    run_dir = tmp_path / "run"
    shutil.copytree(out / "run", run_dir)
    shard_path(run_dir / "shards", 1).unlink()
    refused = run_job("jobs.reduce", str(run_dir), "--method", "baseline")
    assert "shards 1 are missing" in one_line_error(refused)
    partial = run_job("jobs.reduce", str(run_dir), "--method", "baseline", "--allow_partial")
    assert partial.returncode == 0, partial.stderr[-2000:]
    assert "PARTIAL: shards [1] are missing" in partial.stdout
    assert len(records(run_dir / "best_baseline.jsonl")) == 6
