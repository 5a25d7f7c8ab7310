"""Loading problems from local files and planning shards."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_pipeline.data import load_problems, problem_id
from ray_pipeline.errors import PipelineError
from ray_pipeline.problem_set import embedded_records


def write_math500_style(path, n: int) -> list[dict]:
    """`n` rows in MATH-500's file format (problem, solution, answer, subject, level, unique_id), written here from
    the embedded set; the first has a gold answer in MATH's LaTeX, kept as text."""
    rows = []
    for i, row in enumerate(embedded_records(f"embedded:{n}")):
        subject = row["subject"].lower().replace(" & ", "_").replace(" ", "_")
        rows.append(
            row
            | {
                "solution": f"We compute it.\n\nSo the answer is $\\boxed{{{row['answer']}}}$.",
                "unique_id": f"test/{subject}/{100 + i}.json",
            }
        )
    rows[0] |= {
        "answer": "\\left( 2, \\frac{\\pi}{3} \\right)",
        "subject": "Precalculus",
        "level": 2,
        "unique_id": "test/precalculus/100.json",
    }
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_math500_rows_keep_ids_and_fields(tmp_path):
    written = write_math500_style(tmp_path / "math500.jsonl", 9)
    table = load_problems(str(tmp_path / "math500.jsonl"), limit=7, shard_size=3)
    rows = table.to_pylist()
    assert len(rows) == 7
    assert rows[0]["problem_id"] == "test/precalculus/100.json"
    assert rows[0]["gold"] == "\\left( 2, \\frac{\\pi}{3} \\right)"
    assert rows[0]["subject"] == "Precalculus" and rows[0]["level"] == 2
    assert [(r["problem_id"], r["problem"], r["gold"]) for r in rows] == [
        (w["unique_id"], w["problem"], w["answer"]) for w in written[:7]
    ]
    assert [r["shard_id"] for r in rows] == [0, 0, 0, 1, 1, 1, 2]
    assert [r["problem_index"] for r in rows] == list(range(7))


def test_full_math500_loads(tmp_path):
    write_math500_style(tmp_path / "math500.jsonl", 500)
    table = load_problems(str(tmp_path / "math500.jsonl"), shard_size=50)
    assert table.num_rows == 500
    assert len(set(table.column("problem_id").to_pylist())) == 500
    assert max(table.column("shard_id").to_pylist()) == 9


def test_parquet_and_hash_ids(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "answer": "4"}]), path)
    rows = load_problems(str(path)).to_pylist()
    assert rows[0]["problem_id"] == problem_id({"problem": "1+1?"}) and rows[0]["problem_id"].startswith("sha1:")
    assert rows[1]["gold"] == "4"
    assert problem_id({"problem": "1+1?"}) == problem_id({"problem": "1+1?", "unique_id": None})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"question": "x"}\n', "row 1 has no 'problem' field"),
        (b'{"problem": "  "}\n', "row 1: 'problem' is empty"),
        (b'{"problem": "caf\xe9"}\n', "is not UTF-8 text"),
        (b'{"problem": "a"}\n{broken\n', "line 2 is not valid JSON"),
        (b"", "has no rows"),
        (b'{"problem": "a", "unique_id": "x"}\n{"problem": "b", "unique_id": "x"}\n', "appears twice"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(PipelineError) as err:
        load_problems(str(path))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_file_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(PipelineError, match="does not exist"):
        load_problems(str(tmp_path / "nope.jsonl"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(PipelineError, match="pass a local .jsonl/.json/.parquet file with --dataset"):
        load_problems("no-such-owner/no-such-dataset-xyz")


def test_json_array_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"problem": "a", "answer": 4}, {"problem": "b"}]))
    rows = load_problems(str(path)).to_pylist()
    assert rows[0]["gold"] == "4" and rows[1]["gold"] is None
    assert load_problems(str(path), limit=1).num_rows == 1
