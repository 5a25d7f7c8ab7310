"""Generator and scorer actors on a small batch, without Ray, with the real SmolLM2 weights."""

import asyncio

import pyarrow as pa
import pytest
import torch

from actors.generator import GeneratorActor
from actors.scorer import ScorerActor
from ray_pipeline.config import RunConfig
from ray_pipeline.data import load_problems
from ray_pipeline.shards import CANDIDATE_SCHEMA, SHARD_SCHEMA


@pytest.fixture(scope="module")
def config():
    # float32 weights, so the comparisons below can be tight (bf16 logits round to ~0.1 nat).
    return RunConfig(
        backend="hf", dtype="float32", num_return_sequences=2, max_tokens=24, temperature=0.7, seed=11
    ).validate()


@pytest.fixture(scope="module")
def problems():
    from conftest import require_math500

    return load_problems(str(require_math500()), limit=3, shard_size=2)


def generate(config, problems):
    """All candidates of the generator's stream, in problem and candidate order."""

    async def collect():
        return [table async for table in GeneratorActor(config)(problems)]

    table = pa.concat_tables(asyncio.run(collect()))
    return table.sort_by([("problem_index", "ascending"), ("candidate_index", "ascending")])


@pytest.fixture(scope="module")
def candidates(config, problems):
    return generate(config, problems)


@pytest.fixture(scope="module")
def scorer(config):
    return ScorerActor(config)


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
