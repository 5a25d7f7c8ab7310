"""Benchmark: the comparison of every selection method (`jobs.reduce --method all`) on a synthetic run folder.

    python -m jobs.bench.reduce --problems 100 --num_return_sequences 64 --tokens 256
    python -m jobs.bench.reduce --problems 500 --num_return_sequences 256 --distinct 0.5 --record benchmarks/x.json
    python -m jobs.bench.reduce --problems 100 --sweep 16,32,64,128,256

It writes a run folder of P problems x N candidates in the real shard schema (every column filled,
per-token columns at full length) whose answers are drawn from a mix: repeats of a few popular
wrong answers, equivalent forms of one value (`\\frac{1}{2}`, `0.5`, `1/2`, `\\dfrac12`), expressions
(`x^2-5x+6`, `(x-2)(x-3)`), answerless candidates, and distinct wrong answers at the share
`--distinct`. It then times `python -m jobs.reduce FOLDER --method all` as a user runs it (whole
command, peak RSS) and the comparison's stages in process, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_pipeline.columns import COLUMNS, SCORER
from ray_pipeline.config import RunConfig
from ray_pipeline.data import PROBLEM_SCHEMA
from ray_pipeline.manifest import COMMITTED, Manifest, fingerprint_hash
from ray_pipeline.run_folder import fingerprint
from ray_pipeline.shards import SHARD_SCHEMA, ShardWriter

VOCAB_SIZE = 49152
LAYERS = 24
SUBJECTS = ("Algebra", "Number Theory", "Prealgebra", "Precalculus", "Counting & Probability")
# Words of the filler reasoning: about four characters a token, as in real responses.
FILLER = (
    "We compute the quantity step by step, then check the result against the conditions of the problem. "
).split()


def _number_forms(value: Fraction) -> list[str]:
    """Ways a model writes one number: all equivalent under math-verify."""
    if value.denominator == 1:
        v = value.numerator
        return [str(v), f"{v}.0", f"\\frac{{{2 * v}}}{{2}}"]
    a, b = value.numerator, value.denominator
    sign, a_abs = ("-" if a < 0 else ""), abs(a)
    forms = [f"{sign}\\frac{{{a_abs}}}{{{b}}}", f"{sign}\\dfrac{{{a_abs}}}{{{b}}}", f"{a}/{b}"]
    if a_abs < 10 and b < 10:
        forms.append(f"{sign}\\dfrac{a_abs}{b}")
    decimal = float(value)
    if b in (2, 4, 5, 8, 10, 20, 25):
        forms.append(f"{decimal:g}")
    return forms


def _polynomial_forms(r1: int, r2: int) -> list[str]:
    """x^2 - (r1 + r2) x + r1 r2, expanded with and without spaces, and factored."""
    s, p = r1 + r2, r1 * r2

    def term(c: int, x: str) -> str:
        return "" if c == 0 else f"{'+' if c < 0 else '-'}{abs(c) if abs(c) != 1 or not x else ''}{x}"

    expanded = f"x^2{term(s, 'x')}{term(-p, '')}"
    factored = f"(x{'-' if r1 >= 0 else '+'}{abs(r1)})(x{'-' if r2 >= 0 else '+'}{abs(r2)})"
    return [expanded, expanded.replace("+", " + ").replace("-", " - ").replace("x^2 ", "x^2 "), factored]


class AnswerPool:
    """One problem's answers: the gold value's forms, two popular wrong values' forms, fresh distinct wrong values."""

    def __init__(self, rng: np.random.Generator, kind: str):
        self.rng, self.kind = rng, kind
        self.used: set = set()
        self.gold = self._fresh()
        self.popular = [self._fresh(), self._fresh()]

    def _value(self):
        rng = self.rng
        if self.kind == "integer":
            return Fraction(int(rng.integers(-60, 600)))
        if self.kind == "rational":
            b = int(rng.choice([2, 3, 4, 5, 6, 7, 8, 9, 12]))
            a = int(rng.integers(-40, 80))
            return Fraction(a, b) if a % b else Fraction(a + 1, b)
        return tuple(sorted(int(r) for r in rng.integers(-9, 10, 2)))

    def _fresh(self):
        for _ in range(1000):
            value = self._value()
            if value not in self.used:
                self.used.add(value)
                return value
        # A pool this small is exhausted only by huge N: widen it.
        value = Fraction(int(self.rng.integers(10**6, 10**9)))
        self.used.add(value)
        return value

    def forms(self, value) -> list[str]:
        return _polynomial_forms(*value) if isinstance(value, tuple) else _number_forms(value)

    def written(self, value) -> str:
        forms = self.forms(value)
        return forms[int(self.rng.integers(len(forms)))]

    def gold_text(self) -> str:
        return self.forms(self.gold)[0]


def _response(rng: np.random.Generator, answer: str | None, tokens: int, boxed: bool) -> str:
    words = int(max(1, tokens - 8) * 0.8)
    start = int(rng.integers(len(FILLER)))
    body = " ".join(FILLER[(start + i) % len(FILLER)] for i in range(words))
    if answer is None:
        return body
    if boxed:
        return f"{body}\n\nSo the answer is $\\boxed{{{answer}}}$."
    return f"{body}\n\nThe final answer is ${answer}$."


def _floats(lists: list[np.ndarray], dtype) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int32)
    values = np.concatenate(lists).astype(dtype) if lists else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def synthesize_run(
    folder: Path,
    problems: int,
    n: int,
    *,
    tokens: int = 256,
    distinct: float = 0.35,
    answerless: float = 0.03,
    unboxed: float = 0.1,
    empty: float = 0.01,
    shard_size: int = 50,
    answer_extraction: str = "math-verify",
    seed: int = 0,
) -> Path:
    """A run folder (`folder`, made or replaced) of `problems` x `n` scored candidates; returns it.

    Each problem is an integer (60 %), rational (30 %) or quadratic (10 %) question. A candidate
    gives a fresh distinct wrong answer with probability `distinct`, no answer with `answerless`, the
    gold value (in one of its forms) with the problem's own chance, else one of two popular wrong
    values; `unboxed` of the answers are written in prose instead of `\\boxed{}`, and `empty` of the
    candidates have no response. Scores lean towards the correct candidates, with noise.
    """
    rng = np.random.default_rng(seed)
    if folder.exists():
        shutil.rmtree(folder)
    shards_dir = folder / "shards"
    config = RunConfig(
        dataset="synthetic",
        model_path="synthetic/model",
        backend="hf",
        num_return_sequences=n,
        max_tokens=tokens,
        shard_size=shard_size,
        prompt="chat",
        answer_extraction=answer_extraction,
    )
    plan = pa.Table.from_pylist(
        [
            {
                "problem_id": f"synthetic/{i}",
                "problem_index": i,
                "shard_id": i // shard_size,
                "problem": f"Synthetic problem {i}",
                "subject": SUBJECTS[i % len(SUBJECTS)],
                "level": i % 5 + 1,
            }
            for i in range(problems)
        ],
        schema=PROBLEM_SCHEMA,
    )
    fp = fingerprint(config, plan, "synthetic/model")
    rows = {s: n * min(shard_size, problems - s * shard_size) for s in range(math.ceil(problems / shard_size))}
    manifest = Manifest.plan(folder.name, "0", "synthetic", fp, rows, n)
    writer = ShardWriter(shards_dir, rows, fingerprint=fingerprint_hash(fp))
    for shard_id in sorted(rows):
        shard = plan.filter(pc.equal(plan.column("shard_id"), shard_id))
        writer.add(_shard_rows(rng, shard, n, tokens, distinct, answerless, unboxed, empty))
        manifest.set_status(shard_id, COMMITTED)
    manifest.command = f"python -m jobs.bench.reduce --problems {problems} --num_return_sequences {n}"
    manifest.save(folder)
    config.save(folder / "config.json")
    return folder


def _shard_rows(rng, shard: pa.Table, n: int, tokens: int, distinct, answerless, unboxed, empty) -> pa.Table:
    columns: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
    per_token: dict[str, list[np.ndarray]] = {
        "token_ids": [], "generator_logprobs": [], "token_entropy": [], "token_self_certainty": [],
        "token_logprob": [], "token_confidence": [],
    }  # fmt: skip
    scorer_empty = {c.name: c.empty for c in COLUMNS if c.stage == SCORER}
    for problem in shard.to_pylist():
        kind = str(rng.choice(["integer", "rational", "quadratic"], p=[0.6, 0.3, 0.1]))
        pool = AnswerPool(rng, kind)
        right = float(rng.uniform(0.0, 0.8))
        problem = problem | {"gold": pool.gold_text()}
        for k in range(n):
            draw = rng.random()
            if draw < distinct:
                value = pool._fresh()
            elif draw < distinct + answerless:
                value = None
            elif rng.random() < right:
                value = pool.gold
            else:
                value = pool.popular[int(rng.integers(2))]
            answer = None if value is None else pool.written(value)
            correct = value is not None and value == pool.gold
            is_empty = rng.random() < empty
            length = 0 if is_empty else int(max(1, tokens - rng.integers(0, tokens // 4 + 1)))
            text = "" if is_empty else _response(rng, answer, length, rng.random() >= unboxed)
            row = dict(problem)
            row.update(
                candidate_index=k,
                prompt_token_ids=None,
                text=text,
                finish_reason="stop",
                backend="hf",
                error=None,
            )
            per_token["token_ids"].append(rng.integers(0, VOCAB_SIZE, length).astype(np.int32))
            if is_empty:
                row |= scorer_empty | {"vocab_size": VOCAB_SIZE}
                for name in per_token:
                    if name != "token_ids":
                        per_token[name].append(np.zeros(0, np.float32))
            else:
                # A weak signal: each candidate's own offset outweighs the lean towards the correct ones.
                lean = 0.5 if correct else 0.0
                quality = lean + rng.normal(0.0, 1.0)
                steps = int(rng.integers(2, 9))
                sc = rng.normal(8.0 + 2 * quality, 2.0, steps)
                h = np.abs(rng.normal(1.2 - quality / 4, 0.4, steps))
                confidence = rng.normal(6.0 + quality, 1.5, length).astype(np.float32)
                entropy = np.abs(rng.normal(1.0 - quality / 4, 0.5, length)).astype(np.float32)
                certainty = rng.normal(8.0 + 2 * quality, 3.0, length).astype(np.float32)
                logprob = -np.abs(rng.normal(0.5 - quality / 8, 0.4, length)).astype(np.float32)
                per_token["generator_logprobs"].append(logprob)
                per_token["token_entropy"].append(entropy)
                per_token["token_self_certainty"].append(certainty)
                per_token["token_logprob"].append(logprob)
                per_token["token_confidence"].append(confidence)
                row.update(
                    token_count=length,
                    step_self_certainty=sc.tolist(),
                    step_entropy=h.tolist(),
                    step_texts=[f"step {s}" for s in range(steps)],
                    step_self_eval=None,
                    coe_magnitude=np.abs(rng.normal(10 + quality, 2, LAYERS)).tolist(),
                    coe_angle=np.abs(rng.normal(0.5 - quality / 8, 0.1, LAYERS)).tolist(),
                    coe_span_magnitude=float(abs(rng.normal(60, 5))),
                    coe_span_angle=float(abs(rng.normal(1.2, 0.1))),
                    mean_entropy=float(entropy.mean()),
                    mean_self_certainty=float(certainty.mean()),
                    mean_logprob=float(logprob.mean()),
                    step_min_self_certainty=float(sc.min()),
                    step_mean_self_certainty=float(sc.mean()),
                    vocab_size=VOCAB_SIZE,
                )
            for name in columns:
                if name not in per_token:
                    columns[name].append(row.get(name))
    arrays = {}
    for field in SHARD_SCHEMA:
        if field.name in per_token:
            arrays[field.name] = _floats(per_token[field.name], np.int32 if field.name == "token_ids" else np.float32)
        else:
            arrays[field.name] = pa.array(columns[field.name], type=field.type)
    return pa.table(arrays, schema=SHARD_SCHEMA)


def time_reduce_command(folder: Path, extra: list[str]) -> tuple[float, float, str]:
    """Wall seconds and peak RSS (MiB) of `python -m jobs.reduce FOLDER --method all`, and its output."""
    command = [sys.executable, "-m", "jobs.reduce", str(folder), "--method", "all", *extra]
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter(); p = subprocess.run(sys.argv[1:]); t = time.perf_counter() - t\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "print(f'BENCH {t} {peak}', file=sys.stderr); sys.exit(p.returncode)\n"
    )
    done = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"jobs.reduce failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    last = [line for line in done.stderr.splitlines() if line.startswith("BENCH ")][-1].split()
    return float(last[1]), float(last[2]), done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--problems", type=int, default=100)
    parser.add_argument("--num_return_sequences", type=int, default=64, help="N (candidates per problem)")
    parser.add_argument("--sweep", help="comma-separated N values instead of one N (seconds per candidate vs N)")
    parser.add_argument("--tokens", type=int, default=256, help="response tokens (per-token columns at full length)")
    parser.add_argument("--distinct", type=float, default=0.35, help="share of candidates with a distinct wrong answer")
    parser.add_argument("--answer_extraction", default="math-verify", choices=("boxed", "math-verify"))
    parser.add_argument("--folder", help="where to write the run folder (default: a temporary folder, removed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", help="write the table as a JSON record to this path")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sweep.split(",")] if args.sweep else [args.num_return_sequences]
    base = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="bench-reduce-"))
    rows = []
    try:
        for n in sizes:
            folder = base / f"p{args.problems}-n{n}"
            started = time.perf_counter()
            synthesize_run(
                folder, args.problems, n, tokens=args.tokens, distinct=args.distinct,
                answer_extraction=args.answer_extraction, seed=args.seed,
            )  # fmt: skip
            setup = time.perf_counter() - started
            wall, peak, _ = time_reduce_command(folder, [])
            summary = json.loads((folder / "summary.json").read_text())["comparison"]
            stages = summary.get("stage_s", {})
            candidates = args.problems * n
            rows.append(
                {"problems": args.problems, "n": n, "candidates": candidates, "tokens": args.tokens,
                 "distinct": args.distinct, "setup_s": setup, "reduce_wall_s": wall, "peak_rss_mib": peak,
                 "ms_per_candidate": 1000 * wall / candidates, "stage_s": stages,
                 "distinct_answers_median": summary.get("distinct_answers_median"),
                 "math_verify_timeouts": summary.get("math_verify_timeouts")}  # fmt: skip
            )
            print(_table(rows), flush=True)
    finally:
        if not args.folder:
            shutil.rmtree(base, ignore_errors=True)
    if args.record:
        from jobs.bench.records import write_record

        write_record(args.record, {"benchmark": "reduce", "rows": rows})
    return 0


def _table(rows: list[dict]) -> str:
    stage_names = list(dict.fromkeys(name for row in rows for name in row["stage_s"]))
    head = ["P x N", "tokens", "distinct", "median distinct answers", "jobs.reduce wall s", "ms / candidate",
            "peak RSS MiB", *(f"{s} s" for s in stage_names)]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        stages = [f"{r['stage_s'].get(s, math.nan):.2f}" for s in stage_names]
        cells = [f"{r['problems']} x {r['n']}", str(r["tokens"]), f"{r['distinct']:.2f}",
                 str(r["distinct_answers_median"]), f"{r['reduce_wall_s']:.1f}", f"{r['ms_per_candidate']:.2f}",
                 f"{r['peak_rss_mib']:.0f}", *stages]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
