"""How a config field is declared (`_opt`: its flag, help, range, role and where it matters) and what every
section shares: the roles, the backend predicates of `Matters`, and the range check a section validates itself by.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from ray_pipeline.backends import AUTO, Backend, backends, get_backend
from ray_pipeline.errors import ConfigError

if TYPE_CHECKING:
    from ray_pipeline.config import RunConfig

# Settings whose 'auto' or unset value the machine the actors run on decides: a run's fingerprint
# holds them resolved, so they are compared only once the cluster is known.
DEVICE_RESOLVED_FIELDS = ("backend", "score_pass", "score_chunk_tokens", "score_chunk_vocab")
# What a field changes: the sampled candidates, their stored scores, which candidate is picked, or
# only how the job runs (a section's `ROLE`, or a field's own). The resume fingerprint holds every "samples" and
# "scores" field (config.stored), except where `Matters` says it changes nothing: there it counts as "execution".
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
    """Whether flag `name` is one of the run's backend's `kernel_knobs` where --reproducible holds; without it
    nothing promises that an engine repeats its samples bit for bit (they follow the batch)."""

    def when(config: RunConfig) -> bool | None:
        if not config.reproducible:
            return False
        backend = _backend(config)
        return None if backend is None else name in backend.kernel_knobs

    return when


def _labels(name: str, read: bool) -> str:
    """The backends that read flag `name` (or, with `read` False, that do not), for `Matters.why`."""
    return " and ".join(b.label for b in backends() if (name in b.reads | b.reads_for_traces) == read)


def _kernels(name: str) -> Matters:
    """For a flag whose numbers the backend that reads it computes differently without changing what it samples
    from."""
    return Matters(
        _kernel_knob(name),
        ("backend", "reproducible"),
        f"it changes {_labels(name, True)}'s kernels, and so the last bits of its numbers, which only --reproducible "
        f"keeps ({_labels(name, False)} does not read it)",
    )


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
    """A config field with its flag help, allowed range and other flag names; `role` (one of ROLES) only where it
    changes something other than its section's fields do (`Section.ROLE`).

    `low_open` excludes `low` itself from the range; `off` lets the flag take `off` for None (a field whose default
    is a value). For a samples or scores field: `matters` (a Matters) where it
    changes values, if not everywhere; `default_is(config)` what an unset (None) value resolves to, so a value given
    equal to it is the default; `compared_as` the fingerprint entry that holds all it changes (the data set's
    content), which a resume compares instead of it.
    """
    meta = {"help": help, "role": role, "low": low, "high": high, "low_open": low_open, "choices": choices}
    meta |= {"aliases": aliases, "matters": matters, "default_is": default_is, "compared_as": compared_as, "off": off}
    return field(default=default, metadata=meta, **kw)


def field_choices(f: dataclasses.Field) -> tuple | None:
    """A field's allowed values: a tuple, or a function of none for a registry that grows (the backends)."""
    choices = f.metadata["choices"]
    return choices() if callable(choices) else choices


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


class Section:
    """A config section: a small dataclass of fields under one --help group (`TITLE`) that validates itself.

    `RunConfig` composes the sections (it inherits their fields, so flags, config.json and `config.<field>` stay
    flat); a section also validates alone: its fields' ranges and choices, then `check`, its rules among its own
    fields. Rules that read several sections are functions of the whole config, run by `RunConfig.validate`.
    """

    TITLE: ClassVar[str] = ""
    # What its fields change (one of ROLES), unless a field declares its own role: the fingerprint holds the
    # fields of the sections that change samples or scores (`config.stored`).
    ROLE: ClassVar[str] = "execution"

    def check(self) -> None:
        """Rules among this section's fields, beyond each field's range."""

    def validate(self):
        check_ranges(self)
        self.check()
        return self


def check_ranges(config) -> None:
    """Every field of a section (or of the whole config) against its declaration: set unless it may be None, a
    finite number, one of its choices, in its range; the error names field, range and value."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            if type(None) not in typing.get_args(hints[f.name]):
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
