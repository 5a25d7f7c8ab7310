"""The run configuration: the single source of defaults, flags and validation, in sections.

Every command-line flag is a field of one section (a small dataclass in this package that validates itself and is
one --help group): model and data, sampling, online (DeepConf), selection, scoring, execution, cluster, the vLLM
engine, the run folder. `RunConfig` composes them; `build_parser` derives the flags from the fields, and `validate`
checks ranges and rules without touching files, the network or Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from dataclasses import dataclass

from ray_pipeline.config.cluster import Cluster
from ray_pipeline.config.data import DTYPES, HUB_DATASET, PROMPT_STYLES, ModelData
from ray_pipeline.config.engine import Engine, check_engine_gpus
from ray_pipeline.config.execution import Execution, check_traces, default_generate_batch_size
from ray_pipeline.config.online import GENERATIONS, Online, check_online
from ray_pipeline.config.options import (
    DEVICE_RESOLVED_FIELDS,
    OUTPUT_ROLES,
    ROLES,
    Matters,
    Section,
    _base_type,
    _or_off,
    check_ranges,
    field_choices,
)
from ray_pipeline.config.output import Output, is_plain_name
from ray_pipeline.config.sampling import Sampling
from ray_pipeline.config.scoring import SCORE_CHUNKS, SCORE_PASSES, Scoring, resolve_scoring
from ray_pipeline.config.selection import Selection, check_method_inputs
from ray_pipeline.errors import ConfigError, first_line
from ray_pipeline.storage import Location, StoragePath

# The sections in the order of their fields and --help groups.
SECTIONS: tuple[type[Section], ...] = (
    ModelData, Sampling, Online, Selection, Scoring, Execution, Cluster, Engine, Output
)  # fmt: skip


@dataclass
class RunConfig(Output, Engine, Cluster, Execution, Scoring, Selection, Online, Sampling, ModelData):
    """Everything that decides what a run computes and where it writes: every section's fields (a dataclass takes
    its bases' fields last base first, so they come in `SECTIONS` order)."""

    def validate(self) -> RunConfig:
        """Check every field against its range, then each section's rules and those across sections; raise
        ConfigError naming field, range and value."""
        check_ranges(self)
        ModelData.check(self)
        check_online(self)
        check_traces(self)
        Sampling.check(self)
        # In the order the rules were written, so that of two faults the same one is named as before.
        Output.check_location(self)
        Cluster.check(self)
        check_engine_gpus(self)
        self.reprocess_shard_ids()
        check_method_inputs(self)
        return self

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


# Each field's role (one of ROLES): its section's, or its own where it changes something else.
FIELD_ROLES: dict[str, str] = {
    f.name: f.metadata["role"] or section.ROLE for section in SECTIONS for f in dataclasses.fields(section)
}


def config_fields(role: str) -> list[dataclasses.Field]:
    """RunConfig's fields of one role (one of ROLES), in declaration order."""
    return [FIELDS[name] for name, given in FIELD_ROLES.items() if given == role]


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
    """An argparse parser whose flags are RunConfig's fields, one group per section, with their defaults in --help.

    With `with_defaults=False` a flag that is not given is absent from the parsed namespace, so
    the given flags can override a saved configuration.
    """
    # No abbreviated flags: the resume command repeats the flags as given, and `--overw` must not pass as --overwrite.
    parser = OneLineErrorParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False
    )
    hints = typing.get_type_hints(RunConfig)
    wanted = set(fields) if fields is not None else None
    for section in SECTIONS:
        group = None
        for f in dataclasses.fields(section):
            if wanted is not None and f.name not in wanted:
                continue
            group = group or parser.add_argument_group(section.TITLE)
            kind = _base_type(hints[f.name])
            kwargs = {"default": f.default if with_defaults else argparse.SUPPRESS, "help": f.metadata["help"]}
            if kind is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = _or_off(kind) if f.metadata["off"] else kind
                if f.metadata["choices"]:
                    kwargs["choices"] = field_choices(f)
            flags = [f"--{name}" for name in (f.name, *f.metadata["aliases"])]
            group.add_argument(*flags, dest=f.name, **kwargs)
    return parser


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """A validated RunConfig from parsed flags (fields without a flag keep their defaults)."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(**{k: v for k, v in vars(args).items() if k in names}).validate()


__all__ = [
    "DEVICE_RESOLVED_FIELDS", "DTYPES", "FIELD_ROLES", "FIELDS", "GENERATIONS", "HUB_DATASET", "OUTPUT_ROLES",
    "PROMPT_STYLES", "ROLES", "SCORE_CHUNKS", "SCORE_PASSES", "SECTIONS", "ConfigError", "Matters", "RunConfig",
    "build_parser", "check_traces", "config_fields", "config_from_args", "default_generate_batch_size",
    "field_choices", "is_plain_name", "resolve_scoring",
]  # fmt: skip
