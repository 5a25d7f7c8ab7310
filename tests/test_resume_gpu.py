"""Redone shards on vLLM with a GPU equal the uninterrupted run's, bit for bit (skipped without CUDA and vLLM;
run on the GPU machine)."""

import importlib.util
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from conftest import run_job
from ray_pipeline.shards import shard_path

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None, reason="needs a CUDA device and vLLM"
)


def differing_columns(a, b) -> dict[str, int]:
    """Column name -> rows that differ, rows matched by (problem_id, candidate_index)."""
    order = [("problem_id", "ascending"), ("candidate_index", "ascending")]
    a, b = a.sort_by(order), b.sort_by(order)
    assert a.num_rows == b.num_rows
    return {
        name: sum(x != y for x, y in zip(a.column(name).to_pylist(), b.column(name).to_pylist()))
        for name in a.column_names
        if not a.column(name).equals(b.column(name))
    }


def test_reproducible_vllm_redoes_lost_shards_exactly(tmp_path):
    """Two of four shards lost after a run: the same command redoes them with the first run's tokens and scores,
    though the engine now runs only their requests, not all four shards' at once."""
    args = [
        "--dataset", "embedded:16", "--shard_size", "4", "--num_return_sequences", "4", "--max_tokens", "256",
        "--temperature", "0.7", "--backend", "vllm", "--reproducible", "--output_dir", str(tmp_path), "--run_id", "r",
    ]  # fmt: skip
    first = run_job("jobs.infer", *args, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    shards = tmp_path / "r" / "shards"
    shutil.copytree(shards, tmp_path / "first")
    for lost in (1, 3):
        shard_path(shards, lost).unlink()
    again = run_job("jobs.infer", *args, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 of 4 shards to do" in again.stdout
    for s in range(4):
        redone, kept = pq.read_table(shard_path(shards, s)), pq.read_table(shard_path(tmp_path / "first", s))
        assert not differing_columns(kept, redone), f"shard {s}: {differing_columns(kept, redone)}"
