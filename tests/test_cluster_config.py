"""cluster.yaml is checked the way `ray up` checks it (defaults filled in, then Ray's JSON schema), its node
configs against EC2's RunInstances parameters, and its structural promises one by one."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
MOUNT = "/mnt/ray-data"  # the shared host directory on each node's big EBS volume


def load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_up_checks(config: dict) -> dict:
    """What `ray up` does before it talks to AWS (ray.autoscaler._private.commands._bootstrap_config):
    merge the provider's defaults.yaml, merge setup commands, fill per-type worker bounds, then validate
    against ray/autoscaler/ray-schema.json plus Ray's cross-field checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def run_instances_checks(node_config: dict) -> None:
    """Ray's AWS provider passes node_config to ec2.create_instances (with MinCount/MaxCount): check it
    against the RunInstances input shape in botocore's bundled service model (offline)."""
    botocore_session = pytest.importorskip("botocore.session")
    from botocore.validate import validate_parameters

    model = botocore_session.get_session().get_service_model("ec2")
    validate_parameters({**node_config, "MinCount": 1, "MaxCount": 1}, model.operation_model("RunInstances").input_shape)


@pytest.fixture(scope="module")
def config() -> dict:
    return load()


@pytest.fixture(scope="module")
def prepared(config) -> dict:
    return ray_up_checks(config)


def node_types(config):
    return config["available_node_types"]


def worker_groups(config):
    return {k: v for k, v in node_types(config).items() if k != config["head_node_type"]}


def test_ray_up_validation_passes(prepared, config):
    assert prepared["provider"]["type"] == "aws"
    # our setup commands replace the defaults (which would install a Ray nightly wheel)
    assert prepared["setup_commands"] == config["setup_commands"]


def test_node_configs_are_valid_run_instances_parameters(config):
    for node_type in node_types(config).values():
        run_instances_checks(node_type["node_config"])


def test_head_takes_no_work(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert head["max_workers"] == 0


def test_worker_groups_scale_from_zero(config):
    groups = worker_groups(config)
    gpu = {k: v for k, v in groups.items() if v["resources"].get("GPU", 0) >= 1}
    cpu = {k: v for k, v in groups.items() if not v["resources"].get("GPU")}
    assert len(gpu) == 1 and len(cpu) == 1
    for node_type in groups.values():
        assert node_type["min_workers"] == 0
        assert 0 < node_type["max_workers"] <= config["max_workers"]
    assert sum(g["max_workers"] for g in groups.values()) <= config["max_workers"]
    (gpu_type,) = gpu.values()
    (cpu_type,) = cpu.values()
    assert re.match(r"g[56]\.", gpu_type["node_config"]["InstanceType"])
    assert re.match(r"[cm]7i\.", cpu_type["node_config"]["InstanceType"])
    # CPU workers are spot; the GPU group is on-demand unless the commented spot block is enabled
    assert cpu_type["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in gpu_type["node_config"]
    assert "MarketType: spot" in CLUSTER_YAML.read_text().split("gpu_transcribe:")[1]


def test_autoscaler_settings_are_explicit(config):
    assert config["idle_timeout_minutes"] > 0
    assert config["upscaling_speed"] > 0
    assert config["max_workers"] >= 2


def test_image_is_a_current_ray_image_matching_the_installed_ray():
    import ray

    image = load()["docker"]["image"]
    m = re.fullmatch(r"rayproject/ray:(\d+)\.(\d+)\.(\d+)-py3\d+-(gpu|cu\d+)", image)
    assert m, f"{image} is not a rayproject/ray GPU image with a pinned version"
    assert m.group(1, 2) == tuple(ray.__version__.split(".")[:2]), (image, ray.__version__)


def test_project_is_uploaded_and_installed(config):
    (remote,) = [r for r, local in config["file_mounts"].items() if local == "."]
    assert any("pip install" in c and f"-e {remote}" in c for c in config["setup_commands"])
    for node_type in worker_groups(config).values():
        # a node type's own worker_setup_commands replace the global ones, so they must install it too
        cmds = node_type.get("worker_setup_commands")
        assert cmds is None or any(f"-e {remote}" in c for c in cmds)


def test_cache_and_spill_are_on_the_big_volume(config):
    options = " ".join(config["docker"]["run_options"])
    assert f"-v {MOUNT}:{MOUNT}" in options
    env = dict(re.findall(r"-e (\w+)=(\S+)", options))
    assert env["RAY_WHISPER_CACHE"].startswith(MOUNT + "/") and env["HF_HOME"].startswith(MOUNT + "/")
    assert env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # job logs get no tqdm bars from model loading
    assert any(MOUNT in c and "mkdir" in c for c in config["initialization_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert len(starts) == 1
        args = shlex.split(starts[0].split("ray start", 1)[1])
        assert f"--object-spilling-directory={MOUNT}/spill" in args
    for name, node_type in node_types(config).items():
        (root,) = node_type["node_config"]["BlockDeviceMappings"]
        assert root["DeviceName"] == "/dev/sda1"
        assert root["Ebs"]["VolumeType"] == "gp3" and root["Ebs"]["VolumeSize"] >= 200, name


def test_node_labels_are_valid_ray_labels(config):
    from ray._private.label_utils import validate_node_label_syntax

    for node_type in node_types(config).values():
        validate_node_label_syntax(node_type.get("labels", {}))


# ---- the checks can fail -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "break_it",
    [
        pytest.param(lambda c: c.update(idle_timeout_minute=5), id="unknown top-level key"),
        pytest.param(lambda c: c["available_node_types"]["gpu_transcribe"].update(min_worker=0), id="unknown node-type key"),
        pytest.param(lambda c: c["available_node_types"]["gpu_transcribe"]["resources"].update(GPU="1"), id="resource as string"),
        pytest.param(lambda c: c["docker"].update(imgae="rayproject/ray:2.60.0-py311-gpu"), id="unknown docker key"),
        pytest.param(lambda c: c.update(head_node_type="ray.head.default"), id="head type not defined"),
        pytest.param(lambda c: c["available_node_types"]["cpu_decode"].update(min_workers=20), id="min above global max"),
    ],
)
def test_a_broken_copy_fails_ray_up_validation(config, break_it):
    broken = copy.deepcopy(config)
    break_it(broken)
    with pytest.raises(Exception) as info:
        ray_up_checks(broken)
    assert type(info.value).__name__ in ("ValidationError", "ValueError"), info.value


def test_a_misspelled_node_config_key_fails_the_ec2_check(config):
    broken = copy.deepcopy(config["available_node_types"]["gpu_transcribe"]["node_config"])
    broken["InstanceTyp"] = broken.pop("InstanceType")
    with pytest.raises(Exception, match="InstanceTyp"):
        run_instances_checks(broken)


def test_a_yaml_typo_in_the_file_itself_fails(tmp_path):
    text = CLUSTER_YAML.read_text().replace("idle_timeout_minutes:", "idle_timeout_minuets:")
    assert text != CLUSTER_YAML.read_text()
    with pytest.raises(Exception, match="idle_timeout_minuets"):
        ray_up_checks(yaml.safe_load(text))
