"""Every value a shard or run folder holds is checked before it is trusted, on mutated copies of a real run.

The run is the session's `main_run` (real Ray, the embedded weights, every score column filled). Each test
mutates a copy of its folder, one kind of stored value at a time, over every member of the kind: every float
column with NaN, +inf or -inf; problem ids swapped, foreign or moved between shards; the manifest's shard
plan edited in every field; config.json keys misspelt; a folder another job holds. Both readers must refuse
in one line that names the file and the value: the resume (`run.plan`, which redoes a shard it cannot
trust or refuses a plan that is not the run's) and `jobs.reduce` (exit status 2, one `error:` line). What
a stage legitimately writes (NaN scores of a candidate without response tokens) is accepted.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.reduce import main as reduce_main
from ray_pipeline import run
from ray_pipeline.config import build_parser, config_from_args
from ray_pipeline.errors import PipelineError
from ray_pipeline.graded_run import reducer_columns
from ray_pipeline.shards import FLOAT_COLUMNS, shard_path

pytest_plugins = ["shared_runs"]


def resume_plan(main_run, run_dir: Path):
    """What the run's own jobs.infer command plans for the folder (no Ray): its shards to do and its notes."""
    argv = [*main_run.infer_args, "--output_dir", str(run_dir.parent)]
    config = config_from_args(build_parser("jobs.infer").parse_args(argv))
    with run.plan(config, "python -m jobs.infer", argv) as plan:
        return plan.todo, plan.notes


def reduce_error(run_dir: Path, capsys, *flags: str) -> str:
    """jobs.reduce's one error line on the folder (it must refuse)."""
    capsys.readouterr()
    assert reduce_main([str(run_dir), *flags]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def rewrite_shard(path: Path, column: str, row: int, value) -> None:
    """The shard with one value of `column` replaced (in a list, one element; an empty list gets one), metadata kept."""
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    if pa.types.is_list(table.schema.field(column).type):
        items = list(values[row] or [])
        if items:
            items[random.Random(row).randrange(len(items))] = value
        else:
            items = [value]
        values[row] = items
    else:
        values[row] = value
    index = table.schema.get_field_index(column)
    table = table.set_column(index, table.schema.field(column), pa.array(values, table.schema.field(column).type))
    pq.write_table(table, path)


NON_FINITE = (math.nan, math.inf, -math.inf)
# Every float column of a shard, each with one non-finite kind (the kinds cycle, so each kind meets several types).
FLOAT_CASES = [(name, NON_FINITE[i % 3]) for i, name in enumerate(FLOAT_COLUMNS)]


@pytest.mark.parametrize("column,value", FLOAT_CASES, ids=[f"{c}={v}" for c, v in FLOAT_CASES])
def test_a_float_no_stage_writes_is_refused(main_run, tmp_path, capsys, column, value):
    run_dir = main_run.copy(tmp_path)
    path = shard_path(run_dir / "shards", 1)
    tokens = pq.read_table(path, columns=["token_count"]).column("token_count").to_pylist()
    row = next(i for i, count in enumerate(tokens) if count)
    rewrite_shard(path, column, row, value)
    todo, notes = resume_plan(main_run, run_dir)
    assert todo == [1], notes
    assert any(note.startswith("shard 1: ") and column in note and "redo" in note for note in notes), notes
    line = reduce_error(run_dir, capsys)
    assert "shard 1 " in line and column in line and str(value) in line, line
    # With no manifest nothing proves the shards complete, but the values the methods read are checked before use.
    (run_dir / "manifest.json").unlink()
    if column in reducer_columns():
        line = reduce_error(run_dir, capsys, "--method", "all")
        assert "shard-00001.parquet" in line and column in line, line
    else:
        assert reduce_main([str(run_dir), "--method", "all"]) == 0


def test_no_score_of_a_candidate_without_tokens_is_what_the_scorer_writes(main_run, tmp_path, capsys):
    """The scorer's own row for an empty response (columns.empty_scores: NaN scalar scores) is trusted."""
    from ray_pipeline.columns import COLUMNS

    run_dir = main_run.copy(tmp_path)
    path = shard_path(run_dir / "shards", 0)
    table = pq.read_table(path)
    for c in COLUMNS:
        if c.stage == "scorer" and c.name != "vocab_size":
            values = table.column(c.name).to_pylist()
            values[0] = list(c.empty) if isinstance(c.empty, list) else c.empty
            table = table.set_column(table.schema.get_field_index(c.name), c.name, pa.array(values, c.type))
    pq.write_table(table, path)
    assert resume_plan(main_run, run_dir)[0] == []
    capsys.readouterr()
    assert reduce_main([str(run_dir), "--method", "all"]) == 0, capsys.readouterr().err
    assert reduce_main([str(run_dir), "--method", "self-certainty"]) == 0, capsys.readouterr().err
    assert reduce_main([str(run_dir), "--method", "deepconf-lowest-group-10"]) == 0, capsys.readouterr().err
    json.loads((run_dir / "summary.json").read_text(), parse_constant=not_json)
    for best in run_dir.glob("best_*.jsonl"):
        for line in best.read_text().splitlines():
            json.loads(line, parse_constant=not_json)


def not_json(name: str):
    pytest.fail(f"an output holds {name}, which is not JSON")


def id_mutations(ids: list[str], shard_of: list[int]) -> list[tuple[str, dict[int, str]]]:
    """Ways to put a wrong id on a problem's rows (problem index -> new id), in shard 1."""
    ones = [i for i, s in enumerate(shard_of) if s == 1]
    zero = next(i for i, s in enumerate(shard_of) if s == 0)
    return [
        ("foreign", {ones[0]: "foreign/problem.json"}),
        ("swapped within the shard", {ones[0]: ids[ones[1]], ones[1]: ids[ones[0]]}),
        ("another shard's", {ones[-1]: ids[zero]}),
        ("empty", {ones[0]: ""}),
    ]


@pytest.mark.parametrize("kind", range(4), ids=["foreign", "swapped", "another-shards", "empty"])
def test_a_problem_id_that_is_not_the_plans_is_refused(main_run, tmp_path, capsys, kind):
    run_dir = main_run.copy(tmp_path)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    ids = [i for s in sorted(manifest["shards"], key=int) for i in manifest["shards"][s]["problem_ids"]]
    shard_of = [int(s) for s in sorted(manifest["shards"], key=int) for _ in manifest["shards"][s]["problem_ids"]]
    _, changes = id_mutations(ids, shard_of)[kind]
    path = shard_path(run_dir / "shards", 1)
    table = pq.read_table(path)
    held = zip(table.column("problem_index").to_pylist(), table.column("problem_id").to_pylist())
    rows = [changes.get(p, pid) for p, pid in held]
    table = table.set_column(table.schema.get_field_index("problem_id"), "problem_id", pa.array(rows, pa.string()))
    pq.write_table(table, path)
    problem = min(changes)
    todo, notes = resume_plan(main_run, run_dir)
    assert todo == [1] and any(f"problem {problem} has id" in note for note in notes), notes
    line = reduce_error(run_dir, capsys)
    assert "shard 1 " in line and f"problem {problem} has id" in line and "the plan's is" in line, line


def plan_edits(shards: dict[str, dict]) -> list[tuple[str, callable]]:
    """Every field of the manifest's shard plan edited, and shards dropped and added."""

    def drop(s):
        s.pop("1")

    def add(s):
        s["2"] = dict(s["1"])

    def fewer_problems(s):
        s["0"]["problems"] -= 1

    def more_rows(s):
        s["1"]["rows"] += 1

    def other_id(s):
        s["1"]["problem_ids"][0] = "foreign/problem.json"

    def reordered_ids(s):
        s["0"]["problem_ids"].reverse()

    def renumbered(s):
        s["5"] = s.pop("1")

    return [
        ("a shard dropped", drop),
        ("a shard added", add),
        ("fewer problems", fewer_problems),
        ("more rows", more_rows),
        ("another problem id", other_id),
        ("problem ids reordered", reordered_ids),
        ("a shard renumbered", renumbered),
    ]


PLAN_EDITS = [name for name, _ in plan_edits({})]


@pytest.mark.parametrize("edit", PLAN_EDITS)
def test_an_edited_shard_plan_is_refused_by_the_resume_and_the_reducer(main_run, tmp_path, capsys, edit):
    run_dir = main_run.copy(tmp_path)
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    dict(plan_edits(manifest["shards"]))[edit](manifest["shards"])
    path.write_text(json.dumps(manifest))
    with pytest.raises(PipelineError) as refused:
        resume_plan(main_run, run_dir)
    message = str(refused.value)
    assert str(path) in message and "shard plan" in message and "--overwrite" in message, message
    assert len(message.splitlines()) == 1
    line = reduce_error(run_dir, capsys)
    assert str(path) in line and "shard plan" in line, line


def typos(name: str, rng: random.Random) -> list[str]:
    """A dropped, a doubled and two swapped letters."""
    i = rng.randrange(1, len(name) - 1)
    swapped = name[: i - 1] + name[i] + name[i - 1] + name[i + 1 :]
    return [name[:i] + name[i + 1 :], name[:i] + name[i] + name[i:], swapped]


TYPO_CASES = [
    (field, typo)
    for field in ("alpha", "lambda_weight", "method", "answer_extraction", "num_return_sequences", "temperature")
    for typo in typos(field, random.Random(field))
    if typo != field
]


@pytest.mark.parametrize("field,typo", TYPO_CASES)
def test_a_misspelt_config_key_is_refused_naming_it(main_run, tmp_path, capsys, field, typo):
    run_dir = main_run.copy(tmp_path)
    path = run_dir / "config.json"
    saved = json.loads(path.read_text())
    saved[typo] = saved.pop(field)
    path.write_text(json.dumps(saved))
    line = reduce_error(run_dir, capsys)
    assert str(path) in line and f"'{typo}'" in line and f"did you mean '{field}'" in line, line


def test_the_reducer_waits_for_no_job_that_holds_the_folder(main_run, tmp_path, capsys):
    from ray_pipeline.storage import StoragePath

    run_dir = main_run.copy(tmp_path)
    with StoragePath.parse(run_dir).lock():
        line = reduce_error(run_dir, capsys)
    assert "is in use by another job" in line and "wait for that job to end" in line, line
    capsys.readouterr()
    assert reduce_main([str(run_dir)]) == 0
    line = reduce_error(tmp_path / "nowhere", capsys)
    assert "does not exist" in line and not (tmp_path / "nowhere").exists(), line


@pytest.mark.parametrize("shard", [0, 1])
def test_a_folder_where_a_shard_file_belongs_is_named(main_run, tmp_path, capsys, shard):
    run_dir = main_run.copy(tmp_path)
    path = shard_path(run_dir / "shards", shard)
    path.unlink()
    (path / "part-0.parquet").mkdir(parents=True)
    with pytest.raises(PipelineError) as refused:
        resume_plan(main_run, run_dir)
    assert str(refused.value) == f"{path} is a folder, not a shard file: remove or rename it"
    line = reduce_error(run_dir, capsys)
    assert f"shard {shard} " in line and "a folder, not a shard file" in line, line
