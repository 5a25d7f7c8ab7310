"""Loading MATH-500 style problems and planning them into shards."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path, PurePosixPath

import pyarrow as pa

from ray_pipeline.errors import PipelineError, first_line
from ray_pipeline.problem_set import embedded_records, is_embedded
from ray_pipeline.storage import StorageError, StoragePath

PROBLEM_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()),
        ("problem_index", pa.int32()),
        ("shard_id", pa.int32()),
        ("problem", pa.string()),
        ("gold", pa.string()),
        ("subject", pa.string()),
        ("level", pa.int32()),
    ]
)
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
# A level is stored as int32; MATH's are 1-5, other sets may count differently.
LEVEL_RANGE = (0, 2**31 - 1)
LOCAL_FIX = "pass a local .jsonl/.json/.parquet file with --dataset"


def problem_id(row: dict) -> str:
    """The row's `unique_id` (0 is an id too), else a stable hash of the problem text."""
    uid = row.get("unique_id")
    if uid is not None and uid != "":
        return str(uid)
    return "sha1:" + hashlib.sha1(str(row["problem"]).encode("utf-8")).hexdigest()[:16]


def _is_local(dataset: str) -> bool:
    return dataset.endswith(LOCAL_SUFFIXES) or dataset.startswith(("/", ".", "~")) or Path(dataset).exists()


def read_records(dataset: str, split: str = "test") -> list[dict]:
    """Raw rows of the embedded set (`embedded[:K]`), a local .jsonl/.json/.parquet file or a Hub data set."""
    if is_embedded(dataset) and not Path(dataset).exists():
        return embedded_records(dataset)
    if "://" in dataset:
        # A URI is read as --output_dir is written: by pyarrow's file systems (s3, gs, hdfs, …), whose schemes
        # StoragePath.parse names when it refuses another (http, ftp: download the file first).
        try:
            location = StoragePath.parse(dataset)
        except StorageError:
            raise
        except PipelineError as exc:
            fix = "download the file and pass its local path" if "scheme" in str(exc) else "pass scheme://bucket/file"
            raise PipelineError(f"data set {exc}: {fix}") from None
        return _read_file(location)
    if _is_local(dataset):
        return _read_file(StoragePath.parse(Path(dataset).expanduser()))
    return _read_hub(dataset, split)


def _read_hub(dataset: str, split: str) -> list[dict]:
    from ray_pipeline import hub

    fix = f"{LOCAL_FIX}, or the embedded problem set with --dataset embedded"
    hub.refuse_if_unreachable(f"data set {dataset!r}", fix)
    try:
        with hub.quiet():
            import datasets

            datasets.disable_progress_bars()
            return list(datasets.load_dataset(dataset, split=split))
    except Exception as exc:  # noqa: BLE001 - offline, unknown id and bad split all mean the same to the user
        first = first_line(exc, default="")
        raise PipelineError(
            f"cannot load data set {dataset!r} split {split!r} from the Hub ({type(exc).__name__}: {first}); {fix}"
        ) from None


def _read_file(path: StoragePath) -> list[dict]:
    """The rows of a .jsonl/.json/.parquet file on a local disk or a store pyarrow reads (s3://, gs://, …)."""
    if path.is_dir():
        raise PipelineError(f"data set {path} is a directory: {LOCAL_FIX} inside it")
    if not path.is_file():
        raise PipelineError(f"data set file {path} does not exist: pass an existing .jsonl/.json/.parquet file")
    suffix = PurePosixPath(path.name).suffix
    if suffix not in LOCAL_SUFFIXES:
        raise PipelineError(
            f"data set {path} has the extension {suffix or '(none)'!r}: {LOCAL_FIX} (one JSON object per line "
            "for .jsonl, a JSON list of objects for .json)"
        )
    try:
        if suffix == ".parquet":
            return _read_parquet(path)
        # utf-8-sig: a byte order mark some editors write is not part of the first row.
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PipelineError(f"data set {path} is not UTF-8 text (byte {exc.start}): re-encode it as UTF-8") from None
    except StorageError as exc:
        if not path.is_local:
            raise
        raise PipelineError(f"cannot read data set {path}: {exc.reason}; check the file and its permissions") from None
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            where = "nested too deeply"
            if isinstance(exc, json.JSONDecodeError):
                where = f"line {exc.lineno} column {exc.colno}: {exc.msg}"
            raise PipelineError(f"data set {path} is not valid JSON ({where}); fix the file, or re-export it") from None
    rows = []
    # Only "\n" ends a JSON Lines row: str.splitlines would also split at characters such as U+2028 inside strings.
    for n, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except (json.JSONDecodeError, RecursionError) as exc:
                why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
                raise PipelineError(
                    f"data set {path}: line {n} is not valid JSON ({why}); fix or remove that line "
                    "(a .jsonl file holds one JSON object per line)"
                ) from None
    return rows


def _read_parquet(path: StoragePath) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        with path.open_input_file() as source:
            return pq.read_table(source).to_pylist()
    except (OSError, pa.ArrowException, ValueError) as exc:
        first = first_line(exc)
        raise PipelineError(f"cannot read data set {path} as Parquet ({first}): pass a valid Parquet file") from None


def _describe(value: object) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    shown = repr(value)
    return f"{type(value).__name__} {shown[:40] + '…' if len(shown) > 40 else shown}"


def _number_text(value: int | float) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


class _Row:
    """One record's fields, checked: every refusal names the data set, the row, the field and the value."""

    def __init__(self, dataset: str, row: int, record: object):
        self.where = f"data set {dataset}: row {row}"
        if not isinstance(record, dict):
            raise PipelineError(f"{self.where} is {_describe(record)}, not an object: each row needs a 'problem' text")
        if "problem" not in record:
            raise PipelineError(f"{self.where} has no 'problem' field: each row needs a 'problem' text")
        self.record = record

    def refuse(self, field: str, value: object, want: str) -> PipelineError:
        return PipelineError(f"{self.where}: '{field}' is {_describe(value)}; {want}")

    def encodable(self, field: str, value: str) -> str:
        """Text that UTF-8 can hold: JSON's \\ud800-style escapes can spell a lone surrogate, which it cannot."""
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            char = value[exc.start]
            raise PipelineError(
                f"{self.where}: '{field}' holds a lone surrogate (\\u{ord(char):04x} at character {exc.start + 1}), "
                "which no UTF-8 text can hold; fix that escape in the file, or remove the row"
            ) from None
        return value

    def text(self, field: str, *, required: bool) -> str | None:
        """Text, or a finite number written as text; None only where the field is optional."""
        value = self.record.get(field)
        want = f"write the {field} as text" + ("" if required else ", or null when there is none")
        if value is None and not required:
            return None
        if isinstance(value, str):
            if required and not value.strip():
                raise PipelineError(f"{self.where}: '{field}' is empty; fill it in or remove the row")
            return self.encodable(field, value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return _number_text(value)
        raise self.refuse(field, value, want)

    def label(self, field: str) -> str | None:
        value = self.record.get(field)
        if value is None:
            return None
        if isinstance(value, str):
            return self.encodable(field, value)
        raise self.refuse(field, value, f"write the {field} as text, or null")

    def uid(self) -> str | None:
        value = self.record.get("unique_id")
        want = "an id is a non-empty text or an integer; leave it out to use a hash of the problem"
        if value is None:
            return None
        if isinstance(value, str) and value.strip():
            return self.encodable("unique_id", value)
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return str(int(value))
        raise self.refuse("unique_id", value, want)

    def level(self) -> int | None:
        value = self.record.get("level")
        low, high = LEVEL_RANGE
        want = f"a level is an integer in [{low}, {high}] (or 'Level N'), or null"
        number = value
        if value is None:
            return None
        if isinstance(value, str):
            digits = self.encodable("level", value).strip().removeprefix("Level").removeprefix("level").strip()
            if digits in ("", "?"):  # MATH writes "Level ?" where the level is unknown
                return None
            number = int(digits) if digits.isascii() and digits.isdigit() else None
        elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
            number = int(value)
        if isinstance(number, int) and not isinstance(number, bool) and low <= number <= high:
            return number
        raise self.refuse("level", value, want)


def load_problems(dataset: str, *, split: str = "test", limit: int | None = None, shard_size: int = 50) -> pa.Table:
    """Problems in data set order, each with its id and shard; `limit` keeps the first K.

    Every kept row is checked here, before anything starts: a bad value is one error naming its row and field.
    """
    records = read_records(dataset, split)
    if not records:
        raise PipelineError(f"data set {dataset} has no rows: pass a file with at least one problem")
    records = records[:limit] if limit else records
    rows, seen = [], {}
    for index, record in enumerate(records):
        row = _Row(dataset, index + 1, record)
        text = row.text("problem", required=True)
        uid = row.uid()
        pid = problem_id({"problem": text, "unique_id": uid})
        if pid in seen:
            # Without a unique_id the id is the problem's hash: the repeated value is then the problem.
            field, fix = ("unique_id", "give each row its own id") if uid is not None else (
                "problem", "give the rows unique_ids, or remove the repeat"
            )
            raise PipelineError(
                f"{row.where}: '{field}' makes the problem id {pid!r}, which appears twice (first in row {seen[pid]}); "
                f"ids must be unique: {fix}"
            )
        seen[pid] = index + 1
        rows.append(
            {
                "problem_id": pid,
                "problem_index": index,
                "shard_id": index // shard_size,
                "problem": text,
                "gold": row.text("answer", required=False),
                "subject": row.label("subject"),
                "level": row.level(),
            }
        )
    return pa.Table.from_pylist(rows, schema=PROBLEM_SCHEMA)
