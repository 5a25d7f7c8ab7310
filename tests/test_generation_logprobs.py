"""Log-probs only where a run asks for them: the pipeline's and the benchmark's vLLM sampling parameters."""

import pytest

from ray_pipeline.config import RunConfig, config_fields

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("cpu", [True, False])
def test_full_generation_asks_vllm_for_no_logprobs_unless_the_cross_check_is_on(cpu):
    pytest.importorskip("vllm")
    from actors.vllm_backend import plain_sampling_params, sampling_params

    config = RunConfig(num_return_sequences=3, temperature=0.7, top_p=0.9, max_tokens=17)
    params = sampling_params(config, "p0", cpu=cpu)
    assert params.logprobs is None and params.detokenize is False
    assert (params.n, params.temperature, params.top_p, params.max_tokens) == (3, 0.7, 0.9, 17)
    assert (params.seed is None) == cpu
    assert sampling_params(RunConfig(generator_logprobs=True), "p0", cpu=cpu).logprobs == 0
    # The benchmark's raw side is what a user would call: the same sampling, no log-probs, text detokenized.
    plain = plain_sampling_params(config, "p0", cpu=cpu)
    assert plain.logprobs is None and plain.detokenize is True
    assert (plain.n, plain.temperature, plain.top_p, plain.max_tokens, plain.seed) == (
        params.n,
        params.temperature,
        params.top_p,
        params.max_tokens,
        params.seed,
    )


def test_the_cross_check_changes_what_shards_store_so_it_is_fingerprinted():
    assert "generator_logprobs" in [f.name for f in config_fields("scores")]
