"""Offline checks of the cluster configs: cluster.yaml through Ray's own launcher validator
(prepare_config + validate_config, no cloud calls, no Ray start) and the KubeRay RayJob's shape."""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from clpd_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
RAYJOB_YAML = ROOT / "configs" / "kuberay-rayjob.yaml"

TEACHER = "ray.worker.teacher"
STUDENT = "ray.worker.student"


def _load_cluster() -> dict[str, Any]:
    with CLUSTER_YAML.open() as f:
        return yaml.safe_load(f)


def _prepared(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does before validating: merge provider defaults (read from a file shipped
    with Ray, no AWS call), merge setup commands, fill per-type min/max workers."""
    return prepare_config(copy.deepcopy(config))


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return _load_cluster()


@pytest.fixture(scope="module")
def prepared(raw: dict[str, Any]) -> dict[str, Any]:
    config = _prepared(raw)
    validate_config(config)
    return config


def test_cluster_yaml_passes_ray_validator(prepared: dict[str, Any]) -> None:
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["region"]
    assert prepared["auth"]["ssh_user"] == "ubuntu"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_node_types_carry_gpus_and_slots(prepared: dict[str, Any]) -> None:
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]["resources"]
    assert head.get("GPU", 0) == 0
    assert "teacher_slot" not in head and "student_slot" not in head

    teacher = types[TEACHER]
    assert teacher["resources"]["GPU"] == 1
    assert teacher["resources"]["teacher_slot"] == 1
    assert "student_slot" not in teacher["resources"]
    assert teacher["max_workers"] >= 3

    student = types[STUDENT]
    assert student["resources"]["GPU"] == 1
    assert student["resources"]["student_slot"] == 1
    assert "teacher_slot" not in student["resources"]
    assert student["max_workers"] >= 1

    # clpd plans placement from the resources present when a run starts (it does not wait for
    # the autoscaler), so the GPU nodes are kept up: min_workers covers 3 teachers + student.
    assert teacher["min_workers"] >= 3
    assert student["min_workers"] >= 1
    # The global cap must admit all teachers plus the student at once.
    assert prepared["max_workers"] >= teacher["max_workers"] + student["max_workers"]


def test_project_is_synced_installed_and_auth_stays_on(prepared: dict[str, Any]) -> None:
    assert "~/clpd_ray" in prepared["file_mounts"]
    assert "~/.ray/auth_token" in prepared["file_mounts"]
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("pip install -e ~/clpd_ray" in c for c in prepared[key]), key
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in prepared[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    every_command = [c for v in prepared.values() if isinstance(v, list) for c in v]
    assert not any("RAY_AUTH_MODE=disabled" in str(c) for c in every_command)


def test_raw_file_needs_prepare_config_first(raw: dict[str, Any]) -> None:
    # validate_config alone wants fields that only prepare_config fills in.
    with pytest.raises(RuntimeError, match="cluster_synced_files"):
        validate_config(copy.deepcopy(raw))


def _set_fractional_gpu(c: dict[str, Any]) -> None:
    c["available_node_types"][TEACHER]["resources"]["GPU"] = 0.5


def _set_string_slot(c: dict[str, Any]) -> None:
    c["available_node_types"][STUDENT]["resources"]["student_slot"] = "1"


def _typo_in_node_type(c: dict[str, Any]) -> None:
    c["available_node_types"][TEACHER]["max_worker"] = 3


def _drop_node_config(c: dict[str, Any]) -> None:
    del c["available_node_types"][STUDENT]["node_config"]


def _unknown_head_type(c: dict[str, Any]) -> None:
    c["head_node_type"] = "ray.head.gpu"


def _min_workers_over_cap(c: dict[str, Any]) -> None:
    c["available_node_types"][TEACHER]["min_workers"] = 5


@pytest.mark.parametrize(
    ("breakage", "error", "match"),
    [
        (_set_fractional_gpu, jsonschema.ValidationError, "0.5 is not of type 'integer'"),
        (_set_string_slot, jsonschema.ValidationError, "'1' is not of type 'integer'"),
        (_typo_in_node_type, jsonschema.ValidationError, "'max_worker' was unexpected"),
        (_drop_node_config, jsonschema.ValidationError, "'node_config' is a required property"),
        (_unknown_head_type, ValueError, "must be one of `available_node_types`"),
        (_min_workers_over_cap, ValueError, "sum of `min_workers`"),
    ],
    ids=[
        "fractional-gpu",
        "string-slot",
        "typo-in-node-type",
        "no-node-config",
        "unknown-head-type",
        "min-workers-over-cap",
    ],
)
def test_broken_copies_are_rejected(raw: dict[str, Any], breakage, error, match) -> None:
    broken = copy.deepcopy(raw)
    breakage(broken)
    with pytest.raises(error, match=re.escape(match)):
        validate_config(_prepared(broken))


def test_missing_provider_type_is_rejected(raw: dict[str, Any]) -> None:
    broken = copy.deepcopy(raw)
    del broken["provider"]["type"]
    # prepare_config picks the provider's defaults by type, so it cannot even start ...
    with pytest.raises(KeyError, match="type"):
        prepare_config(copy.deepcopy(broken))
    # ... and the schema requires it as well.
    prepared = _prepared(raw)
    del prepared["provider"]["type"]
    with pytest.raises(jsonschema.ValidationError, match="'type' is a required property"):
        validate_config(prepared)


# --- KubeRay RayJob --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    with RAYJOB_YAML.open() as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    assert len(docs) == 1
    return docs[0]


def _ray_resources(group: dict[str, Any]) -> dict[str, Any]:
    # KubeRay passes the value verbatim to `ray start --resources=<value>`; the shell strips
    # the outer double quotes, and Ray parses the rest as JSON.
    value = group["rayStartParams"]["resources"]
    assert value.startswith('"') and value.endswith('"'), value
    return json.loads(value[1:-1].replace('\\"', '"'))


def _container(spec: dict[str, Any]) -> dict[str, Any]:
    containers = spec["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_rayjob_crd_fields(rayjob: dict[str, Any]) -> None:
    """The RayJob fields KubeRay (ray.io/v1) reads, with the types it expects."""
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
    assert spec["submissionMode"] in {"K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode"}
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int)
    assert isinstance(spec["rayClusterSpec"], dict)
    # runtimeEnvYAML is a string of YAML: KubeRay converts it to JSON for `ray job submit`.
    assert isinstance(spec["runtimeEnvYAML"], str)
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)
    assert isinstance(runtime_env["working_dir"], str) and "://" in runtime_env["working_dir"]
    assert isinstance(runtime_env["pip"], list) and runtime_env["pip"]
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())
    # The run directory goes to storage: the cluster's disks vanish with it.
    assert runtime_env["env_vars"]["CLPD_OUT"].startswith("s3://")


def _entrypoint(rayjob: dict[str, Any]) -> tuple[Path, Path]:
    """(script, config) of ``bash <script> <config>``, as paths in this repository."""
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[0] == "bash" and len(argv) == 3, argv
    return ROOT / argv[1], ROOT / argv[2]


def test_rayjob_runs_a_real_config_shipped_as_a_regular_file(rayjob: dict[str, Any]) -> None:
    script, config = _entrypoint(rayjob)
    for path in (script, config):
        # A working_dir zip delivers a symlink as a text file holding its target.
        assert path.is_file() and not path.is_symlink(), path
    assert config.name != "demo.yaml"
    loaded = load_config(config)
    assert loaded.cluster.gpus_per_actor == 1  # one GPU per teacher / student pod
    groups = {g["groupName"]: g for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert groups["teachers"]["replicas"] >= len(loaded.teachers.ladder)


def test_every_shipped_config_is_a_regular_file() -> None:
    shipped = [*(ROOT / "configs").iterdir(), *(ROOT / "clpd_ray" / "configs").iterdir()]
    links = [str(p.relative_to(ROOT)) for p in shipped if p.is_symlink()]
    assert links == []


def test_rayjob_entrypoint_script_puts_the_run_in_storage(
    rayjob: dict[str, Any], tmp_path: Path
) -> None:
    script, config = _entrypoint(rayjob)
    fake = tmp_path / "bin" / "clpd"  # records the command line it is given
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "CLPD_OUT": "s3://bucket/clpd/"}
    rel = str(config.relative_to(ROOT))
    run = subprocess.run(
        ["bash", str(script), rel], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0, run.stderr
    argv = run.stdout.splitlines()
    assert argv[:4] == ["run", rel, "--address", "auto"]
    assert argv[4] == "--out"
    assert re.fullmatch(rf"s3://bucket/clpd/\d{{8}}-\d{{6}}-{config.stem}", argv[5]), argv[5]
    # Without CLPD_OUT it stops and says what to set, before starting anything.
    del env["CLPD_OUT"]
    run = subprocess.run(
        ["bash", str(script), rel], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert run.returncode != 0 and "set CLPD_OUT" in run.stderr


def test_every_ray_pod_gets_the_storage_credentials(rayjob: dict[str, Any]) -> None:
    cluster = rayjob["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        refs = [e["secretRef"]["name"] for e in _container(group).get("envFrom", [])]
        assert refs == ["clpd-s3"], group.get("groupName", "head")


def test_rayjob_structure(rayjob: dict[str, Any]) -> None:
    spec = rayjob["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["rayVersion"]

    head = cluster["headGroupSpec"]
    assert "rayStartParams" in head
    head_limits = _container(head).get("resources", {}).get("limits", {})
    assert "nvidia.com/gpu" not in head_limits

    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"teachers", "student"}
    for name, slot, min_replicas in (
        ("teachers", "teacher_slot", 3),
        ("student", "student_slot", 1),
    ):
        group = groups[name]
        assert group["replicas"] >= min_replicas
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        resources = _container(group)["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == 1
        assert _ray_resources(group) == {slot: 1}
