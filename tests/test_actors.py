"""Generator and scorer actors on a small batch, without Ray, with the real SmolLM2 weights."""

import asyncio
import dataclasses
import math

import pyarrow as pa
import pytest
import torch

from actors.generator import GeneratorActor
from actors.scorer import ScorerActor
from ray_pipeline.columns import candidate_rows
from ray_pipeline.config import RunConfig
from ray_pipeline.data import load_problems
from ray_pipeline.shards import CANDIDATE_SCHEMA, GENERATED_SCHEMA, SHARD_SCHEMA


@pytest.fixture(scope="module")
def config():
    # float32 weights, so the comparisons below can be tight (bf16 logits round to ~0.1 nat).
    return RunConfig(
        backend="hf", dtype="float32", num_return_sequences=2, max_tokens=24, temperature=0.7, seed=11
    ).validate()


@pytest.fixture(scope="module")
def problems():
    return load_problems("embedded:3", shard_size=2)


def generate_problems(config, problems):
    """The generator's stream as it comes: one row per problem, with its candidates."""

    async def collect():
        return [table async for table in GeneratorActor(config)(problems)]

    return pa.concat_tables(asyncio.run(collect()))


def generate(config, problems):
    """All candidates of the generator's stream, one row each, in problem and candidate order."""
    table = pa.Table.from_pylist(candidate_rows(generate_problems(config, problems)), schema=CANDIDATE_SCHEMA)
    return table.sort_by([("problem_index", "ascending"), ("candidate_index", "ascending")])


def test_generator_hands_on_whole_problems(config, problems):
    """One row per problem holding its N candidates: Ray Data cannot split a problem between scorer batches."""
    table = generate_problems(config, problems)
    assert table.schema == GENERATED_SCHEMA
    assert sorted(table.column("problem_index").to_pylist()) == [0, 1, 2]
    for candidates in table.column("candidates").to_pylist():
        assert [c["candidate_index"] for c in candidates] == [0, 1]


@pytest.fixture(scope="module")
def candidates(config, problems):
    return generate(config, problems)


@pytest.fixture(scope="module")
def scorer(config):
    """One pass per candidate: its values are the reference the grouped passes are held to."""
    return ScorerActor(dataclasses.replace(config, score_pass="candidate"))


def test_generator_returns_n_candidates_per_problem(candidates, problems):
    assert candidates.schema == CANDIDATE_SCHEMA
    rows = candidates.to_pylist()
    assert len(rows) == problems.num_rows * 2
    assert [(r["problem_index"], r["candidate_index"]) for r in rows] == [(i, k) for i in range(3) for k in range(2)]
    for r in rows:
        assert 1 <= len(r["token_ids"]) <= 24
        assert r["finish_reason"] in ("stop", "length")
        assert r["prompt_token_ids"] and r["backend"] == "hf"
        assert (r["finish_reason"] == "length") == (len(r["token_ids"]) == 24 and r["token_ids"][-1] != 2)


def test_generation_is_reproducible_with_the_seed(config, problems, candidates):
    again = generate(config, problems)
    assert again.column("token_ids").to_pylist() == candidates.column("token_ids").to_pylist()


def test_scorer_adds_scores_in_range(scorer, candidates):
    scored = scorer(candidates)
    assert scored.schema == SHARD_SCHEMA
    for r in scored.to_pylist():
        n = r["token_count"]
        assert n == len(r["token_ids"]) == len(r["token_entropy"]) == len(r["token_self_certainty"])
        assert min(r["token_entropy"]) >= 0 and min(r["token_self_certainty"]) >= 0
        assert max(r["token_logprob"]) <= 1e-6
        assert 0 <= r["mean_entropy"] <= torch.log(torch.tensor(49152.0)).item()
        assert len(r["step_self_certainty"]) == len(r["step_texts"]) >= 1 and r["vocab_size"] == 49152
        assert "".join(r["step_texts"]) == scorer.tokenizer.decode(r["token_ids"])


def test_scorer_matches_a_plain_full_logits_forward_pass(scorer, candidates):
    """The chunked reduction over hidden states equals log_softmax of the model's own logits."""
    scored = scorer(candidates.slice(0, 3))
    model = scorer.model
    for r in scored.to_pylist():
        ids = torch.tensor([r["prompt_token_ids"] + r["token_ids"]])
        with torch.inference_mode():
            logits = model(ids).logits[0].float()
        first = len(r["prompt_token_ids"]) - 1
        logp = torch.log_softmax(logits[first : first + r["token_count"]], -1)
        want_lp = logp.gather(-1, torch.tensor(r["token_ids"])[:, None]).squeeze(-1)
        want_h = -(logp.exp() * logp).sum(-1)
        torch.testing.assert_close(torch.tensor(r["token_logprob"]), want_lp, atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(torch.tensor(r["token_entropy"]), want_h, atol=2e-3, rtol=1e-3)


def test_scorer_values_do_not_depend_on_the_batch(scorer, candidates):
    """Rows arriving in any batch split and order get identical values (a redone shard equals the first)."""
    together = scorer(candidates)
    alone = pa.concat_tables([scorer(candidates.slice(i, 1)) for i in range(candidates.num_rows)])
    order = [4, 1, 5, 0, 3, 2]
    shuffled = pa.concat_tables([scorer(candidates.take(order[:2])), scorer(candidates.take(order[2:]))])
    shuffled = shuffled.sort_by([("problem_index", "ascending"), ("candidate_index", "ascending")])
    assert alone.equals(together) and shuffled.equals(together)


def test_empty_response_gets_nan_scores(scorer, candidates):
    row = candidates.slice(0, 1).to_pylist()[0] | {"token_ids": [], "text": ""}
    scored = scorer(pa.Table.from_pylist([row], schema=CANDIDATE_SCHEMA)).to_pylist()[0]
    assert scored["token_count"] == 0 and scored["token_entropy"] == []
    assert scored["mean_self_certainty"] != scored["mean_self_certainty"]  # NaN


@pytest.fixture(scope="module")
def problem_scorer(config):
    return ScorerActor(dataclasses.replace(config, score_pass="problem"))


def problem_rows(candidates: pa.Table) -> pa.Table:
    """Candidate rows regrouped as the generators hand them on (GENERATED_SCHEMA)."""
    problems: dict[str, dict] = {}
    for row in candidates.to_pylist():
        problem = {k: row[k] for k in GENERATED_SCHEMA.names if k != "candidates"}
        candidate = {k: v for k, v in row.items() if k not in problem}
        problems.setdefault(row["problem_id"], problem | {"candidates": []})["candidates"].append(candidate)
    return pa.Table.from_pylist(list(problems.values()), schema=GENERATED_SCHEMA)


def assert_same_scores(got: list[dict], want: list[dict]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g["step_texts"] == w["step_texts"] and g["token_count"] == w["token_count"]
        for name in ("token_entropy", "token_self_certainty", "token_logprob", "token_confidence", "coe_magnitude"):
            torch.testing.assert_close(torch.tensor(g[name]), torch.tensor(w[name]), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_problem_passes_match_candidate_passes(scorer, problem_scorer, candidates, padding_side, monkeypatch):
    """One padded pass over a problem's candidates gives each its own pass's values, on either padding side."""
    lengths = [len(t) for t in candidates.column("token_ids").to_pylist()]
    assert len(set(lengths)) > 1, "the test needs candidates of different lengths, so that padding happens"
    assert [len(g) for g in problem_scorer.passes(candidates.to_pylist())] == [2, 2, 2]
    monkeypatch.setattr(problem_scorer.tokenizer, "padding_side", padding_side)
    assert_same_scores(problem_scorer(candidates).to_pylist(), scorer(candidates).to_pylist())


def test_problem_passes_split_at_the_token_budget(config, scorer, candidates):
    """A problem whose candidates exceed --score_pass_tokens fills several passes, in candidate order."""
    rows = candidates.to_pylist()
    longest = max(len(r["prompt_token_ids"]) + len(r["token_ids"]) for r in rows)
    small = ScorerActor(dataclasses.replace(config, score_pass="problem", score_pass_tokens=longest))
    passes = small.passes(rows)
    assert [[r["candidate_index"] for r in p] for p in passes] == [[0], [1]] * 3
    assert_same_scores(small(candidates).to_pylist(), scorer(candidates).to_pylist())


def test_a_problem_pass_skips_candidates_without_tokens(scorer, problem_scorer, candidates):
    """An empty or failed candidate gets NaN scores; its problem's other candidates keep their values."""
    rows = candidates.to_pylist()
    rows[0] |= {"token_ids": [], "text": ""}
    rows[3] |= {"error": "vLLM refused the request"}
    table = pa.Table.from_pylist(rows, schema=CANDIDATE_SCHEMA)
    assert [[r["candidate_index"] for r in p] for p in problem_scorer.passes(rows)] == [[1], [0], [0, 1]]
    got, alone = problem_scorer(table).to_pylist(), scorer(table).to_pylist()
    for i in (0, 3):
        assert got[i]["token_count"] == 0 and math.isnan(got[i]["mean_self_certainty"])
    kept = [1, 2, 4, 5]
    assert_same_scores([got[i] for i in kept], [alone[i] for i in kept])


def scored_in_three_splits(scorer, problems: pa.Table) -> tuple[pa.Table, pa.Table, pa.Table]:
    """`problems` scored as one batch, one problem a batch, and in two shuffled batches (put back in order)."""
    together = scorer(problems)
    alone = pa.concat_tables([scorer(problems.slice(i, 1)) for i in range(problems.num_rows)])
    shuffled = pa.concat_tables([scorer(problems.take([2, 0])), scorer(problems.take([1]))])
    order = [("problem_index", "ascending"), ("candidate_index", "ascending")]
    return together, alone, shuffled.sort_by(order)


def test_problem_passes_do_not_depend_on_the_batch(problem_scorer, candidates):
    """Problem rows in any batch split and order get identical values, and equal the candidate rows' values."""
    together, alone, shuffled = scored_in_three_splits(problem_scorer, problem_rows(candidates))
    assert together.schema == SHARD_SCHEMA and together.num_rows == candidates.num_rows
    assert alone.equals(together) and shuffled.equals(together)
    assert problem_scorer(candidates).equals(together)


@pytest.fixture(scope="module")
def prefix_scorer(config):
    return ScorerActor(dataclasses.replace(config, score_pass="prefix"))


def test_prefix_passes_match_candidate_passes(scorer, prefix_scorer, candidates):
    """The prompt once, then each response on its cached keys and values: each candidate's own pass's values."""
    rows = candidates.to_pylist()
    assert [[r["candidate_index"] for r in p] for p in prefix_scorer.passes(rows)] == [[0, 1]] * 3
    got, want = prefix_scorer(candidates).to_pylist(), scorer(candidates).to_pylist()
    assert_same_scores(got, want)
    for g, w in zip(got, want):
        for name in ("coe_angle", "step_self_certainty"):
            torch.testing.assert_close(torch.tensor(g[name]), torch.tensor(w[name]), atol=1e-3, rtol=1e-4)
        assert abs(g["coe_span_magnitude"] - w["coe_span_magnitude"]) <= 1e-3 * max(1.0, abs(w["coe_span_magnitude"]))


def test_prefix_passes_handle_one_token_and_failed_candidates(scorer, prefix_scorer, candidates):
    """A one-token response is scored from the prompt's last position alone; empty or failed ones get NaN."""
    rows = candidates.to_pylist()
    rows[0] |= {"token_ids": rows[0]["token_ids"][:1]}
    rows[1] |= {"token_ids": [], "text": ""}
    rows[3] |= {"error": "vLLM refused the request"}
    table = pa.Table.from_pylist(rows, schema=CANDIDATE_SCHEMA)
    got, want = prefix_scorer(table).to_pylist(), scorer(table).to_pylist()
    assert got[0]["token_count"] == 1
    for i in (1, 3):
        assert got[i]["token_count"] == 0 and math.isnan(got[i]["mean_self_certainty"])
    kept = [0, 2, 4, 5]
    assert_same_scores([got[i] for i in kept], [want[i] for i in kept])


def test_prefix_passes_do_not_depend_on_the_batch(prefix_scorer, candidates):
    """Problem rows in any batch split and order get identical values (a redone shard equals the first)."""
    together, alone, shuffled = scored_in_three_splits(prefix_scorer, problem_rows(candidates))
    assert alone.equals(together) and shuffled.equals(together)
