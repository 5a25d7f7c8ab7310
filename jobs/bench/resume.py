"""Benchmark: the cost of resuming, i.e. scanning and validating every shard of a finished run.

    python -m jobs.bench.resume --problems 500 --num_return_sequences 4 --tokens 1024

Writes a run's worth of shards of the real schema (synthetic contents, full-length per-token
columns) with the real writer, then times the resume scan (`shards_to_run`) and a full read of
the selection columns, and prints a table.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from ray_pipeline.config import RunConfig
from ray_pipeline.data import PROBLEM_SCHEMA
from ray_pipeline.graded_run import reducer_columns
from ray_pipeline.manifest import Manifest, fingerprint_hash
from ray_pipeline.run_folder import fingerprint, shards_to_run
from ray_pipeline.shards import SHARD_SCHEMA, ShardWriter, read_shards


def synthetic_shards(folder: Path, problems: int, n: int, tokens: int, shard_size: int) -> Manifest:
    rng = np.random.default_rng(0)
    plan = pa.Table.from_pylist(
        [
            {"problem_id": f"p{i}", "problem_index": i, "shard_id": i // shard_size, "problem": f"problem {i}"}
            for i in range(problems)
        ],
        schema=PROBLEM_SCHEMA,
    )
    config = RunConfig(backend="hf", num_return_sequences=n, shard_size=shard_size)
    fp = fingerprint(config, plan, "synthetic/model")
    rows_per_shard = {s: n * len(range(s * shard_size, min(problems, (s + 1) * shard_size)))
                      for s in range((problems + shard_size - 1) // shard_size)}  # fmt: skip
    manifest = Manifest.plan("bench", "0", "synthetic", fp, rows_per_shard, n)
    writer = ShardWriter(folder, rows_per_shard, fingerprint=fingerprint_hash(fp))
    for problem in plan.to_pylist():
        rows = []
        for k in range(n):
            floats = rng.random((5, tokens), dtype=np.float32).tolist()
            row = {name: None for name in SHARD_SCHEMA.names} | problem
            row.update(
                candidate_index=k,
                token_ids=rng.integers(0, 49152, tokens).tolist(),
                prompt_token_ids=list(range(100)),
                text="x" * 3 * tokens,
                token_count=tokens,
                token_entropy=floats[0],
                token_self_certainty=floats[1],
                token_logprob=floats[2],
                token_confidence=floats[3],
                generator_logprobs=floats[4],
            )
            rows.append(row)
        writer.add(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA))
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--problems", type=int, default=500)
    parser.add_argument("--num_return_sequences", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--shard_size", type=int, default=50)
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    try:
        started = time.perf_counter()
        manifest = synthetic_shards(folder, args.problems, args.num_return_sequences, args.tokens, args.shard_size)
        written = time.perf_counter() - started
        size = sum(p.stat().st_size for p in folder.glob("*.parquet"))
        started = time.perf_counter()
        todo, _ = shards_to_run(manifest, folder, [], False)
        scan = time.perf_counter() - started
        started = time.perf_counter()
        table = read_shards(folder, reducer_columns())
        read = time.perf_counter() - started
        assert todo == [] and table.num_rows == args.problems * args.num_return_sequences
        print(f"{args.problems} problems x {args.num_return_sequences} candidates x {args.tokens} tokens, "
              f"{len(manifest.shards)} shards, {size / 2**20:.0f} MiB")  # fmt: skip
        print("| step | seconds |\n|---|---:|")
        print(f"| write shards (setup) | {written:.2f} |")
        print(f"| resume scan: validate every shard | {scan:.3f} |")
        print(f"| read the selection columns of every shard | {read:.2f} |")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
