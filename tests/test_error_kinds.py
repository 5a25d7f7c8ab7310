"""Kinds of failure, each tested as a kind over generated cases rather than one example.

- Output names: two run ids never share an output (best-answer file or run folder), over generated
  ids, data sets and models; default names stay as they were.
- Refused data values: every one names its file, its row and its field (lone surrogates included).
- Hints: every `--flag` a job prints is a flag of the job it names, else of the job that prints it.
- A `--max_tokens` that leaves no room in the model's context is refused before Ray starts.

No Ray cluster: every job here stops before Ray would start (the fast tier's guard would fail it).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import random
import re
import string
import typing
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import infer, main, reduce
from ray_pipeline.config import RunConfig
from ray_pipeline.data import load_problems
from ray_pipeline.errors import PipelineError
from ray_pipeline.manifest import Manifest, best_file_name, dataset_name, default_run_id, fingerprint_hash
from ray_pipeline.shards import SHARD_SCHEMA, ShardWriter

JOBS = {"infer": infer.main, "main": main.main, "reduce": reduce.main}

# ---------------------------------------------------------------------------------------------- names

# Characters a run id may hold (a plain folder name), weighted towards the ones the names use themselves.
RUN_ID_CHARS = string.ascii_letters + string.digits + "_-.%" + "_" * 6 + "abcdef0123456789" * 2


def run_ids(rng: random.Random, datasets: list[str], models: list[str], count: int) -> set[str]:
    """Run ids of every shape: random text, 10 hex digits, `run-…`, escapes, default ids and near-misses."""
    ids = set()
    for _ in range(count):
        kind = rng.randrange(7)
        text = "".join(rng.choice(RUN_ID_CHARS) for _ in range(rng.randint(1, 14)))
        ds, model = dataset_name(rng.choice(datasets)), rng.choice(models)
        hex10 = "".join(rng.choice("0123456789abcdef") for _ in range(10))
        if kind == 0:
            ids.add(text)
        elif kind == 1:
            ids.add(hex10)
        elif kind == 2:
            ids.add("run-" + text)
        elif kind == 3:
            ids.add(f"{ds}_candidates_{model}_{hex10}")
        elif kind == 4:
            # A default id's shape with a part that is not quite one: short hash, capitals, another model.
            ids.add(f"{ds}_candidates_{model}_{rng.choice([hex10[:9], hex10.upper(), hex10 + 'x', text])}")
        elif kind == 5:
            # What another run id's escaped file part decodes to, spelled out.
            ids.add(text.replace("_", "%5F") + rng.choice(["", "_", "%25"]))
        else:
            ids.add(f"{ds}_best_{model}_{text}")
    return {i for i in ids if i.strip() and i not in (".", "..")}


def decode_run_id(name: str) -> tuple[str, str, str]:
    """Inverse of best_file_name: (data set part, model part, run id) from a best-answer file name."""
    stem = name.removesuffix(".jsonl")
    ds, rest = stem.split("_best_", 1)
    model, tail = rest.rsplit("_", 1)
    if re.fullmatch(r"[0-9a-f]{10}", tail):
        return ds, model, f"{ds}_candidates_{model}_{tail}"
    if tail.startswith("run-"):
        return ds, model, tail[4:].replace("%5F", "_").replace("%25", "%")
    return ds, model, tail


@pytest.mark.fast
@pytest.mark.parametrize("seed", range(20))
def test_two_run_ids_never_share_an_output(seed):
    rng = random.Random(seed)
    datasets = ["HuggingFaceH4/MATH-500", "embedded:4", "data/a-b.jsonl", "ab.json", "x.parquet", "s3://b/p/m.jsonl"]
    models = ["SmolLM2-135M-Instruct", "Qwen2.5-Math-1.5B-Instruct", "my_model", "m_run-x", "a_best_b", "model%5F"]
    outputs: dict[str, str] = {}
    for run_id in sorted(run_ids(rng, datasets, models, 400)):
        ds, model = rng.choice(datasets), rng.choice(models)
        name = best_file_name(ds, model, run_id)
        # The name gives its run id back: no other run id can have made it.
        assert decode_run_id(name)[2] == run_id, (run_id, name)
        for output in (name, run_id):
            assert outputs.setdefault(output, run_id) == run_id, f"{output} is shared by {outputs[output]} and {run_id}"


@pytest.mark.fast
def test_default_best_file_names_are_kept():
    fp = {"seed": 0}
    for dataset, model in [("HuggingFaceH4/MATH-500", "SmolLM2-135M-Instruct"), ("embedded:100", "my_model")]:
        run_id = default_run_id(dataset, model, fp)
        ds = dataset_name(dataset)
        assert best_file_name(dataset, model, run_id) == f"{ds}_best_{model}_{fingerprint_hash(fp)[:10]}.jsonl"
    # A plain run id keeps its old name too.
    assert best_file_name("HuggingFaceH4/MATH-500", "M", "math500-n4") == "math500_best_M_math500-n4.jsonl"


@pytest.mark.fast
def test_a_run_id_that_reads_as_a_best_answer_file_is_refused(tmp_path, capsys):
    run_id = "embedded4_best_SmolLM2-135M-Instruct_900429ed52.jsonl"
    status = infer.main(["--dataset", "embedded:4", "--output_dir", str(tmp_path), "--run_id", run_id])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("error: run_id") and ".jsonl" in err, err
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------ refused data values

# Per field, values the loader refuses. JSON can spell a lone surrogate (\ud800) that no UTF-8 text holds.
REFUSED_VALUES = {
    "problem": ["", "  ", None, [1], {"a": 1}, True, math.nan, math.inf, "\ud800", "a\udfffb", "ok \ud83d"],
    "answer": [[1], {"a": 1}, True, math.nan, -math.inf, "\udc00", "x\ud800"],
    "unique_id": ["", [1], True, 3.5, math.nan, "\ud800id"],
    "subject": [1, [1], True, "\ud800"],
    "level": ["x", -1, 2**31, 3.5, True, [1], math.nan, "Level \ud800"],
}


def write_rows(path: Path, rows: list[dict]) -> None:
    if path.suffix == ".parquet":
        # from_pylist takes its columns from the first row: give every row every field.
        fields = {name: None for row in rows for name in row}
        pq.write_table(pa.Table.from_pylist([fields | row for row in rows]), path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def has_surrogate(value) -> bool:
    return isinstance(value, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in value)


@pytest.mark.fast
@pytest.mark.parametrize("seed", range(40))
def test_every_refused_value_names_its_file_row_and_field(tmp_path, seed):
    rng = random.Random(seed)
    rows = [{"problem": f"What is {i} + 1?", "answer": str(i + 1), "unique_id": f"p{i}"} for i in range(6)]
    field = rng.choice(sorted(REFUSED_VALUES))
    value = rng.choice(REFUSED_VALUES[field])
    row = rng.randrange(len(rows))
    rows[row][field] = value
    # Parquet columns hold one type and no surrogates: those cases stay JSON.
    suffixes = [".jsonl", ".json"] + ([] if has_surrogate(value) or isinstance(value, (list, dict)) else [".parquet"])
    path = tmp_path / f"rows{rng.choice(suffixes)}"
    try:
        write_rows(path, rows)
    except (pa.ArrowException, TypeError, ValueError):
        path = tmp_path / "rows.jsonl"
        write_rows(path, rows)
    with pytest.raises(PipelineError) as err:
        load_problems(str(path))
    text = str(err.value)
    assert "\n" not in text and str(path) in text and f"row {row + 1}: '{field}'" in text, (value, text)


@pytest.mark.fast
@pytest.mark.parametrize(
    ("rows", "row", "field"),
    [
        ([{"problem": "a", "unique_id": "x"}, {"problem": "b", "unique_id": "x"}], 2, "unique_id"),
        ([{"problem": "a", "unique_id": 7}, {"problem": "b"}, {"problem": "c", "unique_id": "7"}], 3, "unique_id"),
        ([{"problem": "same"}, {"problem": "other"}, {"problem": "same"}], 3, "problem"),
    ],
)
def test_a_repeated_id_names_both_rows_and_the_field(tmp_path, rows, row, field):
    path = tmp_path / "dup.jsonl"
    write_rows(path, rows)
    with pytest.raises(PipelineError) as err:
        load_problems(str(path))
    assert f"{path}: row {row}: '{field}'" in str(err.value) and "first in row" in str(err.value), str(err.value)


@pytest.mark.fast
@pytest.mark.parametrize("seed", range(24))
def test_every_refused_value_in_a_run_configuration_names_its_file_and_field(tmp_path, seed, capsys):
    """A hand-edited config.json given to jobs.reduce: a value of another type or out of its range."""
    import dataclasses

    rng = random.Random(seed)
    run_dir = finished_run(tmp_path)
    saved = json.loads((run_dir / "config.json").read_text())
    fields = [f for f in dataclasses.fields(RunConfig) if f.name in saved]
    field = rng.choice(fields)
    low, high = field.metadata["low"], field.metadata["high"]
    takes_text = str in typing.get_args(typing.get_type_hints(RunConfig)[field.name]) + (
        typing.get_type_hints(RunConfig)[field.name],
    )
    bad = [[1], {"a": 1}, 7 if takes_text else "text"]
    if low is not None:
        bad.append(low - 1)
    if high is not None:
        bad.append(high * 10 + 1)
    saved[field.name] = rng.choice(bad)
    (run_dir / "config.json").write_text(json.dumps(saved))
    assert reduce.main([str(run_dir), "--method", "baseline"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"run configuration {run_dir / 'config.json'}: " in err and field.name in err, err


# ----------------------------------------------------------------------------------------------- hints


def flags_of(job: str) -> set[str]:
    """The flags a job's parser takes, read from its --help."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        JOBS[job](["--help"])
    return set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", out.getvalue()))


JOB_NAME = re.compile(r"(?:jobs\.|bestofn-)(infer|main|reduce)\b")


def misplaced_hints(text: str, job: str, flags: dict[str, set[str]]) -> list[str]:
    """Flags in `text` that the job they are for does not take: the job named nearest in the line, else `job`."""
    bad = []
    for line in text.splitlines():
        # argparse's refusal quotes the user's own flags back: they are the input, not a hint.
        line = re.sub(r"unrecognized arguments: .*?(\(see --help\)|$)", r"\1", line)
        named = [(m.start(), m.group(1)) for m in JOB_NAME.finditer(line)]
        for m in re.finditer(r"(?<![\w-])(--[a-z][\w-]*)", line):
            owner = min(named, key=lambda n: abs(n[0] - m.start()))[1] if named else job
            if m.group(1) not in flags[owner]:
                bad.append(f"{owner} does not take {m.group(1)}: {line}")
    return bad


def candidate_rows(n: int = 2) -> list[dict]:
    rows = []
    for p in range(2):
        for k in range(n):
            row = {name: None for name in SHARD_SCHEMA.names}
            row.update(
                problem_id=f"p{p}", problem_index=p, shard_id=p, problem=f"q{p}", gold="1", candidate_index=k,
                text=r"\boxed{1}", token_count=3, pred="1", correct=True, mean_entropy=1.0, mean_self_certainty=1.0,
                step_self_certainty=[1.0], step_entropy=[1.0], step_texts=["s"], token_confidence=[1.0, 1.0, 1.0],
                coe_magnitude=[1.0], coe_angle=[0.5], coe_span_magnitude=1.0, coe_span_angle=1.0, vocab_size=10,
            )  # fmt: skip
            rows.append(row)
    return rows


def finished_run(folder: Path) -> Path:
    """A run folder as jobs.infer leaves it: config.json, manifest.json (with its resume command), two shards."""
    run_dir = folder / "run"
    config = RunConfig(num_return_sequences=2, shard_size=1, dataset="embedded:2", run_id="run")
    manifest = Manifest.plan("run", "20260101_000000", "M", {"seed": 0}, {0: 2, 1: 2}, 2)
    writer = ShardWriter(run_dir / "shards", {0: 2, 1: 2}, fingerprint=manifest.fingerprint_hash)
    writer.add(pa.Table.from_pylist(candidate_rows(), schema=SHARD_SCHEMA))
    manifest.command = "python -m jobs.infer --dataset embedded:2 --shard_size 1 --run_id run"
    for shard in (0, 1):
        manifest.set_status(shard, "committed")
    manifest.save(run_dir)
    config.save(run_dir / "config.json")
    return run_dir


def damage(run_dir: Path, how: str) -> list[str]:
    """Damage a finished run folder one way; the jobs.reduce flags that then meet it."""
    shards = run_dir / "shards"
    if how == "corrupt manifest":
        (run_dir / "manifest.json").write_text("{broken")
    elif how == "manifest of another shape":
        (run_dir / "manifest.json").write_text(json.dumps({"run_id": "run"}))
    elif how == "no manifest":
        (run_dir / "manifest.json").unlink()
    elif how == "no config":
        (run_dir / "config.json").unlink()
    elif how == "corrupt config":
        (run_dir / "config.json").write_text("[1, 2")
    elif how == "missing shard":
        (shards / "shard-00001.parquet").unlink()
    elif how == "truncated shard":
        data = (shards / "shard-00000.parquet").read_bytes()
        (shards / "shard-00000.parquet").write_bytes(data[: len(data) // 2])
    elif how == "stray shard":
        (shards / "shard-00009.parquet").write_bytes((shards / "shard-00000.parquet").read_bytes())
    elif how == "unknown method":
        return ["--method", "magic"]
    elif how == "self-eval without its passes":
        return ["--method", "self-eval"]
    elif how == "too many candidates":
        return ["--num_return_sequences", "3"]
    elif how == "alpha out of range":
        return ["--alpha", "7"]
    elif how == "an unknown flag":
        return ["--overwrite"]
    elif how == "every method compared":
        return ["--method", "all"]
    return []


DAMAGES = [
    "corrupt manifest", "manifest of another shape", "no manifest", "no config", "corrupt config", "missing shard",
    "truncated shard", "stray shard", "unknown method", "self-eval without its passes", "too many candidates",
    "alpha out of range", "an unknown flag", "every method compared",
]  # fmt: skip


@pytest.fixture(scope="module")
def job_flags():
    return {job: flags_of(job) for job in JOBS}


@pytest.fixture
def quiet_env(monkeypatch):
    """The jobs set Ray's quiet variables in os.environ; keep them out of the other tests."""
    for name in ("RAY_LOGGER_LEVEL", "RAY_DATA_LOG_LEVEL", "RAY_BACKEND_LOG_LEVEL", "TQDM_DISABLE",
                 "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):  # fmt: skip
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.mark.fast
@pytest.mark.parametrize("how", DAMAGES)
def test_every_hint_jobs_reduce_prints_names_a_flag_of_its_job(tmp_path, how, job_flags, capsys):
    run_dir = finished_run(tmp_path)
    extra = damage(run_dir, how)
    with contextlib.suppress(SystemExit):
        reduce.main([str(run_dir), "--method", "baseline", *extra])
    captured = capsys.readouterr()
    assert not misplaced_hints(captured.out + captured.err, "reduce", job_flags)


@pytest.mark.fast
@pytest.mark.parametrize("errno_", [errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EIO])
@pytest.mark.parametrize("raised", ["storage", "os"])
def test_every_hint_a_failed_write_gives_jobs_reduce_names_a_flag_of_its_job(
    tmp_path, errno_, raised, job_flags, capsys, monkeypatch
):
    """A disk that fills up or refuses a write while jobs.reduce writes its outputs, through either path."""
    from ray_pipeline.storage import StorageError, StoragePath

    def refuse(self, *args, **kwargs):
        exc = OSError(errno_, os.strerror(errno_), str(self))
        raise StorageError("write", str(self), exc, remote=False) if raised == "storage" else exc

    run_dir = finished_run(tmp_path)
    monkeypatch.setattr(StoragePath, "write_text", refuse)
    assert reduce.main([str(run_dir), "--method", "baseline"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and not misplaced_hints(captured.err, "reduce", job_flags)


def infer_cases(tmp_path: Path) -> list[list[str]]:
    """jobs.infer and jobs.main arguments that each stop before Ray, at a different refusal."""
    run_dir = finished_run(tmp_path / "out")
    (run_dir / "manifest.json").write_text("{broken")
    bare = finished_run(tmp_path / "bare")
    (bare / "manifest.json").unlink()
    data = tmp_path / "bad.jsonl"
    data.write_text('{"problem": "a \\ud800"}\n', encoding="utf-8")
    base = ["--dataset", "embedded:2", "--shard_size", "1", "--num_return_sequences", "2"]
    return [
        [*base, "--output_dir", str(tmp_path / "out"), "--run_id", "run"],
        [*base, "--output_dir", str(tmp_path / "bare"), "--run_id", "run"],
        [*base, "--temperature", "0"],
        [*base, "--run_id", "a/b"],
        [*base, "--max_tokens", "9000"],
        [*base, "--reprocess_shards", "x"],
        [*base, "--method", "magic"],
        [*base, "--method", "self-eval"],
        ["--dataset", str(data)],
        ["--dataset", str(tmp_path / "missing.jsonl")],
        [*base, "--model_path", str(tmp_path / "nothing.gguf")],
        [*base, "--bogus_flag", "1"],
    ]


@pytest.mark.parametrize("job", ["infer", "main"])
def test_every_hint_jobs_infer_and_main_print_names_a_flag_of_its_job(tmp_path, job, job_flags, capsys, quiet_env):
    for argv in infer_cases(tmp_path):
        with contextlib.suppress(SystemExit):
            assert JOBS[job](argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.err.startswith("error: "), (argv, captured.err)
        assert not misplaced_hints(captured.out + captured.err, job, job_flags), argv


@pytest.mark.fast
def test_the_hint_check_finds_a_flag_the_job_does_not_take(job_flags):
    assert misplaced_hints("error: x is corrupt; pass --overwrite to start over", "reduce", job_flags)
    assert not misplaced_hints("error: x (the run resumes with: python -m jobs.infer --overwrite)", "reduce", job_flags)
    assert not misplaced_hints("error: x; rerun with --verbose for the traceback", "reduce", job_flags)


# ------------------------------------------------------------------------------------------ max_tokens


@pytest.mark.parametrize(("extra", "limit"), [([], 8192), (["--max_model_len", "512"], 512)])
def test_max_tokens_that_fill_the_context_are_refused_before_ray(tmp_path, extra, limit, capsys, quiet_env):
    for max_tokens in (limit, limit + 1, 10 * limit):
        argv = ["--dataset", "embedded:2", "--max_tokens", str(max_tokens), "--output_dir", str(tmp_path), *extra]
        assert infer.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"max_tokens {max_tokens} leaves no room" in err[0] and f"{limit} tokens" in err[0]
    assert not any(tmp_path.iterdir()), "refused before the run folder is made"
