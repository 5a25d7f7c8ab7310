"""The online mode's settings: ranges, refused combinations (one line, before Ray), roles and fingerprints."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest

from conftest import run_job
from ray_pipeline.columns import COLUMNS, GENERATOR
from ray_pipeline.config import RunConfig, build_parser, config_fields
from ray_pipeline.config.stored import LATER_FIELDS
from ray_pipeline.data import load_problems
from ray_pipeline.errors import ConfigError
from ray_pipeline.manifest import differences
from ray_pipeline.run_folder import fingerprint

pytestmark = pytest.mark.fast

NEW_FIELDS = {
    "generation": "deepconf-online",
    "engine_confidence": True,
    "warmup_traces": 4,
    "deepconf_percentile": 10.0,
    "consensus": 0.95,
    "consensus_wave": 4,
}
ONLINE = {"generation": "deepconf-online", "num_return_sequences": 8, "warmup_traces": 4, "max_tokens": 128}
SOUND = ONLINE | {"deepconf_window": 64}


@pytest.mark.parametrize(
    "change, message",
    [
        (
            ONLINE | {"warmup_traces": 8},
            "warmup_traces must be in [1, num_return_sequences - 1] with generation deepconf-online (only the "
            "traces after the warm-up can stop), got warmup_traces 8 with num_return_sequences 8",
        ),
        (
            ONLINE | {"deepconf_window": 128},
            "deepconf_window must be below max_tokens with generation deepconf-online (a trace stops only once a "
            "whole window is generated), got deepconf_window 128 with max_tokens 128",
        ),
        (
            SOUND | {"temperature": 0.0},
            "generation deepconf-online samples traces: temperature 0 (greedy) gives identical ones; pass a "
            "temperature in (0, 2]",
        ),
        (SOUND | {"consensus": 0.0}, "consensus must be in (0.0, 1.0], got 0.0"),
        (SOUND | {"deepconf_percentile": 101.0}, "deepconf_percentile must be in [0.0, 100.0], got 101.0"),
        (SOUND | {"warmup_traces": 0}, "warmup_traces must be in [1, inf), got 0"),
        (SOUND | {"generation": "online"}, "generation must be one of full, deepconf-online, got 'online'"),
    ],
)
def test_online_settings_that_cannot_work_are_refused_naming_the_values(change, message):
    with pytest.raises(ConfigError) as err:
        dataclasses.replace(RunConfig(), **change).validate()
    assert str(err.value) == message


def test_a_sound_online_configuration_passes_and_asks_for_traces():
    config = RunConfig(**SOUND, temperature=0.7).validate()
    assert config.trace_requests
    assert RunConfig(engine_confidence=True).trace_requests and not RunConfig().trace_requests


def test_a_refused_online_run_is_one_error_line_before_ray_starts(tmp_path):
    proc = run_job(
        "jobs.infer",
        *("--dataset", "embedded:2", "--generation", "deepconf-online", "--num_return_sequences", "4"),
        *("--warmup_traces", "4", "--output_dir", str(tmp_path)),
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: warmup_traces must be in [1, num_return_sequences - 1] with generation deepconf-online (only the "
        "traces after the warm-up can stop), got warmup_traces 4 with num_return_sequences 4"
    ]
    assert not list(tmp_path.iterdir())


# Defaults chosen after the fields came (issue 26's simulator grid): runs before hold the earlier ones.
CHOSEN_LATER = {"warmup_traces": (16, 8), "consensus": (None, 0.95)}


def test_every_new_field_changes_the_samples_and_is_later():
    samples = {f.name for f in config_fields("samples")}
    assert set(NEW_FIELDS) <= samples
    defaults = RunConfig()
    earlier = {name: CHOSEN_LATER.get(name, (getattr(defaults, name),))[0] for name in NEW_FIELDS}
    assert earlier == {name: LATER_FIELDS[name] for name in NEW_FIELDS}
    assert {name: getattr(defaults, name) for name in CHOSEN_LATER} == {k: v[1] for k, v in CHOSEN_LATER.items()}


def test_a_consensus_off_flag_is_none_and_the_defaults_validate():
    parser = build_parser("t")
    assert parser.parse_args(["--consensus", "off"]).consensus is None
    assert parser.parse_args(["--consensus", "0.9"]).consensus == 0.9
    assert parser.parse_args([]).consensus == 0.95
    # A full run has no use for the online settings: their defaults (and any other value) pass.
    RunConfig().validate()
    RunConfig(consensus=0.5, warmup_traces=100).validate()


@pytest.fixture(scope="module")
def problems():
    return load_problems("embedded:4", shard_size=2)


def test_old_run_folders_keep_their_fingerprint_and_each_new_field_shows_by_name(problems):
    base = RunConfig(backend="hf", **{"max_tokens": 128, "num_return_sequences": 8})
    fp = fingerprint(base, problems, "x/y")
    assert not set(NEW_FIELDS) & set(fp) and not any(k.startswith("online_") for k in fp)
    # The online settings change nothing a full run generates: any value of them leaves its fingerprint.
    online_only = {"warmup_traces", "deepconf_percentile", "consensus", "consensus_wave"}
    for name, value in NEW_FIELDS.items():
        changed = fingerprint(dataclasses.replace(base, **{name: value}), problems, "x/y")
        names = [d.split(" ")[0] for d in differences(fp, changed)]
        assert (name in names) != (name in online_only), name
    online = dataclasses.replace(base, **SOUND | {"warmup_traces": 2}, consensus=0.5)
    online_fp = fingerprint(online, problems, "x/y")
    for name in online_only:
        changed = fingerprint(dataclasses.replace(online, **{name: NEW_FIELDS[name]}), problems, "x/y")
        assert name in [d.split(" ")[0] for d in differences(online_fp, changed)], name
    # A full run re-selects with any window: deepconf_window is a selection field there.
    assert fingerprint(dataclasses.replace(base, deepconf_window=64), problems, "x/y") == fp


def test_an_online_run_fingerprints_the_window_it_stops_by_and_its_consensus_extraction(problems):
    online = RunConfig(backend="hf", **SOUND, consensus=None)
    fp = fingerprint(online, problems, "x/y")
    assert fp["online_deepconf_window"] == 64 and "online_answer_extraction" not in fp
    other = fingerprint(dataclasses.replace(online, deepconf_window=32), problems, "x/y")
    assert differences(fp, other) == ["online_deepconf_window 64 -> 32"]
    # Without a consensus stop answers decide nothing while generating; with one they decide which traces run.
    assert fingerprint(dataclasses.replace(online, answer_extraction="math-verify"), problems, "x/y") == fp
    consensus = dataclasses.replace(online, consensus=0.9)
    with_boxed = fingerprint(consensus, problems, "x/y")
    with_verify = fingerprint(dataclasses.replace(consensus, answer_extraction="math-verify"), problems, "x/y")
    assert differences(with_boxed, with_verify) == ["online_answer_extraction 'boxed' -> 'math-verify'"]


def test_the_online_columns_are_generator_columns_added_later():
    later = {c.name: c for c in COLUMNS if c.later}
    assert set(later) == {"engine_confidence", "phase", "stopped_at", "stop_threshold", "engine_token_count"}
    assert all(c.stage == GENERATOR for c in later.values())
    assert later["engine_confidence"].type == pa.list_(pa.float64())
