"""Benchmark: where a small job's wall time goes, from process start to exit (CPU, the embedded model).

    python -m jobs.bench.start --runs 3 --record benchmarks/cpu-start-<commit>.json

Runs the small job (by default `jobs.infer --backend hf --dataset embedded:4 --num_return_sequences 2
--max_tokens 16 --shard_size 2`, a new output folder each run) `--runs` times in each mode:

- `local`: no Ray running, so the job starts a local Ray of its own and stops it;
- `cluster`: against a Ray already running on this machine (`ray start`, token authentication on), joined
  with `--ray_address`.

Each run writes a timeline (`ray_pipeline/timeline.py`: the driver and every actor note when each step
happened), and the table gives each phase's median over the runs: driver imports, plan, Ray start, until
the actors' processes exist, each actor's start (its worker's own start and module imports, torch and
transformers, model load), the first candidate, the last shard's commit, reduce, Ray's shutdown and the
process exit. `--record` writes the runs and medians as JSON, stamped with device, date and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jobs.bench.records import write_record
from ray_pipeline import timeline
from ray_pipeline.cluster.local import LocalCluster

REPO = Path(__file__).resolve().parent.parent
SMALL_JOB = [
    "jobs.infer", "--backend", "hf", "--dataset", "embedded:4", "--num_return_sequences", "2",
    "--max_tokens", "16", "--shard_size", "2",
]  # fmt: skip
ACTORS = ("generator", "scorer")


def phases(events: list[dict], started: float, ended: float) -> dict[str, float]:
    """Seconds per phase of one run, from its timeline events; a phase whose events are missing is left out."""
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for e in events:
        first.setdefault(e["event"], e["t"])
        last[e["event"]] = e["t"]

    def span(a: str | float, b: str | float) -> float | None:
        start = first.get(a) if isinstance(a, str) else a
        end = last.get(b) if isinstance(b, str) else b
        return None if start is None or end is None else end - start

    starts = [first[f"{a} process started"] for a in ACTORS if f"{a} process started" in first]
    actor_processes = min(starts, default=None)
    rows = {
        "driver imports": span(started, "driver imported"),
        "plan": span("driver imported", "planned"),
        "Ray start": span("planned", "ray started"),
        "until the actors' processes start": span("ray started", actor_processes) if actor_processes else None,
    }
    for actor in ACTORS:
        rows |= {
            f"{actor}: worker start and module imports": span(f"{actor} process started", f"{actor} init"),
            f"{actor}: torch and transformers": span(f"{actor} init", f"{actor} imported torch and transformers"),
            f"{actor}: model load": span(f"{actor} imported torch and transformers", f"{actor} ready"),
        }
    rows |= {
        "first candidate (from Ray start)": span("ray started", "first candidate"),
        "last shard committed (from first candidate)": span("first candidate", "shard committed"),
        "reduce": span("executed", "selected"),
        "Ray shutdown": span("ray stopping", "ray stopped"),
        "exit (from the last step)": span(max(e["t"] for e in events), ended) if events else None,
        "wall": ended - started,
    }
    return {name: round(value, 3) for name, value in rows.items() if value is not None}


def run_once(job: list[str], env: dict, workdir: Path, timeline_path: Path) -> dict[str, float]:
    """One run of the job in a new output folder; its phases."""
    out = workdir / f"out-{time.time_ns()}"
    offset = timeline_path.stat().st_size if timeline_path.exists() else 0
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", *job, "--output_dir", str(out)], cwd=REPO, env=env, capture_output=True, text=True
    )
    ended = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"error: the job failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    with timeline_path.open(encoding="utf-8") as f:
        f.seek(offset)
        events = sorted(
            (e for e in map(json.loads, f.read().splitlines()) if started <= e["t"] <= ended + 1),
            key=lambda e: e["t"],
        )
    shutil.rmtree(out, ignore_errors=True)
    return phases(events, started, ended)


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    names = list(dict.fromkeys(name for run in runs for name in run))
    return {name: round(statistics.median(r[name] for r in runs if name in r), 3) for name in names}


def bench_mode(mode: str, runs: int, job: list[str], workdir: Path) -> list[dict[str, float]]:
    timeline_path = workdir / f"timeline-{mode}.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {timeline.ENV: str(timeline_path)}
    if mode == "local":
        return [run_once(job, env, workdir, timeline_path) for _ in range(runs)]
    # A Ray that runs before the job: its workers inherit the timeline setting from `ray start`.
    cluster = LocalCluster(
        Path(tempfile.mkdtemp(prefix="bench-start-", dir="/tmp")), extra_env={timeline.ENV: str(timeline_path)}
    )
    try:
        cluster.start_head()
        env |= cluster.client_env()
        return [run_once(job, env, workdir, timeline_path) for _ in range(runs)]
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


def print_table(results: dict[str, dict[str, float]]) -> None:
    modes = list(results)
    names = list(dict.fromkeys(name for m in modes for name in results[m]))
    print(f"{'phase (median s)':<46}" + "".join(f"{m:>10}" for m in modes))
    for name in names:
        cells = "".join(f"{results[m][name]:>10.2f}" if name in results[m] else f"{'—':>10}" for m in modes)
        print(f"{name:<46}{cells}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per mode (the table gives medians)")
    parser.add_argument("--modes", default="local,cluster", help="local (no Ray running), cluster (a running Ray)")
    parser.add_argument("--record", help="write the runs and medians as JSON to this path")
    parser.add_argument("job", nargs=argparse.REMAINDER, help="another job and flags (default: the small job)")
    args = parser.parse_args(argv)
    job = args.job or SMALL_JOB
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(modes) - {"local", "cluster"} or args.runs < 1:
        parser.error("--modes takes local and cluster; --runs at least 1")
    workdir = Path(tempfile.mkdtemp(prefix="bench-start-"))
    try:
        runs = {mode: bench_mode(mode, args.runs, job, workdir) for mode in modes}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results = {mode: medians(r) for mode, r in runs.items()}
    print_table(results)
    if args.record:
        write_record(args.record, {"job": ["python", "-m", *job], "medians": results, "runs": runs})
        print(f"record: {args.record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
