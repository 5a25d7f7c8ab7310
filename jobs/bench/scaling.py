"""Multi-GPU scaling: the same pipeline work on 1, 2, 4 ... GPUs, one generator and one scorer actor per GPU.

    python -m jobs.bench.scaling --gpus 1,2,4 --dataset math500.jsonl --dummy_shape qwen2.5-math-1.5b \\
        --score_batch_size 32 --record benchmarks/scaling-1.5b.json

Each GPU count runs `jobs.bench --skip_raw` in its own process and Ray session, seeing only the
first k GPUs (CUDA_VISIBLE_DEVICES), with --num_generators k --num_scorers k. A count whose
bench.json exists under --scaling_dir is not run again (delete its folder to redo it), so a sweep
can be split over several calls. Prints a table of work time and speed-up over the fewest GPUs;
--record writes every count's result and the speed-ups, stamped with device, date and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from jobs.bench.records import write_record
from ray_pipeline.errors import PipelineError, exit_status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--gpus", default="1,2,4", help="comma-separated GPU counts")
    parser.add_argument("--scaling_dir", default="/tmp/bestofn-scaling", help="one bench folder per GPU count")
    parser.add_argument("--dummy_shape", help="random-weight model of this shape (see jobs.bench), written once")
    parser.add_argument("--record", help="also write the results and speed-ups with device, date and commit here")
    args, bench_args = parser.parse_known_args(argv)
    return exit_status(lambda: _run(args, bench_args))


def _run(args: argparse.Namespace, bench_args: list[str]) -> int:
    try:
        counts = sorted({int(k) for k in args.gpus.split(",")})
    except ValueError:
        raise PipelineError(f"--gpus must be comma-separated GPU counts, got {args.gpus!r}") from None
    root = Path(args.scaling_dir)
    if args.dummy_shape:
        from jobs.bench.dummy_model import DUMMY_SHAPES, write_random_model

        if args.dummy_shape not in DUMMY_SHAPES:
            raise PipelineError(f"--dummy_shape must be one of {', '.join(DUMMY_SHAPES)}, got {args.dummy_shape!r}")
        folder = write_random_model(DUMMY_SHAPES[args.dummy_shape], root / f"{args.dummy_shape}-random")
        bench_args = [*bench_args, "--model_path", str(folder), "--ignore_eos"]
    results = {}
    for k in counts:
        out = root / f"gpus-{k}"
        if not (out / "bench.json").is_file():
            command = [sys.executable, "-m", "jobs.bench", "--skip_raw", "--bench_dir", str(out)]
            command += [*bench_args, "--num_generators", str(k), "--num_scorers", str(k)]
            print(f"== {k} GPU(s): {' '.join(command[1:])}", flush=True)
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(k))}
            if subprocess.run(command, env=env).returncode != 0:
                raise PipelineError(f"the {k}-GPU benchmark failed (its output is above)")
        results[k] = json.loads((out / "bench.json").read_text())
    print_table(results)
    (root / "scaling.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.record:
        write_record(args.record, scaling_record(results))
    return 0


def scaling_record(results: dict[int, dict]) -> dict:
    """The sweep's settings, each count's bench result, and work and wall speed-ups over the fewest GPUs."""
    base = results[min(results)]
    first = next(iter(results.values()))
    return {
        **{key: first[key] for key in ("model", "problems", "n", "max_tokens", "enforce_eager")},
        "gpus": sorted(results),
        "work_speedup": {k: base["pipeline_work_s"] / r["pipeline_work_s"] for k, r in sorted(results.items())},
        "wall_speedup": {k: base["pipeline_wall_s"] / r["pipeline_wall_s"] for k, r in sorted(results.items())},
        "runs": {k: r for k, r in sorted(results.items())},
    }


def print_table(results: dict[int, dict]) -> None:
    base_k = min(results)
    base = results[base_k]
    first = next(iter(results.values()))
    # Each row's device says how many GPUs it saw ("2 x NVIDIA H200"): the header names the card alone.
    card = first["device"].split(" x ", 1)[-1]
    print(
        f"\n{card}, {', '.join(map(str, sorted(results)))} GPUs | {first['problems']} problems x n={first['n']} "
        f"x {first['max_tokens']} tokens"
    )
    print(
        f"| GPUs | generators / scorers | actor start s | work s | wall s | tokens/s (work) | "
        f"work speed-up over {base_k} | wall speed-up over {base_k} |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k, r in sorted(results.items()):
        work_up = base["pipeline_work_s"] / r["pipeline_work_s"]
        wall_up = base["pipeline_wall_s"] / r["pipeline_wall_s"]
        rate = r["generated_tokens"] / r["pipeline_work_s"]
        print(
            f"| {k} | {r['num_generators']} / {r['num_scorers']} | {r['pipeline_startup_s']:.1f} | "
            f"{r['pipeline_work_s']:.1f} | {r['pipeline_wall_s']:.1f} | {rate:.0f} | {work_up:.2f}x | {wall_up:.2f}x |"
        )
    print("work: first generator call to the best-answer file; wall: also Ray start-up and actor (engine) start")


if __name__ == "__main__":
    sys.exit(main())
