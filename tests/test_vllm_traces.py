"""The vLLM backend's traces on a fake AsyncLLM that answers like the real one: confidences from both of vLLM's
log-prob layouts, a final trace that the engine's `WindowStop` ended at the online rule's token (its stop token
in place of a sampled one), refusals."""

from __future__ import annotations

import asyncio
import itertools
import random
from types import SimpleNamespace

import numpy as np
import pytest

from actors.samples import LOW_CONFIDENCE, RequestRefused
from actors.traces import trace_seed
from ray_pipeline.config import RunConfig
from ray_pipeline.deepconf import first_stop, token_confidences

pytestmark = pytest.mark.fast
vllm = pytest.importorskip("vllm")

K = 4
CONFIG = RunConfig(deepconf_top_k=K, deepconf_window=3, max_tokens=30, temperature=0.7, engine_confidence=True)


STOP_TOKEN = 2


class StreamingEngine:
    """AsyncLLM.generate's contract for one n = 1 request: outputs of one or more new tokens (DELTA; a slow
    consumer gets merged deltas) or one final output (FINAL_ONLY); closing the stream early aborts it. A request
    whose extra_args carry the online stop ends where `WindowStop` ends it (tests/test_confidence_stop.py checks
    the processor itself): at the rule's stop point, with the stop token there."""

    def __init__(self, seed: int, flat: bool, refuse: set[int] = frozenset()):
        self.rng = random.Random(seed)
        self.flat, self.refuse = flat, refuse
        self.requests: dict[str, SimpleNamespace] = {}
        self.aborted: list[str] = []

    def trace(self, request_id: str, max_tokens: int):
        if request_id not in self.requests:
            length = self.rng.randint(1, max_tokens)
            top = -np.sort(np.abs(np.random.default_rng(self.rng.randint(0, 1 << 30)).normal(1, 1, (length, K))))
            top = top.astype(np.float32).astype(np.float64)
            sampled_rank = [self.rng.choice([1, 2, K + 3]) for _ in range(length)]
            tokens = list(range(100, 100 + length))
            self.requests[request_id] = SimpleNamespace(tokens=tokens, top=top, ranks=sampled_rank)
        return self.requests[request_id]

    def logprobs(self, t, positions):
        """As vLLM hands them over: a merged delta (a slow consumer's) gets its later positions by way of
        `extend`, which goes through dicts, where a sampled token among the top k is held once."""
        from vllm.logprobs import FlatLogprobs

        out = self.position_logprobs(t, positions[:1])
        for p in positions[1:]:
            out.extend(self.position_logprobs(t, [p]))
        assert isinstance(out, FlatLogprobs) == self.flat
        return out

    def position_logprobs(self, t, positions):
        from vllm.logprobs import FlatLogprobs, Logprob

        out = FlatLogprobs() if self.flat else []
        for p in positions:
            ids = [t.tokens[p]] + [900 + j for j in range(K)]
            rank = t.ranks[p]
            sampled = t.top[p][rank - 1] if rank <= K else t.top[p][-1] - 1.0
            if rank <= K:
                ids[0] = 900 + rank - 1  # the sampled token is the top-k entry of that rank
            values = [float(sampled)] + t.top[p].tolist()
            ranks = [rank] + list(range(1, K + 1))
            entries = {i: Logprob(v, r) for i, v, r in zip(ids, values, ranks)}
            if self.flat:
                out.append_fast(ids, values, iter(ranks), [None] * len(ids))
            else:
                out.append(entries)
        return out

    async def generate(self, prompt, params, request_id):
        from vllm.sampling_params import RequestOutputKind

        assert params.n == 1 and params.logprobs == K and params.detokenize is False
        trace_index = int(request_id.split("-t")[1].split("-")[0])
        if trace_index in self.refuse:
            raise ValueError(f"trace {trace_index} refused")
        t = self.trace(request_id.rsplit("-", 1)[0], params.max_tokens)
        args = (params.extra_args or {}).get("deepconf_trace")
        assert args["seed"] == trace_seed(CONFIG.seed, request_id.rsplit("-", 2)[0], trace_index)
        stop_args = args if "threshold" in args else None
        if stop_args is not None:
            assert (stop_args["window"], stop_args["top_k"]) == (CONFIG.deepconf_window, K)
            assert stop_args["token"] == STOP_TOKEN
            stop = first_stop(token_confidences(t.top), stop_args["window"], stop_args["threshold"])
            if stop is not None:
                t = SimpleNamespace(tokens=t.tokens[: stop - 1] + [STOP_TOKEN], top=t.top[:stop], ranks=t.ranks[:stop])
        n = len(t.tokens)
        finished = False
        try:
            if params.output_kind == RequestOutputKind.FINAL_ONLY:
                chunks = [range(n)]
            else:
                cuts = sorted(self.rng.sample(range(1, n), min(n - 1, self.rng.randint(0, n - 1)))) if n > 1 else []
                chunks = [range(a, b) for a, b in zip([0, *cuts], [*cuts, n])]
            for i, chunk in enumerate(chunks):
                await asyncio.sleep(0)
                last = i == len(chunks) - 1
                completion = SimpleNamespace(
                    token_ids=[t.tokens[p] for p in chunk],
                    logprobs=self.logprobs(t, chunk),
                    finish_reason="stop" if last else None,
                )
                finished = last
                yield SimpleNamespace(outputs=[completion], finished=last)
        finally:
            if not finished:
                self.aborted.append(request_id)


def backend(engine: StreamingEngine, cpu: bool = False):
    from actors.vllm_backend import VLLMGenerator

    b = VLLMGenerator.__new__(VLLMGenerator)
    b.config, b.cpu, b.engine, b.ids, b.stop_token = CONFIG, cpu, engine, itertools.count(), STOP_TOKEN
    return b


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_traces_carry_top_k_confidences_and_stop_where_the_rule_says(seed, flat):
    engine = StreamingEngine(seed, flat)
    threshold = 0.9
    samples = asyncio.run(backend(engine).generate_traces([1, 2, 3], "p", list(range(8)), threshold))
    for k, sample in enumerate(samples):
        t = engine.requests[f"p-t{k}"]
        full = token_confidences(t.top)
        stop = first_stop(full, CONFIG.deepconf_window, threshold)
        kept = stop or len(t.tokens)
        tokens = t.tokens[: kept - 1] + [STOP_TOKEN] if stop else t.tokens
        assert sample.token_ids == tokens and sample.confidences == full[:kept].tolist()
        # Nothing is generated past the stop point: the engine's tokens are the trace's.
        assert sample.stopped_at == stop and sample.engine_tokens in (None, kept)
        assert sample.finish_reason == (LOW_CONFIDENCE if stop else "stop")
    assert not engine.aborted
    assert any(s.stopped_at is None for s in samples) and any(s.stopped_at for s in samples)


def test_the_returned_confidences_decide_where_a_trace_stops():
    """Should the engine's stop and the returned confidences ever part, the vote's confidences decide: the trace is
    cut where the rule stops on them, and what the engine generated after counts as spent."""
    from actors.vllm_backend import stopped_trace

    rng = np.random.default_rng(0)
    for _ in range(200):
        length, window = int(rng.integers(1, 30)), int(rng.integers(1, 6))
        conf = (np.rint(rng.uniform(0.5, 3.0, length) * 65536) / 65536).tolist()
        threshold = float(rng.uniform(0.5, 3.0))
        tokens = list(range(length))
        sample = stopped_trace(tokens, conf, "stop", window, threshold)
        stop = first_stop(conf, window, threshold)
        assert sample.stopped_at == stop
        assert sample.token_ids == tokens[: stop or length] and sample.confidences == conf[: stop or length]
        assert (sample.engine_tokens, sample.finish_reason) == ((length, LOW_CONFIDENCE) if stop else (None, "stop"))


def test_without_a_threshold_a_trace_comes_whole():
    engine = StreamingEngine(0, flat=True)
    samples = asyncio.run(backend(engine).generate_traces([1], "p", [0, 1, 2], None))
    assert all(s.stopped_at is None and s.finish_reason == "stop" for s in samples) and not engine.aborted
    assert all(s.engine_tokens is None for s in samples)  # None: the engine's tokens are the trace's


def test_a_refused_trace_refuses_the_problem():
    engine = StreamingEngine(0, flat=True, refuse={2})
    with pytest.raises(RequestRefused, match="vLLM refused the request: trace 2 refused"):
        asyncio.run(backend(engine).generate_traces([1], "p", [0, 1, 2, 3], 1.0))


@pytest.mark.parametrize("threshold", [None, 1.5])
def test_trace_sampling_params(threshold):
    from vllm.sampling_params import RequestOutputKind

    from actors.confidence_stop import TRACE_ARGS
    from actors.vllm_backend import trace_sampling_params

    seed = trace_seed(0, "p", 5)
    params = trace_sampling_params(CONFIG, seed, threshold, STOP_TOKEN)
    assert (params.n, params.logprobs, params.max_tokens, params.temperature) == (1, K, 30, 0.7)
    # Delivered once, at the trace's end: no token is handled in Python while the engine generates.
    assert params.output_kind == RequestOutputKind.FINAL_ONLY
    # The engine's processor samples it from its seed: vLLM gets none (its V1 sampler loops over seeded requests).
    args = params.extra_args[TRACE_ARGS]
    assert params.seed is None and (args["seed"], args["temperature"], args["top_p"]) == (seed, 0.7, CONFIG.top_p)
    stop = {"threshold": 1.5, "window": CONFIG.deepconf_window, "top_k": K, "token": STOP_TOKEN}
    assert {key: args[key] for key in stop if key in args} == (stop if threshold else {})
    if "flat_logprobs" in type(params).__struct_fields__:
        assert params.flat_logprobs is True
