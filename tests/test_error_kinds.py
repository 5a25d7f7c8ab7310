"""Kinds of failure, each tested as a kind over generated cases rather than one example.

- Output names: two run ids never share an output (best-answer file or run folder), over generated
  ids, data sets and models; default names stay as they were.
- Refused data values: every one names its file, its row and its field (lone surrogates included).
- Hints: every `--flag` a job prints is a flag of the job it names, else of the job that prints it.
- A `--max_tokens` that leaves no room in the model's context is refused before Ray starts.

No Ray cluster: every job here stops before Ray would start (the fast tier's guard would fail it).
"""

from __future__ import annotations

import json
import math
import random
import re
import string
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import infer, main, reduce
from ray_pipeline.data import load_problems
from ray_pipeline.errors import PipelineError
from ray_pipeline.manifest import best_file_name, dataset_name, default_run_id, fingerprint_hash

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


