"""The scaling benchmark's table and record from bench results (no GPU, no Ray)."""

import pytest

from jobs.bench.scaling import print_table, scaling_record

pytestmark = pytest.mark.fast


def bench_result(gpus: int, work: float, wall: float) -> dict:
    return {
        "device": f"{gpus} x NVIDIA H200",
        "model": "random",
        "problems": 500,
        "n": 4,
        "max_tokens": 1024,
        "enforce_eager": False,
        "num_generators": gpus,
        "num_scorers": gpus,
        "pipeline_startup_s": 90.0,
        "pipeline_work_s": work,
        "pipeline_wall_s": wall,
        "generated_tokens": 2_048_000,
    }


def test_speed_ups_are_over_the_fewest_gpus_and_the_header_names_the_card(capsys):
    results = {1: bench_result(1, 140.0, 280.0), 2: bench_result(2, 80.0, 160.0), 4: bench_result(4, 40.0, 140.0)}
    record = scaling_record(results)
    assert record["work_speedup"] == {1: 1.0, 2: 1.75, 4: 3.5}
    assert record["wall_speedup"] == {1: 1.0, 2: 1.75, 4: 2.0}
    print_table(results)
    out = capsys.readouterr().out
    assert "NVIDIA H200, 1, 2, 4 GPUs | 500 problems x n=4 x 1024 tokens" in out
    assert "1 x NVIDIA" not in out
    assert "| 4 | 4 / 4 | 90.0 | 40.0 | 140.0 | 51200 | 3.50x | 2.00x |" in out
