"""The reducer's side of DeepConf online: the online vote as a method, and the tokens-vs-accuracy table.

The method must pick what `deepconf.online_vote` (the online run's own rule) picks, on random online
problems; the table's simulated rows must hold the tokens and votes of `deepconf.replay_problem` run
problem by problem on the same traces.
"""

import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.bench.reduce import synthesize_run
from ray_pipeline import deepconf
from ray_pipeline.answer_classes import group_answers
from ray_pipeline.deepconf import OnlineSettings
from ray_pipeline.grading import grade_and_group
from ray_pipeline.reduce import select_questions
from ray_pipeline.report import compare_run
from ray_pipeline.selection import MethodUnavailable, SelectionParams
from ray_pipeline.shards import shard_path

pytestmark = pytest.mark.fast


def online_problem(rng: random.Random, n: int) -> list[dict]:
    threshold = rng.choice([2.0, 3.0, 4.0])
    cands = []
    for k in range(n):
        phase = "warmup" if k < 3 else rng.choice(["final", "final", "skipped"])
        length = 0 if phase == "skipped" else rng.randint(1, 12)
        cands.append(
            {
                "pred": rng.choice(["1", "2", "\\frac{1}{2}", "0.5", None]),
                "token_count": length,
                "phase": phase,
                "stop_threshold": threshold,
                # Engine confidences live on DeepConf's 2^-16 grid; small integers are on it.
                "engine_confidence": [float(rng.randint(1, 6)) for _ in range(length)],
            }
        )
    return cands


def same_answer(a: str, b: str) -> bool:
    return a == b or {a, b} == {"\\frac{1}{2}", "0.5"}


def test_the_online_method_picks_what_the_online_rule_picks():
    rng = random.Random(0)
    params = SelectionParams(deepconf_window=3)
    voted = 0
    for _ in range(150):
        cands = online_problem(rng, rng.randint(4, 12))
        (choice,) = select_questions([cands], "deepconf-online", params)
        # The reference: the module's rule on the same classes (1/2 and 0.5 are one class).
        classes = group_answers([c["pred"] for c in cands], same_answer)
        lowest = np.array(
            [deepconf.lowest_group_confidence(c["engine_confidence"], 3) if c["token_count"] else np.nan for c in cands]
        )
        launched = np.array([c["phase"] != "skipped" for c in cands])
        vote = deepconf.online_vote(lowest, classes, launched, cands[0]["stop_threshold"])
        if vote.winner < 0:
            assert choice.index == 0
            continue
        voted += 1
        members = np.where((classes == vote.winner) & (vote.weights > 0), vote.weights, -np.inf)
        assert choice.index == int(np.argmax(members))
        assert choice.score == pytest.approx(vote.share)
    assert voted > 50


def test_the_online_method_is_unavailable_on_a_full_run():
    with pytest.raises(MethodUnavailable, match="--generation deepconf-online"):
        select_questions([[{"pred": "1", "token_count": 2}]], "deepconf-online", SelectionParams())


@pytest.fixture(scope="module")
def full_run_with_engine_confidences(tmp_path_factory):
    """A synthetic full run with engine confidences on DeepConf's grid, as --engine_confidence stores them."""
    run = synthesize_run(tmp_path_factory.mktemp("online") / "run", 12, 16, tokens=40, shard_size=12, seed=5)
    path = shard_path(run / "shards", 0)
    table = pq.read_table(path)
    rng = np.random.default_rng(0)
    engine = [np.rint(rng.normal(5, 1.2, n) * 2**16) / 2**16 for n in table["token_count"].to_pylist()]
    import pyarrow as pa

    column = pa.array([e.tolist() for e in engine], type=table.schema.field("engine_confidence").type)
    table = table.set_column(table.schema.get_field_index("engine_confidence"), "engine_confidence", column)
    pq.write_table(table, path)
    return run, engine


def test_the_table_simulates_deepconf_on_a_full_run(full_run_with_engine_confidences):
    run, engine = full_run_with_engine_confidences
    settings = OnlineSettings(window=8, warmup=4, percentile=90.0)
    comparison = compare_run(run, SelectionParams(deepconf_window=8, answer_extraction="math-verify"), online=settings)
    rows = {r["name"]: r for r in comparison["tokens_vs_accuracy"]}
    assert list(rows)[0] == "full self-consistency" and rows["full self-consistency"]["tokens_vs_reference"] == 1.0
    assert rows["full self-consistency"]["accuracy"] == comparison["methods"]["self-consistency"]["accuracy"]
    assert rows["full self-consistency"]["tokens"] == sum(len(e) for e in engine)
    debug = [json.loads(line) for line in (run / "debug.jsonl").read_text().splitlines()]
    # Replay problem by problem with the module's own simulator, on the reducer's answer classes.
    for name, percentile in (("DeepConf-low online (simulated)", 90.0), ("DeepConf-high online (simulated)", 10.0)):
        tokens, right = 0, 0
        for p, record in enumerate(debug):
            classes = grade_and_group(record["preds"], record["gold"]).labels
            replay = deepconf.replay_problem(engine[16 * p : 16 * (p + 1)], classes, OnlineSettings(8, 4, percentile))
            tokens += replay.tokens
            if replay.vote.winner >= 0:
                weights = np.where((classes == replay.vote.winner) & (replay.vote.weights > 0), replay.vote.weights, -1)
                right += record["correct"][int(np.argmax(weights))]
        assert rows[name]["tokens"] == tokens, name
        assert rows[name]["tokens"] < rows["full self-consistency"]["tokens"]
        assert rows[name]["accuracy"] == right / len(debug), name
    report = (run / "report.md").read_text()
    assert "## Tokens vs accuracy" in report and "DeepConf-low online (simulated)" in report


def test_a_run_without_engine_confidences_has_no_table(tmp_path):
    run = synthesize_run(tmp_path / "run", 4, 4, tokens=16, seed=2)
    comparison = compare_run(run, SelectionParams(), online=OnlineSettings(8, 2, 90.0))
    assert comparison["tokens_vs_accuracy"] is None
    assert "Tokens vs accuracy" not in (run / "report.md").read_text()


def test_the_confidence_methods_read_the_engines_confidences_where_the_run_stored_them(tmp_path):
    """lowest-group, tail and deepconf-* read each candidate's engine confidences when it has one per token (online
    runs, --engine_confidence), else the scorer's teacher-forced ones; the report says which. Generated runs: none,
    some and all candidates with stored engine confidences."""
    import pyarrow as pa

    from ray_pipeline.deepconf import lowest_group_confidence, tail_confidence
    from ray_pipeline.graded_run import grade_run

    params = SelectionParams(deepconf_window=4)
    for share, expected in ((0.0, "scorer"), (0.5, "engine where stored"), (1.0, "engine")):
        run = synthesize_run(tmp_path / f"run-{share}", 6, 8, tokens=20, shard_size=6, seed=3)
        path = shard_path(run / "shards", 0)
        table = pq.read_table(path)
        rng = np.random.default_rng(int(share * 10))
        counts = table["token_count"].to_pylist()
        stored = [bool(n) and rng.random() < share if share < 1 else True for n in counts]
        engine = [np.rint(rng.normal(2, 0.5, n) * 2**16) / 2**16 if s else None for n, s in zip(counts, stored)]
        kind = table.schema.field("engine_confidence").type
        column = pa.array([None if e is None else e.tolist() for e in engine], kind)
        at = table.schema.get_field_index("engine_confidence")
        pq.write_table(table.set_column(at, "engine_confidence", column), path)
        graded = grade_run(run / "shards", params, workers=1)
        scorer = pq.read_table(path, columns=["token_confidence"])["token_confidence"].to_pylist()
        for i, n in enumerate(counts):
            if not n:
                continue
            own = engine[i] if engine[i] is not None else np.asarray(scorer[i], dtype=np.float64)
            assert graded.values["lowest_group"][i] == lowest_group_confidence(own, 4)
            assert graded.values["tail"][i] == tail_confidence(own, 4)
        assert graded.confidence_source.startswith(expected), (share, graded.confidence_source)
        compare_run(run, params, graded=graded)
        report = (run / "report.md").read_text()
        word = {"scorer": "scorer's confidences", "engine": "sampling engine's"}.get(expected, "engine where stored")
        assert "The confidence methods (lowest-group, tail, deepconf-*) read the" in report and word in report
