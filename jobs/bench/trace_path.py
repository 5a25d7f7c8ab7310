"""Benchmark: what each part of the trace path costs plain vLLM `LLM.generate`, one part at a time (one GPU).

    python -m jobs.bench.trace_path --dataset embedded:200 --num_return_sequences 64 --max_tokens 512 \\
        --temperature 0.7 --prompt chat --record benchmarks/h100-trace-path-smollm2.json
    python -m jobs.bench.trace_path --dummy_shape qwen2.5-math-1.5b --dataset embedded:100 \\
        --num_return_sequences 16 --max_tokens 512 --temperature 0.7

DeepConf online and `--engine_confidence` generate every candidate as a trace of its own (actors/traces.py):
a request with n = 1, its top --deepconf_top_k log-probs, sampled (and stopped) by the engine's `WindowStop`
logits processor, which keeps vLLM on its V1 model runner. On one H100 such a run decoded at a third of the
plain full run's tokens/s (BENCHMARKS.md, 2026-12-06). Each variant below adds one part to the one before it
and runs in a process and engine of its own, on the same prompts, N and seeds:

- `plain`: one request of n = N per problem, the user's sampling, no log-probs (jobs.bench's raw side);
- `traces`: N requests of n = 1 per problem, each with its trace's seed;
- `traces-v1`: the same on the V1 model runner (`VLLM_USE_V2_MODEL_RUNNER=0`), without seeds (V1 samples seeded
  requests one at a time: the cost 353afba took away);
- `traces-v1-logprobs`: + the top-k log-probs, flat, delivered once at the end (as traces get them);
- `traces-v1-sampler`: `traces-v1` + `WindowStop` sampling each trace from its seed (no log-probs);
- `trace-path`: the whole path (`trace_sampling_params`): the processor's sampling and the log-probs.

Every variant's engine gets the pipeline's engine arguments and `LLM`'s scheduler defaults (on an H100 1,024
sequences and 16,384 batched tokens), as the pipeline's `AsyncLLM` does since 29f23c8 (before, it got vLLM's
embedded-engine defaults, 128 and 2,048 on vLLM 0.26); --max_num_seqs / --max_num_batched_tokens set others.
Prints tokens/s per variant and its share of `plain`'s; --record writes it as JSON with device, date and commit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jobs.bench.dummy_model import DUMMY_SHAPES, write_random_model
from jobs.bench.records import device_name, write_record
from ray_pipeline.config import RunConfig, build_parser, config_from_args
from ray_pipeline.errors import PipelineError, exit_status

VARIANTS = ("plain", "traces", "traces-v1", "traces-v1-logprobs", "traces-v1-sampler", "trace-path")
# The variants that run on the V1 model runner, and those that load the WindowStop processor.
V1 = {"traces-v1", "traces-v1-logprobs", "traces-v1-sampler", "trace-path"}
PROCESSOR = {"traces-v1-sampler", "trace-path"}
# The variants whose requests ask for the top-k log-probs.
LOGPROBS = {"traces-v1-logprobs", "trace-path"}


def variant_env(variant: str, env: dict[str, str]) -> dict[str, str]:
    """The environment a variant's engine runs in: V1 where it asks for it, else vLLM's own choice (vLLM reads
    it as it starts)."""
    env = {k: v for k, v in env.items() if k != "VLLM_USE_V2_MODEL_RUNNER"}
    return env | ({"VLLM_USE_V2_MODEL_RUNNER": "0"} if variant in V1 else {})


def variant_engine_args(path: str, config: RunConfig, variant: str, cpu: bool, limits: dict | None = None) -> dict:
    """The pipeline's engine arguments, with the WindowStop processor only where the variant samples with it, and
    the given scheduler limits (max_num_seqs, max_num_batched_tokens; None: vLLM's)."""
    from actors.vllm_backend import engine_args

    engine = engine_args(path, dataclasses.replace(config, generation="full", engine_confidence=False), cpu)
    if variant in PROCESSOR:
        engine["logits_processors"] = ["actors.confidence_stop:WindowStop"]
    return engine | {k: v for k, v in (limits or {}).items() if v is not None}


def variant_requests(config: RunConfig, variant: str, keys: list[str], cpu: bool) -> list[tuple[int, object]]:
    """(problem index, SamplingParams) per request of the variant, in submission order."""
    from actors.traces import trace_seed
    from actors.vllm_backend import plain_sampling_params, trace_sampling_params

    if variant == "plain":
        return [(i, plain_sampling_params(config, key, cpu)) for i, key in enumerate(keys)]
    requests = []
    for i, key in enumerate(keys):
        for k in range(config.num_return_sequences):
            seed = trace_seed(config.seed, key, k)
            # The whole path, then without what the variant leaves out.
            params = trace_sampling_params(config, seed)
            if variant not in LOGPROBS:
                params.logprobs = None
            if variant not in PROCESSOR:
                params.extra_args = None
            if variant == "traces" and not cpu:
                params.seed = seed
            requests.append((i, params))
    return requests


def run_variant(
    path: str, config: RunConfig, variant: str, prompts: list[list[int]], keys: list[str], limits: dict
) -> dict:
    """One variant in this process: engine start, then one `LLM.generate` over every request."""
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    from ray_pipeline.backends.vllm import vllm_is_cpu_build

    cpu = vllm_is_cpu_build()
    started = time.time()
    llm = LLM(**variant_engine_args(path, config, variant, cpu, limits))
    ready = time.time()
    scheduler = llm.llm_engine.vllm_config.scheduler_config
    requests = variant_requests(config, variant, keys, cpu)
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=prompts[i]) for i, _ in requests], [p for _, p in requests], use_tqdm=False
    )
    done = time.time()
    tokens = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    generate_s = done - ready
    return {
        "engine_start_s": ready - started,
        "generate_s": generate_s,
        "tokens": tokens,
        "problems": len(keys),
        "requests": len(requests),
        "tokens_per_s": tokens / generate_s,
        "max_num_seqs": scheduler.max_num_seqs,
        "max_num_batched_tokens": scheduler.max_num_batched_tokens,
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--dummy_shape", choices=sorted(DUMMY_SHAPES), help="random-weight model of this shape")
    parser.add_argument("--bench_dir", default="/tmp/bestofn-bench-trace-path", help="where a random model goes")
    parser.add_argument("--record", help="also write the result with device, date and commit to this JSON file")
    parser.add_argument("--max_num_seqs", type=int, help="the engines' max_num_seqs (default: vLLM's for LLM)")
    parser.add_argument(
        "--max_num_batched_tokens", type=int, help="the engines' max_num_batched_tokens (default: vLLM's for LLM)"
    )
    parser.add_argument("--variant_child", nargs=2, help=argparse.SUPPRESS)
    parser.set_defaults(backend="vllm")
    args = parser.parse_args(argv)
    return exit_status(lambda: _run(args, sys.argv[1:] if argv is None else argv))


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    own = ("variants", "dummy_shape", "bench_dir", "record", "variant_child", "max_num_seqs", "max_num_batched_tokens")
    limits = {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens}
    config = config_from_args(argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in own}))
    variants = [v for v in args.variants.split(",") if v]
    if not variants or set(variants) - set(VARIANTS):
        raise PipelineError(f"--variants must be comma-separated names of {', '.join(VARIANTS)}, got {args.variants!r}")
    if args.dummy_shape:
        folder = write_random_model(DUMMY_SHAPES[args.dummy_shape], Path(args.bench_dir) / f"{args.dummy_shape}-random")
        config = dataclasses.replace(config, model_path=str(folder), ignore_eos=True)
    if args.variant_child:
        variant, out = args.variant_child
        path, prompts, keys = _prompts(config)
        Path(out).write_text(json.dumps(run_variant(path, config, variant, prompts, keys, limits)))
        return 0
    results = {}
    for variant in variants:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            command = [sys.executable, "-m", "jobs.bench.trace_path", *argv, "--variant_child", variant, out.name]
            print(f"== {variant}", flush=True)
            if subprocess.run(command, env=variant_env(variant, dict(os.environ))).returncode != 0:
                raise PipelineError(f"the {variant} variant failed (its output is above)")
            results[variant] = json.loads(Path(out.name).read_text())
    base = results.get("plain")
    for result in results.values():
        result["share_of_plain_tokens_per_s"] = result["tokens_per_s"] / base["tokens_per_s"] if base else None
    record = {
        "device": device_name(),
        "model": config.model_path,
        "problems": next(iter(results.values()))["problems"],
        "n": config.num_return_sequences,
        "max_tokens": config.max_tokens,
        "variants": results,
    }
    print(f"\n{record['device']} | {record['problems']} problems x n={record['n']} x {record['max_tokens']} tokens")
    heads = ("requests", "max seqs", "engine s", "tokens", "generate s", "tokens/s", "vs plain")
    widths = (10, 10, 10, 13, 12, 11, 10)
    print(f"| {'variant':20} | " + " | ".join(f"{h:>{w - 2}}" for h, w in zip(heads, widths)) + " |")
    print("|" + "|".join("-" * w for w in (22, *widths)) + "|")
    for name, r in results.items():
        share = r["share_of_plain_tokens_per_s"]
        print(
            f"| {name:20} | {r['requests']:>8,} | {r['max_num_seqs']:>8,} | {r['engine_start_s']:>8.1f} "
            f"| {r['tokens']:>11,} | {r['generate_s']:>10.1f} | {r['tokens_per_s']:>9,.0f} "
            f"| {'' if share is None else f'{share:8.3f}':>8} |"
        )
    if args.record:
        write_record(args.record, record)
    return 0


def _prompts(config: RunConfig) -> tuple[str, list[list[int]], list[str]]:
    from transformers import AutoTokenizer

    from ray_pipeline.data import load_problems
    from ray_pipeline.model import resolve_model
    from ray_pipeline.prompts import build_prompt

    problems = load_problems(config.dataset, limit=config.limit, shard_size=config.shard_size)
    path = resolve_model(config.model_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = [build_prompt(p, config.prompt, tokenizer) for p in problems.column("problem").to_pylist()]
    return path, [tokenizer(t)["input_ids"] for t in texts], problems.column("problem_id").to_pylist()


if __name__ == "__main__":
    sys.exit(main())
