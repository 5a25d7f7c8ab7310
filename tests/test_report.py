"""The comparison report and the reduce job, on small hand-made shards (no model)."""

import dataclasses
import json
import math
from itertools import product

import pyarrow as pa
import pytest

from conftest import run_job
from jobs.reduce import main as reduce_main
from ray_pipeline.config import RunConfig, config_fields
from ray_pipeline.graded_run import grade_table, question_rows_table
from ray_pipeline.metrics import ALPHA_GRID, auroc, compare, wilson_interval
from ray_pipeline.plots import PLOTS, shown_sizes
from ray_pipeline.report import compare_run, report_markdown
from ray_pipeline.selection import METHODS, SelectionParams
from ray_pipeline.shards import SHARD_SCHEMA, ShardWriter

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def question_rows(index, preds, gold, certainty, level, subject):
    """One question's candidates: answer `preds[k]` with self-certainty `certainty[k]`."""
    rows = []
    for k, (pred, sc) in enumerate(zip(preds, certainty)):
        row = {name: None for name in SHARD_SCHEMA.names}
        row.update(
            problem_id=f"p{index}",
            problem_index=index,
            shard_id=0,
            problem=f"question {index}",
            gold=gold,
            subject=subject,
            level=level,
            candidate_index=k,
            text=f"... \\boxed{{{pred}}}",
            token_count=4,
            pred=pred,
            correct=pred == gold,
            mean_entropy=1.0,
            mean_self_certainty=sc,
            step_self_certainty=[sc + 1.0, sc],
            step_entropy=[1.0, 1.0],
            step_texts=["setup", f"so {pred}"],
            token_confidence=[sc, sc, sc, sc],
            coe_magnitude=[sc, 1.0],
            coe_angle=[0.5, 0.5],
            coe_span_magnitude=2.0,
            coe_span_angle=1.0,
            vocab_size=100,
        )
        rows.append(row)
    return rows


@pytest.fixture
def run_dir(tmp_path):
    """Three questions x 4 candidates. q0: the most certain is right; q1: the majority is right, the most
    certain wrong; q2: nobody is right."""
    rows = (
        question_rows(0, ["1", "2", "3", "2"], "1", [3.0, 1.0, 1.5, 1.2], 1, "Algebra")
        + question_rows(1, ["5", "4", "4", "4"], "4", [3.0, 1.0, 1.1, 1.2], 2, "Geometry")
        + question_rows(2, ["8", "8", "9", "7"], "6", [1.0, 2.0, 1.5, 1.2], 2, "Algebra")
    )
    ShardWriter(tmp_path / "shards", {0: 12}).add(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA))
    RunConfig(num_return_sequences=4).save(tmp_path / "config.json")
    (tmp_path / "summary.json").write_text(json.dumps({"backend": "hf", "accuracy": 0.5}))
    return tmp_path


def test_wilson_interval_known_values():
    assert wilson_interval(8, 10) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    low, high = wilson_interval(0, 4)
    assert low == 0.0 and high == pytest.approx(0.4899, abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_auroc_equals_the_pairwise_definition():
    scores = [0.1, 0.4, 0.4, 0.8, 0.3, 0.9, 0.4, math.nan]
    labels = [False, True, False, True, False, True, True, True]
    pairs = [(s, y) for s, y in zip(scores, labels) if not math.isnan(s)]
    pos = [s for s, y in pairs if y]
    neg = [s for s, y in pairs if not y]
    want = sum((p > n) + 0.5 * (p == n) for p, n in product(pos, neg)) / (len(pos) * len(neg))
    assert auroc(scores, labels) == pytest.approx(want)
    assert auroc([1, 2, 3], [False, True, True]) == 1.0 and auroc([3, 2, 1], [False, True, True]) == 0.0
    assert math.isnan(auroc([1, 2], [True, True]))


def test_comparison_writes_report_summary_debug_and_plots(run_dir):
    comparison = compare_run(run_dir, SelectionParams())
    methods = comparison["methods"]
    assert set(methods) == set(METHODS) - {"self-eval", "deepconf-online"}
    assert "--self_eval" in comparison["unavailable"]["self-eval"]
    assert comparison["pass_at_n"] == pytest.approx(2 / 3)
    # Certainty picks q0 right, q1 wrong; the majority gets q1 but not q0 (2 is the majority there).
    assert methods["self-certainty"]["accuracy"] == pytest.approx(1 / 3)
    assert methods["self-consistency"]["accuracy"] == pytest.approx(1 / 3)
    assert methods["baseline"]["accuracy"] == pytest.approx(1 / 3) and methods["baseline"]["auroc"] is None
    assert methods["self-certainty"]["by_level"] == {"1": {"accuracy": 1.0, "n": 1}, "2": {"accuracy": 0.0, "n": 2}}
    assert methods["self-consistency"]["by_subject"]["Geometry"] == {"accuracy": 1.0, "n": 1}
    # N' = 1 over each question's first candidate: the first candidate for every method.
    assert {m["accuracy_by_first_n"][1] for m in methods.values()} == {1 / 3}
    assert comparison["pass_at_n_by_first_n"] == {1: 1 / 3, 2: 2 / 3, 3: 2 / 3, 4: 2 / 3}
    # Random subsets: at N' = 1 every method takes the one candidate it is given, the same draws for all; at
    # N' = N every subset is the whole question, so the curve ends at the method's accuracy.
    assert len({m["accuracy_by_n"][1] for m in methods.values()}) == 1
    assert all(m["accuracy_by_n"][4] == m["accuracy"] for m in methods.values())
    # Unbiased pass@k: q0 has 1 of 4 right, q1 3 of 4, q2 none: 1 - C(n - c, k) / C(n, k) averaged.
    want = {1: (1 / 4 + 3 / 4) / 3, 2: (1 / 2 + 1) / 3, 3: (3 / 4 + 1) / 3, 4: 2 / 3}
    assert comparison["pass_at_n_by_n"] == pytest.approx(want)
    # Borda ranks by token self-certainty by default, so it does not depend on alpha.
    assert set(comparison["accuracy_by_alpha"]) == {"self-certainty", "weighted-vote"}
    assert list(comparison["accuracy_by_alpha"]["weighted-vote"]) == [str(a) for a in ALPHA_GRID]
    # Token certainty is SC / log V, monotone in SC.
    # Right: 3.0, 1.0, 1.1, 1.2; wrong: 1.0, 1.5, 1.2, 3.0, 1.0, 2.0, 1.5, 1.2.
    # Wins (ties half) over the 32 pairs: 7.5 + 1 + 2 + 3.
    assert methods["self-certainty-token"]["auroc"] == pytest.approx(13.5 / 32)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["backend"] == "hf" and summary["comparison"]["problems"] == 3
    report = (run_dir / "report.md").read_text()
    assert "| self-certainty | 33.3 |" in report and "| pass@4 (oracle) | 66.7 |" in report
    assert "self-eval: not available" in report and "## Accuracy by level" in report
    for file in PLOTS.values():
        assert (run_dir / file).read_bytes()[:8] == PNG_MAGIC
    debug = [json.loads(line) for line in (run_dir / "debug.jsonl").read_text().splitlines()]
    assert [d["unique_id"] for d in debug] == ["p0", "p1", "p2"]
    chosen = debug[0]["methods"]["self-certainty"]
    assert chosen["candidate_index"] == 0 and chosen["correct"] is True
    assert chosen["key_step"] == {"index": 1, "text": "so 1", "score": pytest.approx(3.0 / math.log(100))}


def other_value(f: dataclasses.Field):
    """A valid value of config field `f` other than its default."""
    meta = f.metadata
    if isinstance(f.default, bool):
        return not f.default
    if meta["choices"]:
        return next(c for c in meta["choices"] if c != f.default)
    step = 1 if isinstance(f.default, int) else 0.25
    return f.default + step if meta["high"] is None or f.default + step <= meta["high"] else f.default - step


def test_every_selection_parameter_reaches_summary_and_report(run_dir):
    fields = [f for f in config_fields("selection") if f.name != "method"]
    values = {f.name: other_value(f) for f in fields}
    params = SelectionParams.from_config(dataclasses.replace(RunConfig(), **values).validate())
    comparison = compare_run(run_dir, params)
    assert comparison["params"] == values and list(comparison["params"]) == [f.name for f in fields]
    assert json.loads((run_dir / "summary.json").read_text())["comparison"]["params"] == values
    report = (run_dir / "report.md").read_text()
    for name, value in values.items():
        shown = ("on" if value else "off") if isinstance(value, bool) else str(value)
        assert f"{name} {shown}" in report, name


def test_reduce_job_reselects_with_fewer_candidates_and_other_flags(run_dir):
    proc = run_job("jobs.reduce", str(run_dir), "--method", "self-consistency", "--num_return_sequences", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in (run_dir / "best_self-consistency.jsonl").read_text().splitlines()]
    # q0 and q1: two different answers tie and the first wins; q2: both answers agree.
    assert [line["candidate_index"] for line in lines] == [0, 0, 0]
    proc = run_job("jobs.reduce", str(run_dir), "--method", "all", "--alpha", "1.0", "--n_repetitive_sampling", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    comparison = json.loads((run_dir / "summary.json").read_text())["comparison"]
    assert comparison["candidates_per_problem"] == 3 and comparison["params"]["alpha"] == 1.0
    assert "self-consistency" in proc.stdout and "Comparison saved to" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num_return_sequences", "5"], "num_return_sequences must be in [1, 4] (the run's candidates per problem)"),
        (["--method", "magic"], "method must be one of"),
        (["--method", "self-eval"], "method self-eval needs self_eval"),
        (["--alpha", "2"], "alpha must be in [0.0, 1.0], got 2.0"),
    ],
)
def test_reduce_job_bad_flags_are_one_line_errors(run_dir, args, message, capsys):
    assert reduce_main([str(run_dir), *args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_reduce_job_needs_a_run_folder(tmp_path, capsys):
    assert reduce_main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path} has no config.json: " + (
        "pass a run folder written by jobs.infer or jobs.main"
    )


def answerless_questions():
    """Two questions whose most certain candidate has no extracted answer, and one without any such candidate."""
    rows = (
        question_rows(0, [None, "4", "5", "4"], "4", [3.0, 1.0, 2.0, 1.2], 1, "Algebra")
        + question_rows(1, ["6", None, "6", "7"], "6", [1.0, 2.5, 1.5, 1.2], 1, "Algebra")
        + question_rows(2, ["8", "8", "9", "7"], "8", [1.0, 2.0, 1.5, 1.2], 2, "Algebra")
    )
    for row in rows:
        if row["pred"] is None:
            row["text"], row["correct"] = "... no final answer", False
        row["token_confidence"] = [row["mean_self_certainty"]] * 4
    return [rows[i : i + 4] for i in range(0, 12, 4)]


def graded(questions, params):
    return grade_table(question_rows_table(questions), params, workers=1)


def test_report_counts_the_picks_the_answerless_rule_changed():
    questions = answerless_questions()
    results, _, _ = compare(graded(questions, SelectionParams()), SelectionParams())
    changed = {name: r.summary["answerless_last_changed"] for name, r in results.items()}
    # Every argmax over a certainty moves off the answerless candidate on q0 and q1. Entropy is equal
    # everywhere, so it takes the first candidate, and the first with an answer: only q0 changes.
    for name in ("self-certainty", "self-certainty-token", "self-certainty-step", "lowest-group", "tail"):
        assert changed[name] == 2, name
    assert changed["entropy"] == 1
    # Votes never give an answerless candidate the pick; baseline is the first candidate by definition.
    assert changed["baseline"] == changed["self-consistency"] == changed["borda"] == changed["weighted-vote"] == 0
    # q0: self-certainty picks "5" (certainty 2.0) over the answerless 3.0; q1: "6" (1.5) over the answerless 2.5.
    assert results["self-certainty"].picks.index.tolist() == [2, 2, 1]
    plain_params = SelectionParams(answerless_last=False)
    plain, _, _ = compare(graded(questions, plain_params), plain_params)
    assert plain["self-certainty"].picks.index.tolist() == [0, 1, 1]
    assert all(r.summary["answerless_last_changed"] is None for r in plain.values())

    comparison = {
        "problems": 3,
        "candidates_per_problem": 4,
        "params": {
            "alpha": 0.4,
            "lambda_weight": 1.0,
            "borda_power": 0.5,
            "borda_score": "token",
            "deepconf_window": 2048,
            "answerless_last": True,
        },
        "pass_at_n": 1.0,
        "pass_at_n_by_n": {k: 1.0 for k in range(1, 5)},
        "curve_draws": 32,
        "methods": {name: r.summary | {"accuracy_by_n": {k: 0.5 for k in range(1, 5)}} for name, r in results.items()},
        "accuracy_by_alpha": {},
        "unavailable": {},
        "reduce_s": 0.1,
    }
    report = report_markdown("run", comparison)
    assert "| method | accuracy | 95 % CI | AUROC | answerless-last changed |" in report
    row = next(line for line in report.splitlines() if line.startswith("| self-certainty |"))
    assert row.endswith("| 2 |") and "answerless_last on" in report
    curve = {"accuracy_by_n": {k: 0.5 for k in range(1, 5)}}
    comparison["methods"] = {name: r.summary | curve for name, r in plain.items()}
    comparison["params"]["answerless_last"] = False
    report = report_markdown("run", comparison)
    assert next(line for line in report.splitlines() if line.startswith("| self-certainty |")).endswith("| — |")


def test_shown_sizes_name_every_n_up_to_16_then_powers_of_two_and_n():
    for n in range(1, 17):
        assert shown_sizes(n) == list(range(1, n + 1))
    for n in range(17, 300):
        sizes = shown_sizes(n)
        assert sizes[0] == 1 and sizes[-1] == n and sizes == sorted(set(sizes))
        assert all(k == n or k & (k - 1) == 0 for k in sizes)
        assert len(sizes) <= n.bit_length() + 1
