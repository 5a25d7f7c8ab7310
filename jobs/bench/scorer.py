"""Benchmark: the scorer actor's `__call__` against a bare forward pass of the same model over the same token batches.

    python -m jobs.bench.scorer --dataset math500.jsonl --limit 16 --num_return_sequences 4 --max_tokens 128
    python -m jobs.bench.scorer --dataset math500.jsonl --dummy_shape qwen2.5-math-1.5b --max_tokens 1024 \\
        --record benchmarks/scorer-1.5b.json

Responses are synthetic: `--max_tokens` random token ids per candidate (seeded), with a newline
about every 16 tokens and a blank line about every 64, so responses have steps. The scorer runs
its forward passes (`--score_pass`: one per candidate, or one per problem's N candidates); the
bare pass is the model's decoder (no head, no hooks, no statistics) on exactly those passes,
same dtype and device (CUDA and bf16 when a GPU is there, with `--dtype auto`). The two
alternate batch by batch, so a busy machine slows both alike. A second, synchronized scorer run
splits its time into stages (forward, CoE hooks, chunked statistics, host work, self-eval). Also
shown, for reference: the bare forward over right-padded batches of `--score_batch_size` candidates.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from pathlib import Path

import pyarrow as pa

from actors.scorer import ScorerActor
from jobs.bench.dummy_model import DUMMY_SHAPES, write_random_model
from jobs.bench.records import write_record
from ray_pipeline.config import build_parser, config_from_args
from ray_pipeline.data import load_problems
from ray_pipeline.errors import exit_status
from ray_pipeline.model import model_name
from ray_pipeline.prompts import build_prompt
from ray_pipeline.shards import CANDIDATE_SCHEMA

FIELDS = (
    "dataset",
    "limit",
    "num_return_sequences",
    "max_tokens",
    "model_path",
    "dtype",
    "seed",
    "prompt",
    "self_eval",
    "score_batch_size",
    "score_pass",
    "score_chunk_tokens",
    "score_chunk_vocab",
    "cpus_per_actor",
)
TARGET_RATIO = 0.75


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__.strip().splitlines()[0], FIELDS)
    parser.add_argument("--dummy_shape", choices=sorted(DUMMY_SHAPES), help="random-weight model of this shape")
    parser.add_argument("--bench_dir", default="/tmp/bestofn-bench", help="scratch folder for random models")
    parser.add_argument("--record", help="also write the result with device, date and commit to this JSON file")
    parser.set_defaults(limit=16, num_return_sequences=4, max_tokens=128)
    args = parser.parse_args(argv)
    return exit_status(lambda: _run(args))


def synthetic_rows(problems: list[dict], tokenizer, config) -> list[dict]:
    """`num_return_sequences` candidates per problem of `max_tokens` random ids each, with newlines."""
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
    rng = random.Random(config.seed)
    rows = []
    for p in problems:
        prompt = tokenizer(build_prompt(p["problem"], config.prompt, tokenizer))["input_ids"]
        for k in range(config.num_return_sequences):
            ids = []
            for j in range(config.max_tokens):
                ids.append(newline if j % 16 == 15 or j % 64 == 62 else rng.randrange(len(tokenizer)))
            rows.append(
                p
                | {
                    "candidate_index": k,
                    "prompt_token_ids": prompt,
                    "token_ids": ids,
                    "text": tokenizer.decode(ids),
                    "finish_reason": "length",
                    "generator_logprobs": [],
                    "backend": "synthetic",
                }
            )
    return rows


def _run(args: argparse.Namespace) -> None:
    import torch

    config = config_from_args(args)
    if args.dummy_shape:
        folder = write_random_model(DUMMY_SHAPES[args.dummy_shape], Path(args.bench_dir) / f"{args.dummy_shape}-random")
        config = dataclasses.replace(config, model_path=str(folder))
    cuda = torch.cuda.is_available()
    if cuda and config.dtype == "auto":
        config = dataclasses.replace(config, dtype="bfloat16")
    problems = load_problems(config.dataset, limit=config.limit).to_pylist()
    scorer = ScorerActor(config)
    rows = synthetic_rows(problems, scorer.tokenizer, config)
    table = pa.Table.from_pylist(rows, schema=CANDIDATE_SCHEMA)
    # As the pipeline hands them on: whole problems, score_batch_size // N of them a batch.
    n = config.num_return_sequences
    size = max(1, config.score_batch_size // n) * n
    batches = [(rows[s : s + size], table.slice(s, size)) for s in range(0, len(rows), size)]
    model = model_name(config.model_path) if not args.dummy_shape else f"{args.dummy_shape} (random weights)"
    print(f"model {model} | {len(problems)} problems x N={config.num_return_sequences} x {config.max_tokens} tokens"
          f" | {scorer.device} {next(scorer.model.parameters()).dtype} | {len(batches)} batches of {size}"
          f" | {scorer.config.score_pass} passes", flush=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def bare(batch_rows):
        with torch.inference_mode():
            for group in scorer.passes(batch_rows):
                if not scorer.prefix_passes:
                    scorer.decoder(input_ids=scorer.pass_inputs(group), use_cache=False)
                    continue
                # The same tokens as the scorer's prefix pass: the prompt once, each response on its cache.
                prompt = torch.tensor([group[0]["prompt_token_ids"]], device=scorer.device)
                cache = scorer.decoder(input_ids=prompt, use_cache=True).past_key_values
                for row in group:
                    if ids := row["token_ids"][:-1]:
                        step = torch.tensor([ids], device=scorer.device)
                        scorer.decoder(input_ids=step, past_key_values=cache, use_cache=True)
                        cache.crop(-len(ids))

    def padded(batch_rows):
        seqs = [r["prompt_token_ids"] + r["token_ids"] for r in batch_rows]
        batch = scorer.tokenizer.pad({"input_ids": seqs}, padding=True, padding_side="right", return_tensors="pt")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with torch.inference_mode():
            scorer.decoder(input_ids=ids.to(scorer.device), attention_mask=mask.to(scorer.device))

    cpu_seconds = {"scorer": 0.0, "bare_forward": 0.0, "bare_padded_batches": 0.0}

    def timed(fn, arg, name=None) -> float:
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        fn(arg)
        sync()
        if name:
            cpu_seconds[name] += time.process_time() - cpu_start
        return time.perf_counter() - start

    # Warm-up: kernels, allocator, the first call's lazy set-up.
    scorer(batches[0][1].slice(0, 1))
    bare(batches[0][0][:1])
    seconds = dict.fromkeys(cpu_seconds, 0.0)
    for i, (batch_rows, batch_table) in enumerate(batches):
        runs = [("bare_forward", bare, batch_rows), ("scorer", scorer, batch_table)]
        # Alternate which goes first, so neither always runs on a warmer cache or a quieter machine.
        for name, fn, arg in runs if i % 2 == 0 else runs[::-1]:
            seconds[name] += timed(fn, arg, name)
        seconds["bare_padded_batches"] += timed(padded, batch_rows, "bare_padded_batches")
    # The breakdown: a second scorer run that waits for the device at each stage's end.
    scorer.profile.clear()
    scorer.synchronize = True
    profiled = sum(timed(scorer, t) for _, t in batches)
    stages = dict(scorer.profile)
    # Hooks run inside the forward pass: report the forward net of them.
    stages["forward"] = stages.get("forward", 0.0) - stages.get("coe_hooks", 0.0)
    stages["other"] = profiled - sum(stages.values())

    pass_tokens = full_tokens = sum(len(r["prompt_token_ids"]) + len(r["token_ids"]) for r in rows)
    if scorer.prefix_passes:
        # Tokens the passes compute: each problem's prompt once, each response but its last token.
        groups = [g for _, t in batches for g in scorer.passes(t.to_pylist())]
        pass_tokens = sum(len(g[0]["prompt_token_ids"]) + sum(len(r["token_ids"]) - 1 for r in g) for g in groups)
    response_tokens = sum(len(r["token_ids"]) for r in rows)
    ratio = seconds["bare_forward"] / seconds["scorer"]
    # On a shared CPU the wall clock also counts other processes' load; CPU seconds do not.
    cpu_ratio = cpu_seconds["bare_forward"] / cpu_seconds["scorer"]
    print(f"\n{'stage':<22}{'seconds':>10}{'tokens/s':>12}{'CPU s':>10}")
    # The padded-batches reference computes every candidate's prompt, whatever the scorer's passes.
    tokens = {name: full_tokens if name == "bare_padded_batches" else pass_tokens for name in seconds}
    for name, s in seconds.items():
        print(f"{name:<22}{s:>10.2f}{tokens[name] / s:>12.0f}{cpu_seconds[name]:>10.2f}")
    verdict = "meets" if ratio >= TARGET_RATIO else "below"
    print(f"\nratio bare forward / scorer: {ratio:.3f} ({verdict} the {TARGET_RATIO} target)")
    if not cuda:
        print(f"ratio in CPU seconds: {cpu_ratio:.3f}")
    print(f"\nscorer profile (synchronized run, {profiled:.2f} s):")
    for name, s in sorted(stages.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<20}{s:>8.2f} s {100 * s / profiled:>6.1f} %")
    if args.record:
        write_record(
            args.record,
            {
                "model": model,
                "problems": len(problems),
                "N": config.num_return_sequences,
                "max_tokens": config.max_tokens,
                "dtype": str(next(scorer.model.parameters()).dtype),
                "score_batch_size": size,
                "score_pass": scorer.config.score_pass,
                "chunks": [scorer.token_chunk, scorer.vocab_chunk],
                "pass_tokens": pass_tokens,
                "response_tokens": response_tokens,
                "stages": {n: {"seconds": s, "tokens_per_s": tokens[n] / s} for n, s in seconds.items()},
                "profile_seconds": stages,
                "ratio": ratio,
                "cpu_seconds": cpu_seconds,
                "cpu_ratio": cpu_ratio,
            },
        )
        print(f"record written to {args.record}")


if __name__ == "__main__":
    raise SystemExit(main())
