"""Prompt + --max_tokens within the context, per problem, on every backend (the generator checks each prompt before
its backend sees it): a problem that cannot fit becomes error rows that say so, the others generate within the
context, and a run where none fits is refused before Ray starts. Generated cases on the in-process seam with the
tiny model (SmolLM2's tokenizer and chat template): problem lengths, --max_tokens, --max_model_len, prompt styles.
"""

from __future__ import annotations

import json
import random

import pyarrow.parquet as pq
import pytest

from conftest import run_in_process
from ray_pipeline import run
from ray_pipeline.config import build_parser, config_from_args
from ray_pipeline.errors import PipelineError
from ray_pipeline.problem_set import embedded_records
from ray_pipeline.prompts import build_prompt


def cases(count: int, seed: int) -> list[tuple[int, int, str, int]]:
    """(max_model_len, max_tokens, prompt style, data seed)."""
    rng = random.Random(seed)
    return [
        (rng.choice([120, 160, 240]), rng.choice([4, 16, 48, 100]), rng.choice(["original", "chat"]), s)
        for s in range(count)
    ]


def problems(seed: int) -> list[dict]:
    """Embedded problems, some made longer by repeating their text."""
    rng = random.Random(seed)
    rows = embedded_records("embedded:6")
    for row in rows:
        row["problem"] = " ".join([row["problem"]] * rng.choice([1, 1, 2, 4]))
    return rows


@pytest.mark.parametrize("limit,max_tokens,style,seed", cases(8, seed=5))
def test_each_problem_fits_its_prompt_and_max_tokens_or_says_why(tiny_model, tmp_path, limit, max_tokens, style, seed):
    from transformers import AutoTokenizer

    rows = problems(seed)
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    length = {r["unique_id"]: len(tokenizer(build_prompt(r["problem"], style, tokenizer))["input_ids"]) for r in rows}
    over = {uid for uid, n in length.items() if n + max_tokens > limit}
    args = ["--dataset", str(data), "--model_path", tiny_model, "--max_model_len", str(limit), "--max_tokens"]
    args += [str(max_tokens), "--prompt", style, "--num_return_sequences", "2", "--temperature", "0.8", "--backend"]
    args += ["hf", "--shard_size", "3", "--output_dir", str(tmp_path / "out"), "--run_id", "run"]
    if over == set(length):
        config = config_from_args(build_parser("jobs.infer").parse_args(args))
        with pytest.raises(PipelineError) as refused:
            with run.plan(config, "python -m jobs.infer", args):
                pass
        shortest = min(length.values())
        assert str(refused.value).startswith(f"no problem fits the context: the shortest prompt has {shortest} tokens")
        assert f"pass a --max_tokens up to {limit - shortest}" in str(refused.value)
        return
    printed = run_in_process("jobs.infer", *args)
    table = pq.read_table(tmp_path / "out" / "run" / "shards").to_pylist()
    assert {r["problem_id"] for r in table if r["error"]} == over, printed
    for r in table:
        uid = r["problem_id"]
        if r["error"]:
            assert r["error"] == (
                f"prompt has {length[uid]} tokens, {length[uid] + max_tokens} with --max_tokens {max_tokens}: "
                f"over the context length {limit}"
            )
        else:
            assert len(r["prompt_token_ids"]) == length[uid]
            assert r["token_count"] <= max_tokens and length[uid] + r["token_count"] <= limit
