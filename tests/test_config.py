"""The config: defaults, flag mapping, validation messages."""

import dataclasses
import typing

import pytest

from ray_pipeline.config import RunConfig, build_parser, config_from_args
from ray_pipeline.errors import ConfigError


def test_original_defaults():
    cfg = RunConfig().validate()
    assert (cfg.num_return_sequences, cfg.temperature, cfg.max_tokens, cfg.alpha) == (4, 0.1, 1024, 0.4)
    assert cfg.dataset == "HuggingFaceH4/MATH-500"
    assert cfg.output_dir == "results"


def test_every_field_is_a_documented_flag():
    help_text = build_parser("x").format_help()
    for f in dataclasses.fields(RunConfig):
        assert f"--{f.name}" in help_text
        assert f.metadata["help"]


def test_flags_map_onto_fields():
    args = build_parser("x").parse_args(
        ["--num_return_sequences", "8", "--temperature", "0.7", "--alpha", "1", "--enforce_eager", "--limit", "3"]
    )
    cfg = config_from_args(args)
    got = (cfg.num_return_sequences, cfg.temperature, cfg.alpha, cfg.enforce_eager, cfg.limit)
    assert got == (8, 0.7, 1.0, True, 3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_return_sequences": 0}, "num_return_sequences must be in [1, 1024], got 0"),
        ({"temperature": -0.5}, "temperature must be in [0.0, 2.0], got -0.5"),
        ({"alpha": 1.5}, "alpha must be in [0.0, 1.0], got 1.5"),
        ({"max_tokens": 0}, "max_tokens must be in [1, 1000000], got 0"),
        ({"backend": "tpu"}, "backend must be one of auto, vllm, hf, got 'tpu'"),
        ({"temperature": float("nan")}, "temperature must be a finite number, got nan"),
        ({"limit": 0}, "limit must be in [1, inf), got 0"),
        ({"model_path": " "}, "model_path must not be empty"),
        ({"reprocess_shards": "3,x"}, "reprocess_shards must be comma-separated shard numbers, got '3,x'"),
        ({"num_scorers": 3, "max_scorers": 2}, "max_scorers must be in [num_scorers=3, 4096], got 2"),
        (
            {"tensor_parallel_size": 2, "gpus_per_generator": 0.5},
            "gpus_per_generator must be 2 (tensor_parallel_size: one GPU per shard of the model), got 0.5",
        ),
        (
            {"output_dir": "ftp://host/results"},
            "output_dir must be a path or a URI scheme://bucket/path (its scheme 'ftp' is not one of file, s3, gs, "
            "gcs, hdfs, viewfs, abfs, abfss), got 'ftp://host/results'",
        ),
        (
            {"output_dir": "s3://"},
            "output_dir must be a path or a URI scheme://bucket/path (it names no bucket or folder after "
            "scheme://), got 's3://'",
        ),
    ],
)
def test_validation_names_field_range_and_value(change, message):
    with pytest.raises(ConfigError) as err:
        dataclasses.replace(RunConfig(), **change).validate()
    assert str(err.value) == message


def test_config_round_trips_through_json(tmp_path):
    cfg = RunConfig(limit=5, seed=3)
    cfg.save(tmp_path / "config.json")
    import json

    assert RunConfig(**json.loads((tmp_path / "config.json").read_text())) == cfg


def test_original_main_flags_and_selection_defaults():
    args = build_parser("x").parse_args(["--n_repetitive_sampling", "8", "--lambda_weight", "0.3"])
    cfg = config_from_args(args)
    assert (cfg.num_return_sequences, cfg.lambda_weight) == (8, 0.3)
    defaults = RunConfig()
    assert (defaults.method, defaults.lambda_weight, defaults.borda_power) == ("self-certainty", 1.0, 0.5)
    assert (defaults.deepconf_window, defaults.deepconf_top_k, defaults.self_eval) == (2048, 20, False)


def test_self_eval_method_needs_the_self_eval_passes():
    with pytest.raises(ConfigError, match="method self-eval needs self_eval"):
        RunConfig(method="self-eval").validate()
    assert RunConfig(method="self-eval", self_eval=True).validate().self_eval


def test_parser_without_defaults_only_returns_given_flags(tmp_path):
    parser = build_parser("x", ["alpha", "method", "num_return_sequences"], with_defaults=False)
    assert vars(parser.parse_args(["--alpha", "0.7"])) == {"alpha": 0.7}
    RunConfig(alpha=0.2, limit=3).save(tmp_path / "config.json")
    assert RunConfig.load(tmp_path / "config.json") == RunConfig(alpha=0.2, limit=3)


def test_pool_bounds_fixed_and_autoscaling():
    assert RunConfig(num_generators=2).pool_bounds("generators") == (2, 2)
    assert RunConfig(num_scorers=1, max_scorers=4).validate().pool_bounds("scorers") == (1, 4)


def _bad_flag_values() -> list[list[str]]:
    """For every flag: a value of the wrong type, one outside its choices, or none at all; and unknown flags."""
    hints = typing.get_type_hints(RunConfig)
    cases = [["--no_such_flag", "1"], ["--temperature"], ["positional"]]
    for f in dataclasses.fields(RunConfig):
        kind = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        if kind[0] in (int, float):
            cases += [[f"--{f.name}", "abc"], [f"--{f.name}", "1e400x"]]
        elif f.metadata["choices"]:
            cases.append([f"--{f.name}", "no-such-choice"])
        elif kind[0] is bool:
            cases.append([f"--{f.name}", "yes"])
    return cases


@pytest.mark.parametrize("argv", _bad_flag_values(), ids=" ".join)
def test_a_refused_flag_is_one_error_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser("test").parse_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "usage:" not in err, err
