"""Benchmark: DeepConf online against full generation on the same problems, N and seeds (one GPU).

    python -m jobs.bench.online --dataset embedded:200 --num_return_sequences 64 --max_tokens 512 \\
        --deepconf_window 64 --temperature 0.7 --prompt chat --answer_extraction math-verify \\
        --record benchmarks/h200-deepconf-online-smollm2.json
    python -m jobs.bench.online --dummy_shape qwen2.5-math-1.5b --runs full,online --dataset embedded:100 \\
        --num_return_sequences 16 --warmup_traces 4 --max_tokens 512 --deepconf_window 64 --temperature 0.7

Each run is `jobs.bench --skip_raw` in its own process and Ray session (engine start timed apart), one of
(`--raw` lets the `full` run time plain raw `LLM.generate` first, jobs.bench's comparison):

- `full`: plain full generation (no log-probs), every trace to its end;
- `full-confidence`: full generation that also stores each token's engine confidence (`--engine_confidence`),
  which the simulator (ray_pipeline/deepconf/) replays: DeepConf-low and -high online, exactly as an
  online run on these traces would decide, and DeepConf offline on the engine's confidences;
- `online`: `--generation deepconf-online` with the given --warmup_traces, --deepconf_percentile (90:
  DeepConf-low) and --deepconf_window.

Work time is generate + score: from the first generator call to the last committed shard (jobs.bench's work
without its reduce). Every trace's answer is then read with --answer_extraction, answers are grouped by
math-verify equivalence per problem, and each group is graded once, on all CPUs. The table gives per strategy
the tokens generated, their share of the full run's, the accuracy and the paired difference against full
self-consistency (the paper's baseline) with Newcombe's 95 % interval; --record writes it all as JSON
stamped with device, date and commit. With random weights (--dummy_shape) only tokens and times mean anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from jobs.bench.records import device_name, write_record
from ray_pipeline.config import RunConfig, build_parser, config_from_args
from ray_pipeline.deepconf import (
    SKIPPED,
    OnlineSettings,
    filtered_vote,
    lowest_group_confidence,
    majority_class,
    online_vote,
    replay_problem,
)
from ray_pipeline.deepconf.tables import tokens_vs_accuracy
from ray_pipeline.errors import PipelineError, exit_status

RUNS = {
    "full": ["--generation", "full"],
    "full-confidence": ["--generation", "full", "--engine_confidence"],
    "online": ["--generation", "deepconf-online"],
}
# The flags this job handles itself: every other flag goes on to each jobs.bench run.
OWN = (
    *("runs", "bench_dir", "dummy_shape", "record", "simulate_percentiles", "raw", "reuse"),
    *("generation", "engine_confidence"),
)
# deepconf-online's own flags: only the online run gets them (a full run has no use for them).
ONLINE_ONLY = ("consensus", "consensus_wave")
COLUMNS = ["problem_id", "problem_index", "candidate_index", "gold", "text", "token_count", "engine_confidence"]
COLUMNS += ["engine_token_count", "phase", "stopped_at", "stop_threshold"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--runs", default="full-confidence,online", help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--bench_dir", default="/tmp/bestofn-bench-online", help="one jobs.bench folder per run")
    parser.add_argument("--dummy_shape", help="random-weight model of this shape (bench/dummy_model.py), written once")
    parser.add_argument("--simulate_percentiles", default="90,10", help="DeepConf online percentiles to replay")
    parser.add_argument(
        "--raw", action="store_true", help="the full run also times plain raw vLLM LLM.generate first (jobs.bench)"
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="read a run whose folder under --bench_dir already holds its bench.json instead of running it again "
        "(e.g. the full runs, when only the online run's settings change)",
    )
    parser.add_argument("--record", help="also write the result with device, date and commit to this JSON file")
    parser.set_defaults(backend="vllm")
    args = parser.parse_args(argv)
    return exit_status(lambda: _run(args, argv))


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    runs = [r for r in args.runs.split(",") if r]
    if not runs or set(runs) - set(RUNS):
        raise PipelineError(f"--runs must be comma-separated names of {', '.join(RUNS)}, got {args.runs!r}")
    given = {k: v for k, v in vars(args).items() if k not in OWN}
    online = config_from_args(argparse.Namespace(**(given | {"generation": "deepconf-online"})))
    config = dataclasses.replace(online, generation="full", consensus=None).validate()
    percentiles = [float(p) for p in args.simulate_percentiles.split(",") if p]
    root = Path(args.bench_dir)
    passed = _passed_flags(argv)
    if args.dummy_shape:
        from jobs.bench.dummy_model import DUMMY_SHAPES, write_random_model

        if args.dummy_shape not in DUMMY_SHAPES:
            raise PipelineError(f"--dummy_shape must be one of {', '.join(DUMMY_SHAPES)}, got {args.dummy_shape!r}")
        folder = write_random_model(DUMMY_SHAPES[args.dummy_shape], root / f"{args.dummy_shape}-random")
        passed += ["--model_path", str(folder), "--ignore_eos"]
    timings = {}
    for name in runs:
        out = root / name
        raw = [] if args.raw and name == "full" else ["--skip_raw"]
        flags = passed if name == "online" else _passed_flags(passed, ONLINE_ONLY)
        command = [sys.executable, "-m", "jobs.bench", *raw, "--bench_dir", str(out), *flags, *RUNS[name]]
        if args.reuse and (out / "bench.json").exists():
            print(f"== {name}: reused {out / 'bench.json'}", flush=True)
        else:
            print(f"== {name}: {' '.join(command[1:])}", flush=True)
            if subprocess.run(command).returncode != 0:
                raise PipelineError(f"the {name} run failed (its output is above)")
        bench = json.loads((out / "bench.json").read_text())
        timings[name] = bench | {"generate_score_s": bench["pipeline_work_s"] - bench["reduce_s"]}
    shards = {name: _read(root / name / "run" / "shards") for name in runs}
    graded = {name: _grade(problems, config.answer_extraction) for name, problems in shards.items()}
    # The targets: SmolLM2's online work at most 0.60 of the full run's, the 1.5B shape's (random weights) 0.75.
    result = _compare(config, online, percentiles, shards, graded, timings, 0.75 if args.dummy_shape else 0.60)
    result |= {"device": device_name(), "runs": runs, "dummy_shape": args.dummy_shape}
    if timings.get("full", {}).get("raw"):
        full = timings["full"]
        result["plain_raw_generate"] = full["raw"] | {
            "pipeline_work_s": full["pipeline_work_s"],
            "ratio_work_to_raw_generate": full["ratio_work_to_raw_generate"],
        }
    (root / "bench_online.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.record:
        write_record(args.record, result)
    _print(result)
    return 0


def _passed_flags(argv: list[str], left_out: tuple[str, ...] = OWN) -> list[str]:
    """The command line without the flags named in `left_out` (each with its value)."""
    own = {f"--{name}" for name in left_out} | {f"--no-{name}" for name in left_out}
    takes_value = {f"--{name}" for name in ("runs", "bench_dir", "dummy_shape", "record", "simulate_percentiles")}
    takes_value |= {"--generation", *(f"--{name}" for name in ONLINE_ONLY)}
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        flag = arg.split("=", 1)[0]
        if flag in own:
            skip = flag in takes_value and "=" not in arg
            continue
        out.append(arg)
    return out


def _read(shards_dir: Path) -> list[list[dict]]:
    """A run's candidates, one list per problem in problem order."""
    rows = pq.read_table(shards_dir, columns=COLUMNS).to_pylist()
    problems: dict[int, list[dict]] = {}
    for row in sorted(rows, key=lambda r: (r["problem_index"], r["candidate_index"])):
        problems.setdefault(row["problem_index"], []).append(row)
    return [problems[i] for i in sorted(problems)]


def _grade(problems: list[list[dict]], extraction: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per problem: each candidate's answer class and each class's correctness, on every CPU."""
    jobs = [([c["text"] or "" for c in candidates], candidates[0]["gold"], extraction) for candidates in problems]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        return list(pool.map(grade_problem, jobs, chunksize=max(1, len(jobs) // (4 * (os.cpu_count() or 1)))))


def grade_problem(job: tuple[list[str], str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Answer classes (math-verify equivalence over distinct normalized answers) and each class's grade."""
    from ray_pipeline.answer_classes import group_answers
    from ray_pipeline.answers import answers_equivalent, extract_answer, grade, normalize_answer

    texts, gold, extraction = job
    answers = [extract_answer(text, extraction) for text in texts]
    keys = [None if a is None else normalize_answer(a) for a in answers]
    # Equal normalized answers are equivalent (answers_equivalent says so first): compare each distinct one once.
    distinct = list(dict.fromkeys(k for k in keys if k is not None))
    first = {k: next(a for a, key in zip(answers, keys) if key == k) for k in distinct}
    key_class = dict(zip(distinct, group_answers([first[k] for k in distinct], answers_equivalent).tolist()))
    classes = np.array([-1 if k is None else key_class[k] for k in keys], dtype=np.int64)
    representative: dict[int, str] = {}
    for k in distinct:
        representative.setdefault(key_class[k], first[k])
    correct = np.array([grade(representative[c], gold) for c in range(len(representative))], dtype=bool)
    return classes, correct


def _is_right(winner: int, correct: np.ndarray) -> bool:
    return bool(winner >= 0 and correct[winner])


def _compare(config: RunConfig, online: RunConfig, percentiles, shards, graded, timings, limit: float) -> dict:
    """The table's rows and the targets; `limit` is the online run's largest work share that meets its target."""
    window = config.deepconf_window
    strategies: dict[str, tuple[list[int], list[bool]]] = {}
    notes: dict[str, dict] = {}
    if "full-confidence" in shards or "full" in shards:
        name = "full-confidence" if "full-confidence" in shards else "full"
        problems, grades = shards[name], graded[name]
        tokens = [sum(c["token_count"] for c in cands) for cands in problems]
        strategies["full self-consistency"] = (tokens, [_is_right(majority_class(k), ok) for k, ok in grades])
        notes["full self-consistency"] = {"run": name}
    if "full-confidence" in shards:
        problems, grades = shards["full-confidence"], graded["full-confidence"]
        confidences = [[c["engine_confidence"] for c in cands] for cands in problems]
        tokens = [sum(c["token_count"] for c in cands) for cands in problems]
        lowest = [[lowest_group_confidence(c, window) for c in conf] for conf in confidences]
        for keep in (10, 90):
            right = [_is_right(filtered_vote(low, k, keep).winner, ok) for low, (k, ok) in zip(lowest, grades)]
            strategies[f"DeepConf offline, top {keep} % (engine confidences)"] = (tokens, right)
        for percentile in percentiles:
            settings = dataclasses.replace(OnlineSettings.from_config(online), percentile=percentile)
            replays = [replay_problem(conf, k, settings) for conf, (k, _) in zip(confidences, grades)]
            label = {90.0: "low", 10.0: "high"}.get(percentile, f"p{percentile:g}")
            name = f"DeepConf-{label} online, simulated"
            right = [_is_right(r.vote.winner, ok) for r, (_, ok) in zip(replays, grades)]
            strategies[name] = ([r.tokens for r in replays], right)
            notes[name] = {
                "percentile": percentile,
                "stopped": int(sum((r.stopped_at >= 0).sum() for r in replays)),
                "skipped": int(sum((~r.launched).sum() for r in replays)),
            }
        full_sc = strategies["full self-consistency"]
        grid = simulator_grid(confidences, grades, OnlineSettings.from_config(online), full_sc)
    if "online" in shards:
        problems, grades = shards["online"], graded["online"]
        right, tokens = [], []
        for cands, (classes, ok) in zip(problems, grades):
            lowest = [lowest_group_confidence(c["engine_confidence"], window) for c in cands]
            launched = [c["phase"] != SKIPPED for c in cands]
            vote = online_vote(lowest, classes, launched, cands[0]["stop_threshold"])
            right.append(_is_right(vote.winner, ok))
            tokens.append(sum(c["token_count"] for c in cands))
        name = f"DeepConf online run (percentile {online.deepconf_percentile:g})"
        strategies[name] = (tokens, right)
        every = [c for cands in problems for c in cands]
        notes[name] = {
            "run": "online",
            "stopped": sum(c["stopped_at"] is not None for c in every),
            "skipped": sum(c["phase"] == SKIPPED for c in every),
            "engine_tokens": sum(c["engine_token_count"] or 0 for c in every),
        }
    reference = next(iter(strategies))
    rows = tokens_vs_accuracy(strategies, reference)
    for row in rows:
        row |= notes.get(row["name"], {})
        run = row.get("run")
        if run in timings:
            row["generate_score_s"] = timings[run]["generate_score_s"]
    result = {
        "problems": len(next(iter(shards.values()))),
        "n": config.num_return_sequences,
        "max_tokens": config.max_tokens,
        "window": window,
        "warmup_traces": online.warmup_traces,
        "online_percentile": online.deepconf_percentile,
        "reference": reference,
        "rows": rows,
        "timings": {name: _timing(t) for name, t in timings.items()},
    }
    if "full-confidence" in shards:
        result["simulator_grid"] = grid
    base = timings.get("full") or timings.get("full-confidence")
    if "online" in timings and base:
        online_row = next(r for r in rows if r.get("run") == "online")
        base_row = next(r for r in rows if r["name"] == reference)
        low, high = online_row["paired_difference_ci95"]
        result["targets"] = {
            "online_tokens_share": online_row["tokens"] / base_row["tokens"],
            "tokens_target_met (<= 0.50)": online_row["tokens"] <= 0.5 * base_row["tokens"],
            "paired_accuracy_difference": online_row["paired_difference"],
            "paired_accuracy_difference_ci95": [low, high],
            "accuracy_target_met (difference >= -0.02)": online_row["paired_difference"] >= -0.02,
            "work_share": timings["online"]["generate_score_s"] / base["generate_score_s"],
            "work_against": "full" if "full" in timings else "full-confidence",
        }
        # Every token the engine generated, kept or not (a consensus stop's traces in flight), against the full run's.
        engine_share = online_row["engine_tokens"] / base_row["tokens"]
        work_share = result["targets"]["work_share"]
        result["targets"] |= {
            "online_engine_tokens_share": engine_share,
            f"work_target_met (<= {limit})": work_share <= limit,
            "work_follows_tokens (work <= engine tokens + 0.05)": work_share <= engine_share + 0.05,
        }
    return result


GRID_WARMUPS = (4, 8, 16)
GRID_CONSENSUS = (None, 0.9, 0.95)
GRID_PERCENTILES = (90.0, 10.0)


def simulator_grid(confidences, grades, base: OnlineSettings, full_sc: tuple[list[int], list[bool]]) -> list[dict]:
    """DeepConf online replayed on a full run for every warm-up count x consensus x percentile (issue 26's table
    for choosing the defaults): per setting the tokens' share of the full run's, the accuracy, and the paired
    difference against full self-consistency with its interval. Settings whose warm-up leaves no final trace
    are left out."""
    n = min(len(conf) for conf in confidences) if confidences else 0
    strategies = {"full self-consistency": full_sc}
    settings = {}
    for warmup in GRID_WARMUPS:
        if warmup >= n:
            continue
        for consensus in GRID_CONSENSUS:
            for percentile in GRID_PERCENTILES:
                chosen = dataclasses.replace(base, warmup=warmup, consensus=consensus, percentile=percentile)
                replays = [replay_problem(conf, k, chosen) for conf, (k, _) in zip(confidences, grades)]
                name = f"warm-up {warmup}, consensus {consensus or 'off'}, percentile {percentile:g}"
                right = [_is_right(r.vote.winner, ok) for r, (_, ok) in zip(replays, grades)]
                strategies[name] = ([r.tokens for r in replays], right)
                settings[name] = {"warmup": warmup, "consensus": consensus, "percentile": percentile}
    rows = tokens_vs_accuracy(strategies, "full self-consistency")
    return [row | settings.get(row["name"], {}) for row in rows]


def _timing(bench: dict) -> dict:
    keys = ("pipeline_startup_s", "generate_score_s", "generator_s", "generated_tokens", "generate_tokens_per_s")
    keys += ("scorer_busy_s", "scored_tokens", "score_tail_s", "pipeline_gpu_peak_mib", "model")
    return {k: bench.get(k) for k in keys}


def _print_rows(rows: list[dict]) -> None:
    widths = (52, 11, 6, 8, 26, 6)
    names = ("strategy", "tokens", "share", "accuracy", "vs full SC (95 % CI)", "work s")
    print("| " + " | ".join(f"{n:{w}}" for n, w in zip(names, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        diff, (low, high) = row["paired_difference"], row["paired_difference_ci95"]
        paired = f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]"
        work = row.get("generate_score_s")
        print(
            f"| {row['name']:52} | {row['tokens']:>11,} | {row['tokens_vs_reference']:6.3f} | {row['accuracy']:8.3f} "
            f"| {paired:>26} | {'' if work is None else f'{work:6.1f}':>6} |"
        )


def _print(result: dict) -> None:
    print(
        f"\n{result['device']} | {result['problems']} problems x n={result['n']} x {result['max_tokens']} tokens, "
        f"window {result['window']}, {result['warmup_traces']} warm-up traces"
    )
    _print_rows(result["rows"])
    if result.get("simulator_grid"):
        print("\nsimulator on the full-confidence run (DeepConf online replayed per setting):")
        _print_rows(result["simulator_grid"])
    for name, t in result["timings"].items():
        print(
            f"{name}: actor start {t['pipeline_startup_s']:.1f} s, generate+score {t['generate_score_s']:.1f} s, "
            f"generator {t['generator_s']:.1f} s ({t['generated_tokens']:,} tokens), scorer busy "
            f"{t['scorer_busy_s']:.1f} s, GPU peak {t['pipeline_gpu_peak_mib']} MiB"
        )
    raw = result.get("plain_raw_generate")
    if raw:
        print(
            f"plain raw LLM.generate: {raw['generate_s']:.1f} s ({raw['tokens']:,} tokens); full pipeline work "
            f"{raw['pipeline_work_s']:.1f} s; ratio {raw['ratio_work_to_raw_generate']:.3f}"
        )
    for key, value in result.get("targets", {}).items():
        print(f"  {key}: {value if not isinstance(value, float) or math.isnan(value) else round(value, 3)}")


if __name__ == "__main__":
    sys.exit(main())
