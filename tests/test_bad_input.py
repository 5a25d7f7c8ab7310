"""Bad input of every kind: one `error:` line that names the input and a fix, never a traceback.

Most cases run in-process through the checks jobs.infer makes before Ray starts (load_problems,
resolve_model); a handful run `python -m jobs.infer` against a finished run and check that its
shards keep their bytes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import random
import shutil
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_job
from ray_pipeline import hub
from ray_pipeline.config import RunConfig
from ray_pipeline.data import load_problems
from ray_pipeline.errors import ConfigError, PipelineError, exit_status
from ray_pipeline.model import check_hub_model, embedded_gguf, load_every_weight, resolve_model
from ray_pipeline.storage import StorageError

pytestmark = pytest.mark.fast  # no model and no Ray: checks made before Ray starts

COLUMNS = ("problem", "answer", "unique_id", "subject", "level")
VALUES = [
    math.nan, math.inf, -math.inf, 1e308, -1, 0, 12, 3.5, 5.0, 2**31, 2**40, -(2**63), True, False, None,
    "", "  ", "12", "Level 3", "Level ?", "level 7", "abc", "x" * 300, [1, 2], {"a": 1}, [], "a\u2028b",
]  # fmt: skip
REFUSED = object()


def base_rows(count: int = 4) -> list[dict]:
    return [
        {"problem": f"What is {i} + {i}?", "answer": str(2 * i), "unique_id": f"test/row-{i}.json",
         "subject": "Algebra", "level": 1 + i % 5, "solution": "ignored"}
        for i in range(count)
    ]  # fmt: skip


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number_text(value) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def expected_value(column: str, value):
    """What the loader must keep for `value` in `column`, or REFUSED: the rule, written independently."""
    if column == "problem":
        if isinstance(value, str):
            return value if value.strip() else REFUSED
        return _number_text(value) if _finite_number(value) else REFUSED
    if column == "answer":
        if value is None or isinstance(value, str):
            return value
        return _number_text(value) if _finite_number(value) else REFUSED
    if column == "subject":
        return value if value is None or isinstance(value, str) else REFUSED
    if column == "unique_id":
        if value is None:
            return None
        if isinstance(value, str):
            return value if value.strip() else REFUSED
        if _finite_number(value) and float(value).is_integer():
            return str(int(value))
        return REFUSED
    # level
    if value is None:
        return None
    if isinstance(value, str):
        digits = value.strip().removeprefix("Level").removeprefix("level").strip()
        if digits in ("", "?"):
            return None
        value = int(digits) if digits.isdigit() else REFUSED
    if _finite_number(value) and float(value).is_integer() and 0 <= value < 2**31:
        return int(value)
    return REFUSED


def write_rows(path: Path, rows: list[dict]) -> None:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def assert_one_line(exc: PipelineError, *fragments: str) -> str:
    text = str(exc)
    assert "\n" not in text and text.strip(), text
    for fragment in fragments:
        assert fragment in text, text
    return text


@pytest.mark.parametrize("seed", range(80))
def test_mutated_data_files(tmp_path, seed):
    """Random values of every type in every column: each is kept as the rule says or refused in one line."""
    rng = random.Random(seed)
    rows = base_rows()
    mutations = []
    for _ in range(rng.randint(1, 3)):
        row, column, value = rng.randrange(len(rows)), rng.choice(COLUMNS), rng.choice(VALUES)
        rows[row][column] = value
        mutations = [m for m in mutations if m[:2] != (row, column)] + [(row, column, value)]
    suffix = rng.choice([".jsonl", ".json", ".parquet"])
    path = tmp_path / f"mutated{suffix}"
    if suffix == ".parquet":
        # A Parquet column has one type: the mutated value fills its whole column.
        columns = {column: value for _, column, value in mutations}
        for r in rows:
            r.update(columns)
        mutations = [(r, column, value) for column, value in columns.items() for r in range(len(rows))]
        try:
            write_rows(path, rows)
        except (pa.ArrowException, TypeError, ValueError):
            path = tmp_path / "mutated.jsonl"
            write_rows(path, rows)
    else:
        write_rows(path, rows)
    refused = [(row, column) for row, column, value in mutations if expected_value(column, value) is REFUSED]
    if not refused:
        kept = [{c: expected_value(c, r[c]) for c in COLUMNS} for r in rows]
        ids = [k["unique_id"] or "sha1:" + hashlib.sha1(k["problem"].encode()).hexdigest()[:16] for k in kept]
        if len(set(ids)) < len(ids):
            with pytest.raises(PipelineError) as err:
                load_problems(str(path))
            assert_one_line(err.value, "appears twice")
            return
        table = load_problems(str(path)).to_pylist()
        assert [t["problem_id"] for t in table] == ids
        for got, want in zip(table, kept, strict=True):
            assert (got["problem"], got["gold"], got["subject"], got["level"]) == (
                want["problem"], want["answer"], want["subject"], want["level"],
            )  # fmt: skip
        return
    with pytest.raises(PipelineError) as err:
        load_problems(str(path))
    text = assert_one_line(err.value, str(path))
    # The error names a refused row and its field (rows count from 1).
    assert any(f"row {row + 1}: '{column}'" in text for row, column in refused), (text, refused)


def test_values_that_are_legitimately_fine(tmp_path):
    """A numeric problem is a problem, unique_id 0 is an id, 'Level 3' is level 3."""
    path = tmp_path / "ok.jsonl"
    write_rows(path, [{"problem": 12, "unique_id": 0, "answer": 4, "level": "Level 3"}, {"problem": "b", "level": 2.0}])
    first, second = load_problems(str(path)).to_pylist()
    assert (first["problem"], first["problem_id"], first["gold"], first["level"]) == ("12", "0", "4", 3)
    assert second["level"] == 2 and second["problem_id"].startswith("sha1:")


def valid_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "valid.jsonl"
    write_rows(path, base_rows(6))
    return path


@pytest.mark.parametrize("name", ["data.csv", "data.txt", "data.yaml", "data"])
def test_wrong_extension(tmp_path, name):
    path = tmp_path / name
    shutil.copy(valid_jsonl(tmp_path), path)
    with pytest.raises(PipelineError) as err:
        load_problems(str(path))
    assert_one_line(err.value, "has the extension", ".jsonl/.json/.parquet")


def test_directory_empty_and_bom(tmp_path):
    with pytest.raises(PipelineError) as err:
        load_problems(str(tmp_path))
    assert_one_line(err.value, "is a directory")
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(PipelineError) as err:
        load_problems(str(tmp_path / "dir.jsonl"))
    assert_one_line(err.value, "is a directory")
    for content in (b"", b"\n\n  \n", b"\xef\xbb\xbf"):
        (tmp_path / "empty.jsonl").write_bytes(content)
        with pytest.raises(PipelineError) as err:
            load_problems(str(tmp_path / "empty.jsonl"))
        assert_one_line(err.value, "has no rows")
    text = valid_jsonl(tmp_path).read_bytes()
    for suffix, data in ((".jsonl", text), (".json", json.dumps(base_rows(6)).encode())):
        bom = tmp_path / f"bom{suffix}"
        bom.write_bytes(b"\xef\xbb\xbf" + data)
        assert load_problems(str(bom)).column("problem_id").to_pylist()[0] == "test/row-0.json"


@pytest.mark.parametrize("seed", range(12))
def test_non_utf8_bytes_anywhere(tmp_path, seed):
    rng = random.Random(seed)
    data = bytearray(valid_jsonl(tmp_path).read_bytes())
    data.insert(rng.randrange(len(data)), rng.choice([0xFF, 0xC3, 0x80, 0xE9]))
    path = tmp_path / "latin.jsonl"
    path.write_bytes(bytes(data))
    with pytest.raises(PipelineError) as err:
        load_problems(str(path))
    assert_one_line(err.value, "is not UTF-8 text")


@pytest.mark.parametrize("seed", range(20))
def test_truncated_files(tmp_path, seed):
    """A file cut anywhere loads its complete rows or is refused in one line."""
    rng = random.Random(seed)
    source = rng.choice([valid_jsonl(tmp_path), tmp_path / "valid.json"])
    if source.suffix == ".json":
        source.write_text(json.dumps(base_rows(6), indent=1))
    data = source.read_bytes()
    cut = tmp_path / f"cut{source.suffix}"
    cut.write_bytes(data[: rng.randrange(1, len(data))])
    try:
        table = load_problems(str(cut))
    except PipelineError as exc:
        assert_one_line(exc, str(cut))
    else:
        assert source.suffix == ".jsonl" and 1 <= table.num_rows <= 6


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[1, 2]\n", "row 1 is list [1, 2], not an object"),
        (b'{"problem": "a"}\n7\n', "row 2 is int 7, not an object"),
        (b"[" * 100_000 + b"\n", "line 1 is not valid JSON (nested too deeply)"),
        (b'{"problem": "a"\n', "line 1 is not valid JSON"),
        (b'{"problem": NaN}\n', "row 1: 'problem' is nan"),
        (b'{"problem": "a", "level": Infinity}\n', "row 1: 'level' is inf"),
    ],
)
def test_json_shapes(tmp_path, content, message):
    path = tmp_path / "shapes.jsonl"
    path.write_bytes(content)
    with pytest.raises(PipelineError) as err:
        load_problems(str(path))
    assert_one_line(err.value, message)


def test_line_separator_inside_a_string(tmp_path):
    path = tmp_path / "sep.jsonl"
    path.write_text(json.dumps({"problem": "a\u2028b\x85c"}, ensure_ascii=False) + "\n")
    assert load_problems(str(path)).column("problem").to_pylist() == ["a\u2028b\x85c"]


def test_parquet_kinds(tmp_path):
    good = tmp_path / "good.parquet"
    write_rows(good, base_rows(6))
    data = good.read_bytes()
    for name, content in (("garbage", b"not parquet at all"), ("cut", data[: len(data) // 2]), ("empty", b"")):
        path = tmp_path / f"{name}.parquet"
        path.write_bytes(content)
        with pytest.raises(PipelineError) as err:
            load_problems(str(path))
        assert_one_line(err.value, "as Parquet", "pass a valid Parquet file")
    typed = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"problem": pa.array([12, 13], pa.int64()), "level": pa.array(["3", None])}), typed)
    assert load_problems(str(typed)).select(["problem", "level"]).to_pylist() == [
        {"problem": "12", "level": 3},
        {"problem": "13", "level": None},
    ]
    nested = tmp_path / "nested.parquet"
    pq.write_table(pa.table({"problem": pa.array([[1, 2]]), "answer": pa.array([b"\x00"])}), nested)
    with pytest.raises(PipelineError) as err:
        load_problems(str(nested))
    assert_one_line(err.value, "row 1: 'problem' is list [1, 2]")
    no_rows = tmp_path / "no_rows.parquet"
    pq.write_table(pa.table({"problem": pa.array([], pa.string())}), no_rows)
    with pytest.raises(PipelineError) as err:
        load_problems(str(no_rows))
    assert_one_line(err.value, "has no rows")


# --- models ---------------------------------------------------------------------------------------------


@pytest.fixture
def model_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_PIPELINE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_files_that_are_not_gguf(tmp_path, model_cache):
    real = embedded_gguf()
    with real.open("rb") as f:
        head = f.read(4_000_000)
    rng = random.Random(0)
    cases = {
        "empty": b"",
        "text": b"hello, I am not a model\n",
        "ggml": b"GGML" + head[4:4096],
        "random": bytes(rng.randrange(256) for _ in range(4096)),
        **{f"head{n}": head[:n] for n in (4, 16, 24, 100, 4096, 4_000_000)},
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(content)
        with pytest.raises(PipelineError) as err:
            resolve_model(str(path))
        assert_one_line(err.value, f"model file {path}", "pass a complete .gguf file")
    assert not list(model_cache.glob("models/*/config.json"))


def test_gguf_cut_at_the_end(tmp_path, model_cache):
    cut = tmp_path / "cut.gguf"
    real = embedded_gguf()
    with real.open("rb") as src, cut.open("wb") as dst:
        shutil.copyfileobj(src, dst)
        dst.truncate(real.stat().st_size - 1000)
    with pytest.raises(PipelineError) as err:
        resolve_model(str(cut))
    assert_one_line(err.value, f"model file {cut} is", "truncated")


MODEL_FOLDERS = {
    "empty config": ({"config.json": b""}, "config.json is not valid JSON"),
    "truncated config": ({"config.json": b'{"model_type": "lla'}, "config.json is not valid JSON (line 1"),
    "latin1 config": ({"config.json": b'{"model_type": "caf\xe9"}'}, "config.json is not valid JSON"),
    "list config": ({"config.json": b"[]"}, "config.json names no model_type"),
    "no model_type": ({"config.json": b'{"hidden_size": 8}'}, "config.json names no model_type"),
    "numeric model_type": ({"config.json": b'{"model_type": 3}'}, "config.json names no model_type"),
    "no tokenizer": ({"config.json": b'{"model_type": "llama"}'}, "has no tokenizer"),
    "broken tokenizer": (
        {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b'{"version": '},
        "tokenizer.json is not valid JSON",
    ),
    "no weights": ({"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}"}, "has no weights"),
}


@pytest.mark.parametrize("case", list(MODEL_FOLDERS))
def test_model_folders(tmp_path, case):
    files, message = MODEL_FOLDERS[case]
    folder = tmp_path / "model"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    with pytest.raises(PipelineError) as err:
        resolve_model(str(folder))
    assert_one_line(err.value, str(folder), message)


def test_every_weight_is_loaded_or_the_load_fails():
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    full = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    load_every_weight(model, full, "m.gguf")
    assert all(bool((v == 0.5).all()) for v in model.state_dict().values())
    missing = {k: v for k, v in full.items() if k != "1.bias"}
    with pytest.raises(PipelineError) as err:
        load_every_weight(model, missing, "m.gguf")
    assert_one_line(err.value, "model file m.gguf does not hold every weight", "missing 1.bias")
    with pytest.raises(PipelineError) as err:
        load_every_weight(model, full | {"2.weight": torch.zeros(1)}, "m.gguf")
    assert_one_line(err.value, "unexpected 2.weight")


# --- run configuration, full disks, the Hub ---------------------------------------------------------------


@pytest.mark.parametrize("seed", range(10))
def test_damaged_run_config(tmp_path, seed):
    path = tmp_path / "config.json"
    RunConfig().save(path)
    data = path.read_bytes()
    rng = random.Random(seed)
    damaged = [data[: rng.randrange(len(data) - 2)], b"[]", b"\xff" + data, b""][seed % 4]
    path.write_bytes(damaged)
    with pytest.raises(ConfigError) as err:
        RunConfig.load(path)
    assert_one_line(err.value, f"run configuration {path}", "run the jobs.infer command that made the run again")


def test_reduce_on_a_damaged_config(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "shards").mkdir(parents=True)
    (run_dir / "config.json").write_text('{"method": "self_certainty", "alpha": 0.')
    proc = run_job("jobs.reduce", str(run_dir), timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"error: run configuration {run_dir / 'config.json'} is not a valid config.json")


def test_full_disk_says_so(tmp_path):
    """ENOSPC, real from /dev/full where it exists, is 'No space left on device' with a fix for it."""
    import pyarrow.fs as pafs

    exc = OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    if Path("/dev/full").exists():
        with pytest.raises(OSError) as real:
            with pafs.LocalFileSystem().open_output_stream("/dev/full", compression=None) as out:
                out.write(b"x" * 1_000_000)
        exc = real.value
    err = StorageError("write", str(tmp_path / "shard.parquet"), exc, remote=False)
    assert_one_line(err, "No space left on device", "free some space there")
    assert "permissions" not in str(err)

    def job():
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache" / "model.safetensors"))

    import io
    from contextlib import redirect_stderr

    from ray_pipeline.cli import run_entry

    # exit_status serves the benchmarks, run_entry the jobs: both answer a full disk in one line.
    for entry in (exit_status, run_entry):
        stderr = io.StringIO()
        with redirect_stderr(stderr):
            assert entry(job) == 2
        assert stderr.getvalue().count("\n") == 1
        assert stderr.getvalue().startswith("error: No space left on device (")
        assert "free some space" in stderr.getvalue()


@pytest.fixture
def hub_down(monkeypatch):
    """The Hub at a local port nothing listens on, the way an offline machine sees it."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", *hub.PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")


def test_unreachable_hub_is_one_quiet_line(hub_down, capfd, monkeypatch):
    """Refused after one probe each: no Hub client gets to try (and retry) a connection of its own."""
    attempts = []
    connect = socket.create_connection

    def counted(address, *args, **kwargs):
        attempts.append(address)
        return connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", counted)
    with pytest.raises(PipelineError) as err:
        load_problems("no-such-owner/no-such-set")
    text = assert_one_line(err.value, "Hugging Face Hub is unreachable", "--dataset embedded")
    assert "shared" not in text
    with pytest.raises(PipelineError) as err:
        check_hub_model("no-such-owner/no-such-model")
    assert_one_line(err.value, "Hugging Face Hub is unreachable", "--model_path")
    assert attempts == [("127.0.0.1", 9), ("127.0.0.1", 9)]
    assert capfd.readouterr().err == ""


def test_offline_hub_is_one_quiet_line(monkeypatch, capfd):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(PipelineError) as err:
        load_problems("no-such-owner/no-such-set")
    assert "shared" not in assert_one_line(err.value, "pass a local .jsonl/.json/.parquet file with --dataset")
    assert "Retrying" not in capfd.readouterr().err


def test_unreachable_hub_through_the_job(tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": ""}
    proc = run_job("jobs.infer", "--dataset", "no-such-owner/no-such-set", "--output_dir", str(tmp_path), env=env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: cannot load data set 'no-such-owner/no-such-set'") and "shared" not in lines[0]
    assert not any(tmp_path.iterdir())

