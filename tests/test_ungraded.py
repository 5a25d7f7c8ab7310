"""Problems without a gold answer are not graded: every number is over the graded ones, and the outputs say how many
were left out. Generated runs (random golds present or absent, random right and confident candidates): each run's
numbers equal those of the same run without its ungraded problems."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pytest
from test_shards_reduce import fake_rows

from ray_pipeline.graded_run import grade_run
from ray_pipeline.metrics import compare
from ray_pipeline.reduce import reduce_run
from ray_pipeline.report import compare_run, report_markdown
from ray_pipeline.run import print_comparison
from ray_pipeline.selection import SelectionParams
from ray_pipeline.shards import ShardWriter

pytestmark = pytest.mark.fast
N = 3


def problems(seed: int) -> list[dict]:
    """Per problem: its gold ("1" or None), the right candidate (-1: none) and the most certain one."""
    rng = random.Random(seed)
    count = rng.randint(3, 9)
    golds = [None if rng.random() < 0.4 else "1" for _ in range(count)]
    if seed % 3 == 0:
        golds[rng.randrange(count)] = "1"  # at least one graded
    return [{"gold": g, "right": rng.randint(-1, N - 1), "best": rng.randrange(N)} for g in golds]


def write_run(folder, spec: list[dict]):
    tables = []
    for index, p in enumerate(spec):
        rows = fake_rows(index, 0, N, p["right"], p["best"])
        golds = pa.array([p["gold"]] * N, pa.string())
        tables.append(rows.set_column(rows.schema.get_field_index("gold"), "gold", golds))
    ShardWriter(folder / "shards", {0: N * len(spec)}).add(pa.concat_tables(tables))
    return folder


def numbers(run, params) -> dict:
    results, _, sweep = compare(run, params)
    keep = ("accuracy", "ci95", "auroc", "by_level", "by_subject")
    return {"methods": {name: {k: r.summary[k] for k in keep} for name, r in results.items()}, "sweep": sweep}


@pytest.mark.parametrize("seed", range(8))
def test_a_run_counts_only_its_graded_problems(seed, tmp_path):
    spec = problems(seed)
    graded = [p for p in spec if p["gold"] is not None]
    params = SelectionParams()
    whole = grade_run(write_run(tmp_path / "whole", spec) / "shards", params)
    assert whole.problems - whole.graded == len(spec) - len(graded)
    if graded:
        alone = grade_run(write_run(tmp_path / "graded", graded) / "shards", params)
        assert numbers(whole, params) == numbers(alone, params)
    summary = reduce_run(tmp_path / "whole" / "shards", tmp_path / "best.jsonl", method="self-certainty")
    hits = sum(p["right"] == p["best"] for p in graded)
    assert summary.ungraded == len(spec) - len(graded)
    assert summary.accuracy == (pytest.approx(hits / len(graded)) if graded else None)
    oracle = sum(p["right"] >= 0 for p in graded)
    assert summary.pass_at_n == (pytest.approx(oracle / len(graded)) if graded else None)
    lines = [json.loads(line) for line in (tmp_path / "best.jsonl").read_text().splitlines()]
    assert [line["correct"] is None for line in lines] == [p["gold"] is None for p in spec]


def test_the_report_and_the_table_say_how_many_were_not_graded(tmp_path, capsys):
    spec = [
        {"gold": "1", "right": 0, "best": 0},
        {"gold": None, "right": 1, "best": 1},
        {"gold": "1", "right": -1, "best": 2},
    ]
    comparison = compare_run(write_run(tmp_path, spec), SelectionParams())
    assert comparison["ungraded"] == 1 and comparison["methods"]["self-certainty"]["accuracy"] == pytest.approx(0.5)
    report = (tmp_path / "report.md").read_text()
    assert "**Not graded**: 1 of the 3 problems have no gold answer" in report and "over the other 2" in report
    print_comparison(comparison)
    assert "3 problems x 3 candidates (1 without a gold answer, not graded), pass@3 0.500" in capsys.readouterr().out


def test_a_run_without_any_gold_answer_has_no_accuracy_and_writes_json(tmp_path, capsys):
    spec = [{"gold": None, "right": 0, "best": 0}, {"gold": None, "right": -1, "best": 1}]
    comparison = compare_run(write_run(tmp_path, spec), SelectionParams())
    assert comparison["pass_at_n"] is None and comparison["methods"]["self-certainty"]["accuracy"] is None
    text = (tmp_path / "summary.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"summary.json holds {name}"))
    assert "2 of the 2 problems have no gold answer" in report_markdown("run", comparison)
    print_comparison(comparison)
    assert "pass@3 —" in capsys.readouterr().out
