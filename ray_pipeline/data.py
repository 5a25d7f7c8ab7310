"""Loading MATH-500 style problems and planning them into shards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa

from ray_pipeline.errors import PipelineError

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


def problem_id(row: dict) -> str:
    """The row's `unique_id`, else a stable hash of the problem text."""
    uid = row.get("unique_id")
    if uid:
        return str(uid)
    return "sha1:" + hashlib.sha1(row["problem"].encode("utf-8")).hexdigest()[:16]


def _is_local(dataset: str) -> bool:
    return dataset.endswith(LOCAL_SUFFIXES) or dataset.startswith(("/", ".", "~")) or Path(dataset).exists()


def read_records(dataset: str, split: str = "test") -> list[dict]:
    """Raw rows of a local .jsonl/.json/.parquet file or of a Hub data set."""
    if _is_local(dataset):
        return _read_local(Path(dataset).expanduser())
    try:
        import datasets

        return list(datasets.load_dataset(dataset, split=split))
    except Exception as exc:  # noqa: BLE001 - offline, unknown id and bad split all mean the same to the user
        raise PipelineError(
            f"cannot load data set {dataset!r} from the Hub ({type(exc).__name__}); "
            "pass a local .jsonl or .parquet file, e.g. --dataset ../shared/data/math500.jsonl"
        ) from None


def _read_local(path: Path) -> list[dict]:
    if not path.is_file():
        raise PipelineError(f"data set file {path} does not exist: pass an existing .jsonl/.json/.parquet file")
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        text = path.read_bytes().decode("utf-8")
        if path.suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text)
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise PipelineError(f"data set {path}: line {n} is not valid JSON") from None
        return rows
    except UnicodeDecodeError as exc:
        raise PipelineError(f"data set {path} is not UTF-8 text (byte {exc.start}): re-encode it as UTF-8") from None
    except (OSError, pa.ArrowException, json.JSONDecodeError) as exc:
        raise PipelineError(f"cannot read data set {path}: {exc}") from None


def load_problems(dataset: str, *, split: str = "test", limit: int | None = None, shard_size: int = 50) -> pa.Table:
    """Problems in data set order, each with its id and shard; `limit` keeps the first K."""
    records = read_records(dataset, split)
    if not records:
        raise PipelineError(f"data set {dataset} has no rows")
    if not all(isinstance(r, dict) and "problem" in r for r in records):
        raise PipelineError(f"data set {dataset} has no 'problem' column in every row: each row needs a 'problem' text")
    records = records[:limit] if limit else records
    rows, seen = [], set()
    for index, record in enumerate(records):
        text = record["problem"]
        if not isinstance(text, str) or not text.strip():
            raise PipelineError(f"data set {dataset}: problem {index} is empty; remove it or fill it in")
        pid = problem_id(record)
        if pid in seen:
            raise PipelineError(f"data set {dataset}: problem id {pid!r} appears twice; ids must be unique")
        seen.add(pid)
        level = record.get("level")
        rows.append(
            {
                "problem_id": pid,
                "problem_index": index,
                "shard_id": index // shard_size,
                "problem": text,
                "gold": None if record.get("answer") is None else str(record["answer"]),
                "subject": record.get("subject"),
                "level": int(level) if isinstance(level, (int, float)) or str(level).isdigit() else None,
            }
        )
    return pa.Table.from_pylist(rows, schema=PROBLEM_SCHEMA)
