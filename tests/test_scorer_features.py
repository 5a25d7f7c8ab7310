"""The scorer's method inputs (DeepConf confidence, CoE features, self-eval) on the real SmolLM2 weights.

Candidates are fixed texts scored by teacher forcing, so the expected values come from plain,
unchunked forward passes of the same model.
"""

import math

import pyarrow as pa
import pytest
import torch

from actors.scorer import ScorerActor
from ray_pipeline.config import RunConfig
from ray_pipeline.data import load_problems
from ray_pipeline.prompts import build_prompt, build_self_eval_prompt
from ray_pipeline.scores import coe_transitions
from ray_pipeline.selection import self_certainty_score
from ray_pipeline.shards import CANDIDATE_SCHEMA

RESPONSES = [
    "We add the numbers.\n\n2 + 2 = 4.\n\nThe answer is \\boxed{4}.",
    "Let x be the value.\nThen x = 3.\nSo \\boxed{3}",
    "\\boxed{7}",
]


@pytest.fixture(scope="module")
def scorer():
    # float32 weights, so the comparisons below can be tight; lambda < 1 exercises the certainty mix.
    config = RunConfig(dtype="float32", self_eval=True, lambda_weight=0.5, alpha=0.3, score_batch_size=2)
    return ScorerActor(config.validate())


@pytest.fixture(scope="module")
def candidates(scorer):
    problems = load_problems(f"embedded:{len(RESPONSES)}").to_pylist()
    rows = []
    for k, (problem, text) in enumerate(zip(problems, RESPONSES)):
        prompt = build_prompt(problem["problem"], "original")
        rows.append(
            problem
            | {
                "candidate_index": k,
                "prompt_token_ids": scorer.tokenizer(prompt)["input_ids"],
                "token_ids": scorer.tokenizer(text, add_special_tokens=False)["input_ids"],
                "text": text,
                "finish_reason": "stop",
                "generator_logprobs": [],
                "backend": "fixed",
            }
        )
    return pa.Table.from_pylist(rows, schema=CANDIDATE_SCHEMA)


@pytest.fixture(scope="module")
def scored(scorer, candidates):
    return scorer(candidates).to_pylist()


def full_forward(model, row, **kwargs):
    ids = torch.tensor([row["prompt_token_ids"] + row["token_ids"]])
    with torch.inference_mode():
        return model(ids, **kwargs)


def test_token_confidence_is_minus_mean_top_k_logprob(scorer, scored):
    for row in scored:
        logits = full_forward(scorer.model, row).logits[0].double()
        first = len(row["prompt_token_ids"]) - 1
        logp = torch.log_softmax(logits[first : first + row["token_count"]], -1)
        want = -logp.topk(20, dim=-1).values.mean(-1)
        torch.testing.assert_close(
            torch.tensor(row["token_confidence"], dtype=torch.float64), want, atol=2e-3, rtol=1e-4
        )


def test_coe_features_are_those_of_the_models_own_hidden_states(scorer, scored):
    layers = scorer.model.config.num_hidden_layers
    for row in scored:
        hidden = full_forward(scorer.model, row, output_hidden_states=True).hidden_states
        first = len(row["prompt_token_ids"]) - 1
        means = torch.stack([h[0, first : first + row["token_count"]].double().mean(0) for h in hidden])
        want = coe_transitions(means)
        assert len(row["coe_magnitude"]) == len(row["coe_angle"]) == layers
        torch.testing.assert_close(
            torch.tensor(row["coe_magnitude"], dtype=torch.float64), want.magnitude, rtol=1e-4, atol=1e-4
        )
        torch.testing.assert_close(
            torch.tensor(row["coe_angle"], dtype=torch.float64), want.angle, rtol=1e-4, atol=1e-4
        )
        assert row["coe_span_magnitude"] == pytest.approx(want.span_magnitude, rel=1e-4)
        assert row["coe_span_angle"] == pytest.approx(want.span_angle, rel=1e-4)


def test_self_eval_asks_about_each_step(scorer, scored):
    yes, no = scorer.options
    for row in scored:
        texts = row["step_texts"]
        assert "".join(texts) == scorer.tokenizer.decode(row["token_ids"])
        assert len(row["step_self_eval"]) == len(texts) == len(row["step_self_certainty"]) == len(row["step_entropy"])
        for s, got in enumerate(row["step_self_eval"]):
            prompt = build_self_eval_prompt(row["problem"], texts[:s], texts[s], "original")
            ids = torch.tensor([scorer.tokenizer(prompt)["input_ids"]])
            with torch.inference_mode():
                logits = scorer.model(ids).logits[0, -1].double()
            want = torch.softmax(logits[[yes, no]], -1)[0].item()
            assert got == pytest.approx(want, abs=1e-4)
    assert [len(r["step_texts"]) for r in scored] == [3, 3, 1]


def test_the_scorer_stores_measurements_only(scorer, scored):
    """What depends on selection settings or answer extraction is the reducer's: no such column in a shard."""
    for row in scored:
        assert not {"pred", "correct", "self_certainty_score", "lowest_step"} & set(row)
        assert math.isfinite(self_certainty_score(row, 0.3, 0.5))


def test_empty_response_has_no_method_inputs(scorer, candidates):
    row = candidates.slice(0, 1).to_pylist()[0] | {"token_ids": [], "text": ""}
    scored = scorer(pa.Table.from_pylist([row], schema=CANDIDATE_SCHEMA)).to_pylist()[0]
    assert scored["token_confidence"] == [] and scored["step_texts"] == [] and scored["step_self_eval"] == []
    assert scored["coe_magnitude"] is None and math.isnan(scored["coe_span_angle"])
