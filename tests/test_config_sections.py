"""The config in sections (ray_pipeline/config/): each a small dataclass that validates itself and is one --help
group; RunConfig composes them, with flat fields, flags and config.json."""

import dataclasses
import pathlib

import pytest

from ray_pipeline.config import SECTIONS, RunConfig, build_parser
from ray_pipeline.config.options import Section
from ray_pipeline.config.sampling import Sampling
from ray_pipeline.errors import ConfigError

pytestmark = pytest.mark.fast


def test_run_config_is_every_section_s_fields_once_in_section_order():
    names = [f.name for section in SECTIONS for f in dataclasses.fields(section)]
    assert len(names) == len(set(names))
    assert [f.name for f in dataclasses.fields(RunConfig)] == names
    assert all(issubclass(RunConfig, section) and section.TITLE for section in SECTIONS)


def test_help_shows_one_group_per_section_with_its_flags():
    parser = build_parser("test")
    groups = {g.title: [a.dest for a in g._group_actions] for g in parser._action_groups}
    for section in SECTIONS:
        assert groups[section.TITLE] == [f.name for f in dataclasses.fields(section)]
    # A parser of some fields (jobs.reduce's) shows only the groups that hold one.
    subset = build_parser("test", ["alpha", "method", "output_dir"])
    titles = [g.title for g in subset._action_groups if g._group_actions and g.title in {s.TITLE for s in SECTIONS}]
    assert titles == ["selection", "run folder"]


@pytest.mark.parametrize("section", SECTIONS, ids=lambda s: s.__name__)
def test_each_section_validates_itself(section):
    """Its defaults pass alone; each numeric field out of its range is refused naming field, range and value."""
    assert section().validate() is not None
    for f in dataclasses.fields(section):
        low, high = f.metadata["low"], f.metadata["high"]
        if f.metadata["choices"] or (low is None and high is None) or f.type not in ("int", "float", "int | None",
                                                                                  "float | None"):
            continue
        bad = (low - 1) if low is not None else high + 1
        with pytest.raises(ConfigError, match=rf"^{f.name} must be in .*, got {bad}$"):
            section(**{f.name: bad}).validate()


def test_a_section_s_own_rule_runs_alone_and_in_the_whole_config():
    message = "temperature 0 is greedy decoding"
    with pytest.raises(ConfigError, match=message):
        Sampling(temperature=0.0, num_return_sequences=4).validate()
    with pytest.raises(ConfigError, match=message):
        RunConfig(temperature=0.0, num_return_sequences=4).validate()


def test_no_section_is_over_120_lines_and_no_config_module_over_400():
    folder = pathlib.Path(__file__).resolve().parents[1] / "ray_pipeline" / "config"
    for section in SECTIONS:
        module = folder / f"{section.__module__.rsplit('.', 1)[1]}.py"
        assert len(module.read_text().splitlines()) <= 120, module.name
    assert all(len(p.read_text().splitlines()) <= 400 for p in folder.glob("*.py"))
    assert issubclass(Sampling, Section)
