"""The run folder: where a run writes, how it is named, cut into shards, resumed or redone."""

from __future__ import annotations

from dataclasses import dataclass

from ray_pipeline.config.options import Section, _opt
from ray_pipeline.errors import ConfigError
from ray_pipeline.storage import uri_fault


def is_plain_name(name: str) -> bool:
    """A single folder name that stays inside its parent folder on every filesystem and object store."""
    return (
        bool(name.strip())
        and name not in (".", "..")
        and not any(c in name for c in "/\\")
        and all(c.isprintable() for c in name)
    )


@dataclass
class Output(Section):
    """The output folder, the run's name, its shards, and what a rerun redoes."""

    TITLE = "run folder"
    ROLE = "execution"

    output_dir: str = _opt(
        "results",
        "folder for run folders and best-answer files: a local or mounted path, or a URI (s3://bucket/prefix, "
        "gs://..., file://...; options after ?, e.g. ?endpoint_override=host:9000&scheme=http)",
    )
    run_id: str | None = _opt(
        None,
        "run folder name, a plain folder name (default: {dataset}_candidates_{model}_{hash of what the run "
        "computes}, so the same command resumes); an existing one is resumed",
    )
    shard_size: int = _opt(50, "problems per Parquet shard", low=1, role="samples")
    resume: bool = _opt(True, "on an existing run folder redo only missing or broken shards (--no-resume refuses)")
    overwrite: bool = _opt(False, "delete an existing run folder's shards and start over")
    reprocess_shards: str | None = _opt(None, "comma-separated shard ids to redo even if committed, e.g. 3,7")
    reprocess_failed: bool = _opt(False, "redo shards whose rows hold errors (see the manifest and report)")
    allow_partial: bool = _opt(False, "write the best-answer file even if shards are missing (it says so)")

    def check(self) -> None:
        self.check_location()
        self.reprocess_shard_ids()

    def check_location(self) -> None:
        if self.run_id is not None and not is_plain_name(self.run_id):
            raise ConfigError(
                f"run_id must be a plain folder name (no '/', '\\', '..' or control characters), got {self.run_id!r}"
            )
        fault = uri_fault(self.output_dir)
        if fault:
            raise ConfigError(
                f"output_dir must be a path or a URI scheme://bucket/path ({fault}), got {self.output_dir!r}"
            )

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
