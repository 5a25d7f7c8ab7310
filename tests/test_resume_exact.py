"""A resume samples exactly what an uninterrupted run samples, for every valid flag set (transformers).

Property test on the in-process seam with the tiny model: generated flag sets (data set size and --limit, shard
and generator batch sizes, batches in flight, N, scorer batch size, online DeepConf with its warm-up) each run
once uninterrupted; a copy of the run folder then loses what an interruption at a random shard leaves undone
(that shard and every later one) and one random earlier shard, and the resume must give the same shard files
and best-answer file, byte for byte. Which batches Ray Data hands the generators (one block each, as the seam
does) is checked on real Ray in test_pool_dispatch.py; a killed job resuming bit for bit on Ray, in
test_resume_e2e.py. vLLM on CPUs takes no per-request seeds, so only a GPU's vLLM with --reproducible
promises the same (tests/test_resume_gpu.py).
"""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import pytest

from conftest import run_in_process
from ray_pipeline.shards import shard_path


def flag_sets(count: int, seed: int) -> list[list[str]]:
    """`count` valid flag sets drawn from every flag that shapes batches, shards or the sampling order."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        problems = rng.randint(3, 7)
        n = rng.randint(2, 3)
        flags = [
            "--dataset", f"embedded:{problems}", "--shard_size", str(rng.randint(1, 4)),
            "--num_return_sequences", str(n), "--max_tokens", str(rng.randint(6, 12)),
            "--temperature", "0.8", "--seed", str(rng.randint(0, 99)), "--backend", "hf",
            "--score_batch_size", str(rng.randint(1, 8)), "--generate_in_flight", str(rng.randint(1, 3)),
        ]  # fmt: skip
        if rng.random() < 0.7:
            flags += ["--generate_batch_size", str(rng.randint(1, 5))]
        if rng.random() < 0.4:
            flags += ["--limit", str(rng.randint(2, problems))]
        if rng.random() < 0.4:
            flags += ["--generation", "deepconf-online", "--warmup_traces", str(rng.randint(1, n - 1))]
            flags += ["--deepconf_window", str(rng.randint(2, 4))]
        cases.append(flags)
    return cases


CASES = flag_sets(10, seed=27)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("shard-*.parquet"))}


def best_file(stdout: str) -> Path:
    return Path(stdout.split("Final results saved to: ")[1].splitlines()[0].strip())


@pytest.mark.parametrize("flags", CASES, ids=[" ".join(c).replace("--", "") for c in CASES])
def test_a_resume_after_an_interruption_equals_the_uninterrupted_run(flags, tiny_model, tmp_path):
    rng = random.Random(" ".join(flags))
    args = [*flags, "--model_path", tiny_model, "--run_id", "run"]
    whole = run_in_process("jobs.infer", *args, "--output_dir", str(tmp_path / "whole"))
    shards = tmp_path / "whole" / "run" / "shards"
    uninterrupted = digests(shards)
    assert uninterrupted, whole

    resumed_out = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole", resumed_out)
    resumed_shards = resumed_out / "run" / "shards"
    count = len(uninterrupted)
    stopped_at = rng.randrange(count)
    lost = set(range(stopped_at, count)) | ({rng.randrange(stopped_at)} if stopped_at else set())
    for shard in lost:
        shard_path(resumed_shards, shard).unlink()
    uninterrupted_best = best_file(whole)
    (resumed_out / uninterrupted_best.relative_to(tmp_path / "whole")).unlink()
    resumed = run_in_process("jobs.infer", *args, "--output_dir", str(resumed_out))

    assert f"{len(lost)} of {count} shards to do" in resumed, resumed
    assert digests(resumed_shards) == uninterrupted
    assert best_file(resumed).read_bytes() == uninterrupted_best.read_bytes()
