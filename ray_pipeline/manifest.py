"""The run manifest: what a run folder was made with, its shard plan, and each shard's status.

A run folder is resumed only by the configuration that made it: the fingerprint holds every
setting that changes the candidates or their scores, and a different one is refused with the
fields that differ.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from ray_pipeline.config import RunConfig
from ray_pipeline.errors import PipelineError
from ray_pipeline.prompts import CHAT_INSTRUCTION, ORIGINAL_TEMPLATE
from ray_pipeline.storage import Location, StoragePath

MANIFEST_NAME = "manifest.json"
# Bump when the shard layout or the meaning of a stored score changes.
SHARD_FORMAT_VERSION = 1

COMMITTED, PENDING, FAILED = "committed", "pending", "failed"


def code_version() -> str:
    try:
        package = importlib.metadata.version("ray-bestofn")
    except importlib.metadata.PackageNotFoundError:
        package = "source"
    return f"{package}+shards{SHARD_FORMAT_VERSION}"


def dataset_hash(problems: pa.Table) -> str:
    """Content hash of the planned problems: ids, texts, gold answers and their order."""
    digest = hashlib.sha256()
    for row in problems.select(["problem_id", "problem", "gold"]).to_pylist():
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()


def model_identity(resolved: str) -> str:
    """A cheap identity of a model folder (names, sizes and config of its files), or the Hub id."""
    folder = Path(resolved)
    if not folder.is_dir():
        return resolved
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file():
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
    digest.update((folder / "config.json").read_bytes())
    return digest.hexdigest()[:16]


def fingerprint(config: RunConfig, problems: pa.Table, resolved_model: str) -> dict:
    """Everything that changes a run's outputs. `config` must be resolved (concrete backend)."""
    template = ORIGINAL_TEMPLATE if config.prompt == "original" else CHAT_INSTRUCTION
    return {
        "model_path": config.model_path,
        "model": model_identity(resolved_model),
        "dataset": dataset_hash(problems),
        "num_return_sequences": config.num_return_sequences,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_tokens": config.max_tokens,
        "seed": config.seed,
        "prompt": f"{config.prompt}:{hashlib.sha256(template.encode()).hexdigest()[:12]}",
        "backend": config.backend,
        "dtype": config.dtype,
        "shard_size": config.shard_size,
        "self_eval": getattr(config, "self_eval", False),
        "code_version": code_version(),
    }


def fingerprint_hash(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def differences(old: dict, new: dict) -> list[str]:
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


@dataclass
class Manifest:
    run_id: str
    stamp: str
    model_name: str
    fingerprint: dict
    shards: dict[str, dict] = field(default_factory=dict)

    @property
    def fingerprint_hash(self) -> str:
        return fingerprint_hash(self.fingerprint)

    @classmethod
    def plan(cls, run_id: str, stamp: str, model_name: str, fp: dict, rows: dict[int, int], num_candidates: int):
        shards = {
            str(s): {"problems": n // num_candidates, "rows": n, "status": PENDING} for s, n in sorted(rows.items())
        }
        return cls(run_id, stamp, model_name, fp, shards)

    @classmethod
    def load(cls, run_dir: Location) -> Manifest | None:
        path = StoragePath.parse(run_dir) / MANIFEST_NAME
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise PipelineError(
                f"{path} is not a readable manifest ({exc}); pass --overwrite to start afresh"
            ) from None

    def save(self, run_dir: Location) -> None:
        """Write atomically: a crash leaves the previous manifest, never half of one."""
        (StoragePath.parse(run_dir) / MANIFEST_NAME).write_text(
            json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"
        )

    def expected_rows(self) -> dict[int, int]:
        return {int(s): info["rows"] for s, info in self.shards.items()}

    def set_status(self, shard_id: int, status: str) -> None:
        self.shards[str(shard_id)]["status"] = status

    def with_status(self, status: str) -> list[int]:
        return sorted(int(s) for s, info in self.shards.items() if info["status"] == status)

    def check_same_run(self, fp: dict, run_dir: Location, ignore: tuple[str, ...] = ()) -> None:
        """Refuse another configuration, naming what differs; `ignore` skips fields not yet known."""
        changed = "; ".join(d for d in differences(self.fingerprint, fp) if d.split(" ", 1)[0] not in ignore)
        if changed:
            raise PipelineError(
                f"run folder {run_dir} was made with another configuration ({changed}): "
                "rerun with the same settings, a new --run_id, or --overwrite"
            )


def shards_to_run(
    manifest: Manifest, shards_dir: Location, reprocess: list[int], reprocess_failed: bool
) -> tuple[list[int], list[str]]:
    """The shards a (re)run must produce, and a note for each committed one it redoes or distrusts."""
    from ray_pipeline.shards import check_shard, shard_path

    shards_dir = StoragePath.parse(shards_dir)
    unknown = sorted(set(reprocess) - set(manifest.expected_rows()))
    if unknown:
        raise PipelineError(f"--reprocess_shards names shards {unknown} that the plan does not have")
    todo, notes = [], []
    for shard_id, rows in sorted(manifest.expected_rows().items()):
        problem = check_shard(shard_path(shards_dir, shard_id), rows, manifest.fingerprint_hash)
        if shard_id in reprocess:
            todo.append(shard_id)
            notes.append(f"shard {shard_id}: redo (--reprocess_shards)")
        elif problem and problem.startswith("written by another configuration"):
            raise PipelineError(
                f"shard {shard_id} in {shards_dir} was {problem}: remove it, or pass --reprocess_shards {shard_id}"
            )
        elif problem:
            todo.append(shard_id)
            if problem != "missing":
                notes.append(f"shard {shard_id}: {problem}: redo")
        elif reprocess_failed and manifest.shards[str(shard_id)]["status"] == FAILED:
            todo.append(shard_id)
            notes.append(f"shard {shard_id}: redo (--reprocess_failed)")
    return todo, notes
