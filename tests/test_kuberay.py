"""deploy/kuberay/*.yaml checked offline (no cluster, no kubectl, no Ray started), three ways:

1. against the RayJob and RayService CRDs of a pinned KubeRay release, as JSON Schema
   (tests/data/kuberay/*.schema.json, made by tools/kuberay_schema.py): strict, so a misspelled field fails;
2. against KubeRay's own spec rules, the checks its operator runs before it makes anything
   (ray-operator/controllers/ray/utils/validation.go at that release), written here as Python;
3. through Ray's own conversion of a RayCluster into the autoscaler's config (the oracle for what scales).

Beside them, the manifests' promises to this project: the entrypoint parses with the CLI, the pool fits the
GPU group, the images and rayVersion are the locked Ray, credentials come only from the Secret, the runtime
env is one Ray accepts, and the endpoint's args are options of the app. Each rule is shown to reject a
broken variant.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kuberay"
SCHEMAS = ROOT / "tests" / "data" / "kuberay"
# The KubeRay release the schemas come from (their $comment names it); to move on, see tools/kuberay_schema.py.
KUBERAY_RELEASE = "ray-project/kuberay v1.7.0 (59d663aeec13760646da3db9c1cf8cfe883e30b7)"
RAY_VERSION = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
KINDS = {"rayjob": "RayJob", "rayservice": "RayService"}
CLUSTER_KEY = {"rayjob": "rayClusterSpec", "rayservice": "rayClusterConfig"}
# validation.go's limits: a RayJob's or RayService's cluster is named after it, plus 6 characters
MAX_NAME_LENGTH = 53 - 6
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
RAY_START_RESOURCES = ("num-cpus", "num-gpus", "memory", "resources")


@cache
def _text(name: str) -> str:
    return (DEPLOY / f"{name}.yaml").read_text()


def load(name: str) -> dict:
    """A fresh copy of the manifest deploy/kuberay/NAME.yaml, free to mutate."""
    return copy.deepcopy(yaml.safe_load(_text(name)))


def cluster(doc: dict) -> dict:
    return doc["spec"][CLUSTER_KEY[doc["kind"].lower()]]


def group(doc: dict, name: str) -> dict:
    (found,) = [g for g in cluster(doc)["workerGroupSpecs"] if g["groupName"] == name]
    return found


def containers(doc: dict) -> list[dict]:
    spec = cluster(doc)
    return [c for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]] for c in g["template"]["spec"]["containers"]]


def gpu_groups(doc: dict) -> list[dict]:
    return [g for g in cluster(doc)["workerGroupSpecs"]
            if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})]


def gpu_capacity(doc: dict) -> float:
    """GPUs the cluster can grow to: each GPU group's maxReplicas x the GPUs of one pod."""
    return sum(g["maxReplicas"] * float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in gpu_groups(doc))


# ---------------------------------------------------------------------------------------------------------
# 1. The CRD's schema


@cache
def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def schema_errors(doc: dict) -> list[str]:
    """Where and why the CRD's schema rejects `doc`, as `kubectl apply` (strict field validation) would."""
    errors = validator(doc["kind"].lower()).iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


@pytest.mark.parametrize("name", KINDS)
def test_schema_is_the_pinned_release_and_well_formed(name):
    schema = validator(name).schema
    assert KUBERAY_RELEASE in schema["$comment"] and f"{KINDS[name]} ray.io/v1" in schema["$comment"]
    jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("name", KINDS)
def test_manifest_matches_the_crd(name):
    doc = load(name)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", KINDS[name])
    assert schema_errors(doc) == []


def _parent(doc: dict, path: str):
    """The node holding the field at a dotted path (list indexes as numbers), and the field's key."""
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    for p in parents:
        doc = doc[p]
    return doc, last


def _set(path: str, value):
    """A mutation: the field at `path` set to `value`."""
    def mutate(doc):
        node, key = _parent(doc, path)
        node[key] = value
    return mutate


def _rename(path: str, new: str):
    """A mutation: a misspelling, the field at `path` renamed to `new`."""
    def mutate(doc):
        node, key = _parent(doc, path)
        node[new] = node.pop(key)
    return mutate


def _drop(path: str):
    """A mutation: the field at `path` left out."""
    def mutate(doc):
        node, key = _parent(doc, path)
        del node[key]
    return mutate


JOB_HEAD = "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0"
JOB_GPU = "spec.rayClusterSpec.workerGroupSpecs.1"
SERVE_GROUP = "spec.rayClusterConfig.workerGroupSpecs.0"
SCHEMA_BREAKS = {
    "misspelled spec field": ("rayjob", _rename("spec.shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
                              "spec: Additional properties are not allowed ('shutdownAfterJobFinish'"),
    "misspelled group field": ("rayjob", _rename(f"{JOB_GPU}.minReplicas", "minReplica"),
                               f"{JOB_GPU}: Additional properties"),
    "misspelled container field, deep in the pod template": (
        "rayjob", _rename(f"{JOB_HEAD}.image", "imagee"), f"{JOB_HEAD}: Additional properties"),
    "misspelled secret reference": ("rayjob", _rename(f"{JOB_HEAD}.env.0.valueFrom.secretKeyRef", "secretRef"),
                                    f"{JOB_HEAD}.env.0.valueFrom: Additional properties"),
    "replicas as text": ("rayjob", _set(f"{JOB_GPU}.maxReplicas", "8"),
                         f"{JOB_GPU}.maxReplicas: '8' is not of type 'integer'"),
    "TTL as text": ("rayjob", _set("spec.ttlSecondsAfterFinished", "60"),
                    "spec.ttlSecondsAfterFinished: '60' is not of type"),
    "TTL past int32": ("rayjob", _set("spec.ttlSecondsAfterFinished", 2**31),
                       "spec.ttlSecondsAfterFinished: 2147483648 is greater"),
    "unknown upscaling mode": ("rayjob", _set("spec.rayClusterSpec.autoscalerOptions.upscalingMode", "Fast"),
                               "autoscalerOptions.upscalingMode: 'Fast' is not one of"),
    "rayStartParams value not text": ("rayjob", _set("spec.rayClusterSpec.headGroupSpec.rayStartParams.num-cpus", 0),
                                      "rayStartParams.num-cpus: 0 is not of type 'string'"),
    "secret reference without its key": ("rayjob", _drop(f"{JOB_HEAD}.env.0.valueFrom.secretKeyRef.key"),
                                         "'key' is a required property"),
    "container without a name": ("rayjob", _drop(f"{JOB_HEAD}.name"), "'name' is a required property"),
    "serveConfigV2 as a mapping": ("rayservice", lambda d: d["spec"].update(serveConfigV2={"applications": []}),
                                   "spec.serveConfigV2: {'applications': []} is not of type 'string'"),
    "a RayJob's field name in a RayService": ("rayservice", _rename("spec.rayClusterConfig", "rayClusterSpec"),
                                              "Additional properties are not allowed ('rayClusterSpec'"),
    "misspelled worker group field in a RayService": ("rayservice", _rename(f"{SERVE_GROUP}.groupName", "group"),
                                                      "Additional properties are not allowed ('group'"),
}


@pytest.mark.parametrize("case", SCHEMA_BREAKS)
def test_crd_schema_rejects_a_broken_manifest(case):
    name, mutate, expected = SCHEMA_BREAKS[case]
    doc = load(name)
    mutate(doc)
    errors = schema_errors(doc)
    assert any(expected in e for e in errors), errors


def test_conversion_of_kubernetes_schema_extensions():
    """tools/kuberay_schema.py on the extensions the pinned CRDs use and on the ones they might start to."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kuberay_schema", ROOT / "tools" / "kuberay_schema.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    crd_node = {"type": "object", "required": ["size", "name"], "properties": {
        "name": {"type": "string", "description": "dropped"},
        "size": {"x-kubernetes-int-or-string": True, "default": 1},
        "count": {"type": "integer", "format": "int32"},
        "note": {"type": "string", "nullable": True},
        "config": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "tags": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}, "x-kubernetes-map-type": "atomic"}}}
    validate = jsonschema.Draft202012Validator(tool.convert(crd_node)).is_valid
    assert validate({"name": "a", "size": "10%", "count": 3, "note": None, "config": {"any": {"thing": 1}},
                     "tags": ["x", "y"], "labels": {"k": "v"}})
    assert validate({"name": "a"})  # size has a default: the API server fills it in before validating
    for broken in ({}, {"name": "a", "nmae": "b"}, {"name": "a", "size": 1.5}, {"name": "a", "count": 2**31},
                   {"name": "a", "tags": ["x", "x"]}, {"name": "a", "labels": {"k": 1}}, {"name": None}):
        assert not validate(broken), broken
    with pytest.raises(ValueError, match="x-kubernetes-new"):
        tool.convert({"type": "object", "x-kubernetes-new": True})


# ---------------------------------------------------------------------------------------------------------
# 2. KubeRay's spec rules (validation.go: ValidateRayJobMetadata/Spec, ValidateRayServiceMetadata/Spec,
#    ValidateRayClusterSpec), those that apply to what these manifests set


def name_problems(doc: dict) -> list[str]:
    name = doc["metadata"].get("name", "")
    problems = [f"name {name!r} is longer than {MAX_NAME_LENGTH}"] if len(name) > MAX_NAME_LENGTH else []
    if not (DNS_1035_LABEL.fullmatch(name) and len(name) <= 63):
        problems.append(f"name {name!r} is not a DNS-1035 label")
    return problems


def cluster_problems(spec: dict) -> list[str]:
    """ValidateRayClusterSpec, for what these manifests can set."""
    autoscaling = spec.get("enableInTreeAutoscaling") is True
    v2 = spec.get("autoscalerOptions", {}).get("version") == "v2"
    head = spec["headGroupSpec"]
    if not head["template"]["spec"].get("containers"):
        return ["headGroupSpec should have at least one container"]
    head_env = {e["name"]: e.get("value") for e in head["template"]["spec"]["containers"][0].get("env", [])}
    problems = []
    for g in [head, *spec.get("workerGroupSpecs", [])]:
        label = g.get("groupName", "Head")
        if not g["template"]["spec"].get("containers"):
            problems.append(f"worker group {label} should have at least one container")
        start = g.get("rayStartParams", {})
        if any(start.get(k) for k in RAY_START_RESOURCES) and g.get("resources"):
            problems.append(f"{label}: resources set in both rayStartParams and resources")
        if "labels" in start:
            problems.append(f"{label}: rayStartParams['labels'] is not supported; use labels")
        if g is head:
            continue
        low, high = g.get("minReplicas"), g.get("maxReplicas")
        if not autoscaling and (low is None or high is None):
            problems.append(f"worker group {label} must set both minReplicas and maxReplicas without autoscaling")
        if (low is not None and low < 0) or (high is not None and high < 0):
            problems.append(f"worker group {label} has negative replicas")
        if low is not None and high is not None and low > high:
            problems.append(f"worker group {label} has minReplicas {low} greater than maxReplicas {high}")
        if g.get("idleTimeoutSeconds") is not None and not (v2 or head_env.get("RAY_enable_autoscaler_v2") in ("1", "true")):
            problems.append(f"worker group {label}: idleTimeoutSeconds needs autoscaler v2")
        if g.get("suspend") and autoscaling:
            problems.append(f"worker group {label} cannot be suspended with autoscaling")
    if not autoscaling and head_env.get("RAY_enable_autoscaler_v2") in ("1", "true"):
        problems.append("RAY_enable_autoscaler_v2 without enableInTreeAutoscaling")
    if spec.get("autoscalerOptions", {}).get("idleTimeoutSeconds", 0) < 0:
        problems.append("autoscalerOptions.idleTimeoutSeconds must be non-negative")
    return problems


def rayjob_problems(doc: dict) -> list[str]:
    """ValidateRayJobMetadata and ValidateRayJobSpec."""
    spec = doc["spec"]
    problems = name_problems(doc)
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    if spec.get("suspend") and not shutdown:
        problems.append("a RayJob with shutdownAfterJobFinishes false cannot be suspended")
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        problems.append("ttlSecondsAfterFinished must be non-negative")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not shutdown:
        problems.append("a RayJob with shutdownAfterJobFinishes false cannot have ttlSecondsAfterFinished")
    if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
        problems.append("one of rayClusterSpec or clusterSelector must be set")
    if spec.get("rayClusterSpec"):
        problems += cluster_problems(spec["rayClusterSpec"])
    try:  # UnmarshalRuntimeEnvYAML: into a map
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", ""))
        if runtime_env is not None and not isinstance(runtime_env, dict):
            problems.append("runtimeEnvYAML is not a mapping")
    except yaml.YAMLError as e:
        problems.append(f"runtimeEnvYAML does not parse: {e}")
    for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if spec.get(field) is not None and spec[field] <= 0:
            problems.append(f"{field} must be a positive integer")
    if spec.get("backoffLimit") is not None and spec["backoffLimit"] < 0:
        problems.append("backoffLimit must be non-negative")
    return problems


def rayservice_problems(doc: dict) -> list[str]:
    """ValidateRayServiceMetadata and ValidateRayServiceSpec."""
    spec = doc["spec"]
    problems = name_problems(doc) + cluster_problems(spec["rayClusterConfig"])
    if spec["rayClusterConfig"]["headGroupSpec"].get("headService", {}).get("metadata", {}).get("name"):
        problems.append("headService.metadata.name should not be set")
    upgrade = spec.get("upgradeStrategy", {}).get("type")
    if upgrade is not None and upgrade not in ("None", "NewCluster", "NewClusterWithIncrementalUpgrade"):
        problems.append(f"upgradeStrategy.type {upgrade} is invalid")
    if spec.get("rayClusterDeletionDelaySeconds", 0) < 0:
        problems.append("rayClusterDeletionDelaySeconds must be non-negative")
    return problems


PROBLEMS = {"rayjob": rayjob_problems, "rayservice": rayservice_problems}


@pytest.mark.parametrize("name", KINDS)
def test_manifest_passes_kuberays_rules(name):
    assert PROBLEMS[name](load(name)) == []


RULE_BREAKS = {
    "no cluster": ("rayjob", lambda d: d["spec"].pop("rayClusterSpec"), "one of rayClusterSpec or clusterSelector"),
    "TTL without shutdown": ("rayjob", _set("spec.shutdownAfterJobFinishes", False), "cannot have ttlSecondsAfterFinished"),
    "suspend without shutdown": ("rayjob", lambda d: d["spec"].update(suspend=True, shutdownAfterJobFinishes=False,
                                                                      ttlSecondsAfterFinished=0), "cannot be suspended"),
    "negative TTL": ("rayjob", _set("spec.ttlSecondsAfterFinished", -1), "must be non-negative"),
    "runtime env that does not parse": ("rayjob", _set("spec.runtimeEnvYAML", "pip: [torch\nenv_vars: {"), "does not parse"),
    "runtime env that is a list": ("rayjob", _set("spec.runtimeEnvYAML", "- pip\n"), "not a mapping"),
    "name with capitals": ("rayjob", _set("metadata.name", "Ray-Whisper"), "not a DNS-1035 label"),
    "name starting with a digit": ("rayservice", _set("metadata.name", "1-whisper"), "not a DNS-1035 label"),
    "name too long for its cluster": ("rayjob", _set("metadata.name", "r" * 48), "longer than 47"),
    "min above max": ("rayjob", _set(f"{JOB_GPU}.minReplicas", 9), "greater than maxReplicas"),
    "negative replicas": ("rayservice", _set(f"{SERVE_GROUP}.minReplicas", -1), "negative replicas"),
    "resources twice": ("rayjob", lambda d: group(d, "gpu-transcribe").update(rayStartParams={"num-gpus": "1"},
                                                                                resources={"GPU": "1"}), "resources set in both"),
    "idle timeout per group on autoscaler v1": ("rayjob", _set(f"{JOB_GPU}.idleTimeoutSeconds", 60), "needs autoscaler v2"),
    "no bounds without autoscaling": ("rayservice", lambda d: (cluster(d).update(enableInTreeAutoscaling=False),
                                                               _drop(f"{SERVE_GROUP}.maxReplicas")(d)),
                                      "must set both minReplicas and maxReplicas"),
    "head without containers": ("rayservice", _set("spec.rayClusterConfig.headGroupSpec.template.spec.containers", []),
                                "at least one container"),
    "unknown upgrade strategy": ("rayservice", lambda d: d["spec"].update(upgradeStrategy={"type": "BlueGreen"}), "is invalid"),
}


@pytest.mark.parametrize("case", RULE_BREAKS)
def test_kuberays_rules_reject_a_broken_manifest(case):
    name, mutate, expected = RULE_BREAKS[case]
    doc = load(name)
    mutate(doc)
    problems = PROBLEMS[name](doc)
    assert any(expected in p for p in problems), problems


# ---------------------------------------------------------------------------------------------------------
# 3. Ray's autoscaler, reading the cluster as it reads a RayCluster on Kubernetes


def autoscaling_config(doc: dict) -> dict:
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    ray_cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster",
                   "metadata": {"name": doc["metadata"]["name"], "namespace": "default"}, "spec": cluster(doc)}
    return _derive_autoscaling_config_from_ray_cr(copy.deepcopy(ray_cluster))


def test_autoscaler_sees_a_gpu_group_from_zero_and_a_cpu_group_for_the_batch_job():
    config = autoscaling_config(load("rayjob"))
    types = config["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0  # the head takes no work
    gpu, cpu = types["gpu-transcribe"], types["cpu-decode"]
    assert (gpu["min_workers"], gpu["max_workers"]) == (0, 8)
    assert gpu["resources"]["GPU"] == 1 and gpu["resources"]["CPU"] == 4
    assert (cpu["min_workers"], cpu["max_workers"]) == (0, 8)
    assert "GPU" not in cpu["resources"] and cpu["resources"]["CPU"] == 8
    assert config["idle_timeout_minutes"] == 5


def test_autoscaler_sees_the_endpoints_gpu_group():
    config = autoscaling_config(load("rayservice"))
    gpu = config["available_node_types"]["gpu-serve"]
    assert (gpu["min_workers"], gpu["max_workers"]) == (1, 4)
    assert gpu["resources"]["GPU"] == 1


def test_autoscaler_finds_no_gpu_without_the_pods_gpu_limit():
    """The oracle has teeth: the GPU the autoscaler plans with comes from the pod's nvidia.com/gpu."""
    doc = load("rayjob")
    for resources in group(doc, "gpu-transcribe")["template"]["spec"]["containers"][0]["resources"].values():
        resources.pop("nvidia.com/gpu")
    assert "GPU" not in autoscaling_config(doc)["available_node_types"]["gpu-transcribe"]["resources"]


# ---------------------------------------------------------------------------------------------------------
# The manifests' promises to this project


def entrypoint_options(doc: dict):
    """The RayJob's entrypoint, parsed by the CLI's own parser (as jobs/transcribe.py does)."""
    from ray_whisper import cli

    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/transcribe.py"] and (ROOT / argv[1]).is_file()
    return cli.build_parser().parse_args(["transcribe", *argv[2:]])


def test_job_entrypoint_parses_and_its_pool_fits_the_gpu_group():
    doc = load("rayjob")
    args = entrypoint_options(doc)
    assert args.gpus_per_actor == 1 and args.max_actors == 8  # explicit: no GPU exists when the job starts
    assert args.max_actors * args.gpus_per_actor <= gpu_capacity(doc)


def test_a_pool_larger_than_the_gpu_group_is_caught():
    doc = load("rayjob")
    group(doc, "gpu-transcribe")["maxReplicas"] = 4
    args = entrypoint_options(doc)
    assert args.max_actors * args.gpus_per_actor > gpu_capacity(doc)


def image_problems(doc: dict) -> list[str]:
    """Every pod runs the locked Ray on Python 3.11, the CUDA image exactly where a GPU is asked for."""
    problems = [] if cluster(doc)["rayVersion"] == RAY_VERSION else [f"rayVersion is not {RAY_VERSION}"]
    gpu_names = {g["groupName"] for g in gpu_groups(doc)}
    spec = cluster(doc)
    for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        suffix = "-gpu" if g.get("groupName") in gpu_names else ""
        image = g["template"]["spec"]["containers"][0]["image"]
        if image != f"rayproject/ray:{RAY_VERSION}-py311{suffix}":
            problems.append(f"{g.get('groupName', 'head')}: {image}")
    return problems


@pytest.mark.parametrize("name", KINDS)
def test_images_are_the_locked_ray(name):
    doc = load(name)
    assert gpu_groups(doc) and image_problems(doc) == []
    group_ = gpu_groups(doc)[0]
    group_["template"]["spec"]["containers"][0]["image"] = f"rayproject/ray:{RAY_VERSION}-py311"
    assert image_problems(doc) != []  # a GPU group on the CPU image is caught


def credential_problems(doc: dict) -> list[str]:
    """Every pod of the job gets the AWS keys, and only from the Secret, never as literal values."""
    problems = []
    for c in containers(doc):
        env = {e["name"]: e for e in c.get("env", [])}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            ref = env.get(key, {}).get("valueFrom", {}).get("secretKeyRef", {})
            if ref.get("name") != "ray-whisper-aws" or ref.get("key") != key or ref.get("optional"):
                problems.append(f"{c['name']}: {key} is not from the secret ray-whisper-aws")
        problems += [f"{c['name']}: {k} is a literal" for k, e in env.items() if k.startswith("AWS_") and "value" in e]
    return problems


def test_job_credentials_come_from_the_secret():
    doc = load("rayjob")
    assert len(containers(doc)) == 3 and credential_problems(doc) == []
    group(doc, "cpu-decode")["template"]["spec"]["containers"][0]["env"] = [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]
    assert any("literal" in p for p in credential_problems(doc))


def runtime_envs(doc: dict) -> list[dict]:
    if doc["kind"] == "RayJob":
        return [yaml.safe_load(doc["spec"]["runtimeEnvYAML"])]
    return [a["runtime_env"] for a in yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]]


def runtime_env_problems(env: dict) -> list[str]:
    """Ray's own parsing of the runtime env (RuntimeEnv checks the pip and env_vars fields), no field Ray does
    not know, and the project's source, package and lock all from one commit."""
    from ray.runtime_env import RuntimeEnv

    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as e:
        return [str(e)]
    problems = [f"unknown runtime env field {k}" for k in sorted(set(env) - RuntimeEnv.known_fields)]
    urls = [env.get("working_dir", ""), *env["pip"]["packages"], *env["pip"]["pip_install_options"]]
    commits = {m.group(1) for u in urls for m in [re.search(r"/(?:archive/)?([^/]+?)(?:\.zip|/constraints\.txt)$", u)] if m}
    if len(commits) != 1:
        problems.append(f"the project comes from more than one commit: {sorted(commits)}")
    if not any(p.startswith("ray-whisper @ ") for p in env["pip"]["packages"]):
        problems.append("the project is not installed")
    if not any(o.endswith("/constraints.txt") for o in env["pip"]["pip_install_options"]):
        problems.append("the project's lock (constraints.txt) does not apply")
    return problems


@pytest.mark.parametrize("name", KINDS)
def test_runtime_env_installs_the_project_from_one_commit(name):
    for env in runtime_envs(load(name)):
        assert runtime_env_problems(env) == []
        assert runtime_env_problems({**env, "env_vars": {"A": 1}}) != []  # Ray's own check: values are text
        assert runtime_env_problems({**env, "workdir": "."}) == ["unknown runtime env field workdir"]
        other = {**env, "pip": {**env["pip"], "packages": ["ray-whisper @ https://example.com/o/r/archive/other.zip"]}}
        assert any("more than one commit" in p for p in runtime_env_problems(other))
    if name == "rayjob":
        assert runtime_envs(load(name))[0]["working_dir"].endswith(".zip")  # jobs/transcribe.py comes with it


def serve_app_problems(doc: dict) -> list[str]:
    """serveConfigV2 as Serve reads it (its schema), the app's import path, and args the app accepts:
    option names of `ray-whisper serve`, as text, that make valid ServeOptions."""
    from ray.serve.schema import ServeDeploySchema

    from ray_whisper import config

    try:
        deploy = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    except Exception as e:  # noqa: BLE001 - pydantic's ValidationError, named in the message
        return [f"serveConfigV2: {e}"]
    problems = []
    (application,) = deploy.applications
    if application.import_path != "ray_whisper.serve:app":
        problems.append(f"import_path {application.import_path}")
    args = application.args
    groups = (config.DecodingOptions, config.ChunkOptions, config.ServeOptions)
    known = {n for cls in groups for n in config.field_names(cls)}
    problems += [f"{k} is not an option of the endpoint" for k in args if k.replace("-", "_") not in known]
    problems += [f"{k}: {v!r} is not text" for k, v in args.items() if not isinstance(v, str)]
    if problems:
        return problems
    serve_args = {k: args[k] for k in config.field_names(config.ServeOptions) if k in args}
    try:
        options = config.ServeOptions(**{k: config.parse_text(config.ServeOptions, k, v) for k, v in serve_args.items()})
    except Exception as e:  # noqa: BLE001 - ConfigError, or a number that is not one
        return [str(e)]
    if options.gpus_per_replica is None:
        problems.append("gpus_per_replica not set: the cluster has no GPU when the app is built, so replicas would get none")
    elif options.max_replicas * options.gpus_per_replica > gpu_capacity(doc):
        problems.append("max_replicas x gpus_per_replica is more than the GPU group can hold")
    return problems


SERVE_WARNINGS = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.serve")  # Ray's pydantic fields


@SERVE_WARNINGS
def test_endpoint_app_and_its_args():
    assert serve_app_problems(load("rayservice")) == []


def _args(**change):
    def mutate(doc):
        serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
        args = serve_config["applications"][0]["args"]
        args.update(change)
        for k in [k for k, v in args.items() if v is None]:
            del args[k]
        doc["spec"]["serveConfigV2"] = yaml.safe_dump(serve_config)
    return mutate


@SERVE_WARNINGS
@pytest.mark.parametrize("mutate, expected", [
    (_args(max_replica="4"), "max_replica is not an option"),
    (_args(max_replicas=4), "4 is not text"),
    (_args(min_replicas="5"), "--min-replicas (5) must be >= 1 and <= --max-replicas (4)"),
    (_args(max_replicas="8"), "more than the GPU group can hold"),
    (_args(gpus_per_replica=None), "gpus_per_replica not set"),
    (lambda d: d["spec"].update(serveConfigV2="applications:\n  - import_path: ray_whisper.serve:app\n    route_prefix: 7\n"),
     "serveConfigV2"),
], ids=["misspelled option", "number not text", "min above max", "more replicas than GPUs", "no GPU per replica",
        "serve schema"])
def test_endpoint_args_that_would_fail_are_caught(mutate, expected):
    doc = load("rayservice")
    mutate(doc)
    assert any(expected in p for p in serve_app_problems(doc)), serve_app_problems(doc)
