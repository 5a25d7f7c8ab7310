"""What a configuration stores: the fingerprint entries of the fields that change a run's samples or scores, and
what keeps a run folder made with one configuration from resuming with another.

The sections say which fields those are (a section's `ROLE`, or a field's own where it differs); a field's
`Matters` says where any value of it computes what its default does: there it holds its default, so any value
names the same run folder and a resume does not compare it. `run_folder.fingerprint` adds the data set's content,
the model's identity, the prompt template and the code version (`manifest.content_entries`).
"""

from __future__ import annotations

from ray_pipeline.config import DEVICE_RESOLVED_FIELDS, FIELD_ROLES, FIELDS, OUTPUT_ROLES, RunConfig

# Samples/scores fields added after the shard format's first runs, with the value those runs had.
# generator_logprobs: runs before it always stored the sampler's log-probs, but nothing selects by them (only a
# cross-check test reads them), so such a run resumes at the default and its new shards store none.
# enforce_eager joined where it changes values: vLLM with --reproducible.
LATER_FIELDS: dict[str, object] = {
    "reproducible": False,
    "enforce_eager": False,
    "generator_logprobs": False,
    "generation": "full",
    "engine_confidence": False,
    "warmup_traces": 16,
    "deepconf_percentile": 90.0,
    "consensus": None,
    "consensus_wave": 8,
}


def role_in(config: RunConfig, name: str) -> str | None:
    """What field `name` changes in this configuration: its role, or "execution" where its `Matters` says it changes
    no value; None while that depends on a setting still 'auto' (decided once the cluster resolves it)."""
    role, matters = FIELD_ROLES[name], FIELDS[name].metadata["matters"]
    if role not in OUTPUT_ROLES or matters is None:
        return role
    holds = matters.when(config)
    if holds is None:
        return None
    return role if holds else "execution"


def unresolved(config: RunConfig) -> set[str]:
    """The DEVICE_RESOLVED_FIELDS still 'auto' or unset: the cluster the actors get decides them."""
    return {name for name in DEVICE_RESOLVED_FIELDS if getattr(config, name) in ("auto", None)}


def stored_fields() -> list[str]:
    """The fields that change the samples or their scores, section by section."""
    return [name for name, role in FIELD_ROLES.items() if role in OUTPUT_ROLES]


def stored_value(config: RunConfig, name: str):
    """A samples or scores field's fingerprint entry: its value where it changes values (or may: while 'auto' is
    unresolved), else its default; a value given equal to what the default resolves to is the default."""
    f = FIELDS[name]
    if role_in(config, name) == "execution":
        # Any value computes the same here: it hashes as the value runs made before the field had (or changed) its
        # default held, so a later default keeps those folders' names.
        return LATER_FIELDS.get(name, f.default)
    value = getattr(config, name)
    default_is = f.metadata["default_is"]
    if default_is is not None and value is not None and value == default_is(config):
        return f.default
    return value


def stored_values(config: RunConfig) -> dict:
    """The configuration's fingerprint entries: every samples and scores field, and the selection settings an online
    run generates by."""
    entries = {name: stored_value(config, name) for name in stored_fields()}
    # Fields added after runs existed leave the fingerprint, and so the default run folder, of those runs
    # as it was while they hold the value every earlier run had.
    entries = {name: value for name, value in entries.items() if LATER_FIELDS.get(name, object()) != value}
    if config.generation == "deepconf-online":
        # Selection fields that decide what an online run generates: the window its traces stop by and, with a
        # consensus stop, how answers are read. Fingerprinted in that mode alone, so full runs re-select with any.
        entries["online_deepconf_window"] = config.deepconf_window
        if config.consensus is not None:
            entries["online_answer_extraction"] = config.answer_extraction
    return entries


def not_compared(config: RunConfig) -> set[str]:
    """Fingerprint entries a resume with `config` does not compare: fields that change no value in this
    configuration (a stored value may be any), fields that wait for the cluster (an 'auto' setting, and what
    depends on one: the job compares them once resolved), and fields compared through the content they select."""
    names = unresolved(config)
    for name in stored_fields():
        if role_in(config, name) in (None, "execution") or FIELDS[name].metadata["compared_as"]:
            names.add(name)
    return names


def resume_differences(old: dict, new: dict, config: RunConfig) -> list[str]:
    """What keeps a run folder made with fingerprint `old` from resuming with `config` (fingerprint `new`)."""

    def entry(fp: dict, key: str):
        value = fp.get(key, LATER_FIELDS.get(key))
        default_is = FIELDS[key].metadata["default_is"] if key in FIELDS else None
        # An unset value and the value it resolves to compute the same (stored by earlier versions as given).
        return default_is(config) if default_is is not None and value is None else value

    skip = not_compared(config)
    changed = [k for k in sorted(set(old) | set(new)) if k not in skip and entry(old, k) != entry(new, k)]
    out = [f"{k} {entry(old, k)!r} -> {entry(new, k)!r}" for k in changed]
    # The fields whose whole effect is a changed content entry name the likely cause beside it.
    for name in stored_fields():
        content = FIELDS[name].metadata["compared_as"]
        if content in changed and old.get(name) != new.get(name):
            out.append(f"{name} {old.get(name)!r} -> {new.get(name)!r}")
    return out
