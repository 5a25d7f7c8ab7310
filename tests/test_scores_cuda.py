"""The per-token scores on a GPU against a float64 reference (skipped without CUDA; run on the GPU machine)."""

import pytest
import torch

from ray_pipeline.scores import half_head, logit_statistics, token_scores

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(3))
def test_half_head_matches_float64_reference(dtype, seed):
    """A bf16/fp16 head used as it is (float32 accumulation and output) gives the float64 scores of its values."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    tokens, width, vocab = 300 + 97 * seed, 256, 50_000 + 1_234 * seed
    hidden = (torch.randn(tokens, width, device="cuda", generator=gen) * 2).to(dtype)
    weight = (torch.randn(vocab, width, device="cuda", generator=gen) / width**0.5 * (1 + seed)).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    assert half_head(weight)
    got = token_scores(hidden, weight, targets, token_chunk=4096, vocab_chunk=32768)
    want = logit_statistics(hidden.double() @ weight.double().T, targets)
    for name in ("entropy", "self_certainty", "logprob", "confidence"):
        torch.testing.assert_close(getattr(got, name).double(), getattr(want, name), atol=2e-4, rtol=1e-5, msg=name)
    float32 = token_scores(hidden, weight.float(), targets, token_chunk=256, vocab_chunk=16384)
    torch.testing.assert_close(got.entropy, float32.entropy, atol=2e-4, rtol=1e-5)


def test_float32_head_is_not_half():
    assert not half_head(torch.zeros(4, 4, device="cuda"))
    assert not half_head(torch.zeros(4, 4, dtype=torch.bfloat16))
