"""configs/kuberay-rayjob.yaml against the RayJob custom resource (ray.io/v1), offline.

A JSON schema of the CRD fields the file may use, written from KubeRay's Go types (the CRD is
generated from them; unknown fields are dropped by the API server, or refused with kubectl's
strict field validation, so a misspelt key silently does nothing):

- ray-project/kuberay, ray-operator/apis/ray/v1/rayjob_types.go (RayJobSpec, JobSubmissionMode,
  DeletionPolicy, SubmitterConfig) and raycluster_types.go (RayClusterSpec, HeadGroupSpec,
  WorkerGroupSpec, AutoscalerOptions);
- the KubeRay API reference, https://ray-project.github.io/kuberay/reference/api/ and
  https://docs.ray.io/en/master/cluster/kubernetes/references/api.html (AuthOptions in
  RayClusterSpec since v1.5; SidecarMode and deletionStrategy in RayJobSpec).

Pod templates are Kubernetes core types: only what clpd relies on is checked (containers with a
name and an image, string rayStartParams, GPU limits). The run the job starts must write to a
storage URI and be a real config (pretrained models), not the demo.
"""

from __future__ import annotations

import copy
import shlex
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from clpd_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RAYJOB_YAML = ROOT / "configs" / "kuberay-rayjob.yaml"

_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

# corev1.PodTemplateSpec, as far as clpd needs it.
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "image"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "image": {"type": "string", "minLength": 1},
                            "resources": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "requests": {"type": "object"},
                                    "limits": {"type": "object"},
                                    "claims": {"type": "array"},
                                },
                            },
                            "env": {"type": "array"},
                            "envFrom": {"type": "array"},
                            "ports": {"type": "array"},
                        },
                    },
                },
                "tolerations": {"type": "array"},
            },
        },
    },
}

_HEAD_GROUP = {
    "type": "object",
    "additionalProperties": False,
    "required": ["template"],  # rayStartParams became optional in KubeRay 1.1
    "properties": {
        "template": _POD_TEMPLATE,
        "headService": {"type": "object"},
        "enableIngress": {"type": "boolean"},
        "rayStartParams": _STR_MAP,
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
        "headContainerIndex": {"type": "integer"},
    },
}

_WORKER_GROUP = {
    "type": "object",
    "additionalProperties": False,
    "required": ["groupName", "template"],
    "properties": {
        "suspend": {"type": "boolean"},
        "groupName": {"type": "string", "minLength": 1},
        "replicas": _INT32,
        "minReplicas": _INT32,
        "maxReplicas": _INT32,
        "idleTimeoutSeconds": _INT32,
        "rayStartParams": _STR_MAP,
        "template": _POD_TEMPLATE,
        "scaleStrategy": {"type": "object"},
        "numOfHosts": _INT32,
    },
}

_RAY_CLUSTER_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "required": ["headGroupSpec"],
    "properties": {
        "suspend": {"type": "boolean"},
        "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
        "autoscalerOptions": {"type": "object"},
        "headServiceAnnotations": _STR_MAP,
        "enableInTreeAutoscaling": {"type": "boolean"},
        "gcsFaultToleranceOptions": {"type": "object"},
        "authOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "mode": {"enum": ["disabled", "token"]},
                "secretName": {"type": "string"},
                "enableK8sTokenAuth": {"type": "boolean"},
            },
        },
        "headGroupSpec": _HEAD_GROUP,
        "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+"},
        "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
    },
}

RAYJOB_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                # a DNS-1123 subdomain; RayJob names also name the RayCluster and the submitter Job
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": _STR_MAP,
                "annotations": _STR_MAP,
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "backoffLimit": _INT32,
                "rayClusterSpec": _RAY_CLUSTER_SPEC,
                "submitterPodTemplate": _POD_TEMPLATE,
                "metadata": _STR_MAP,
                "clusterSelector": _STR_MAP,
                "submitterConfig": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"backoffLimit": _INT32},
                },
                "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
                "deletionPolicy": {
                    "enum": ["DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone"]
                },
                "deletionStrategy": {"type": "object"},
                "entrypoint": {"type": "string"},
                "runtimeEnvYAML": {"type": "string"},
                "jobId": {"type": "string"},
                "submissionMode": {
                    "enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]
                },
                "entrypointResources": {"type": "string"},
                "entrypointNumCpus": {"type": "number", "minimum": 0},
                "entrypointNumGpus": {"type": "number", "minimum": 0},
                "ttlSecondsAfterFinished": _INT32,
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "suspend": {"type": "boolean"},
            },
        },
    },
}


def _load() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(RAYJOB_YAML.read_text()) if d is not None]
    assert len(docs) == 1, "one RayJob document"
    return docs[0]


def _errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(RAYJOB_SCHEMA)
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in validator.iter_errors(doc)
    ]


def test_the_schema_itself_is_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(RAYJOB_SCHEMA)


def test_rayjob_matches_the_crd_fields():
    assert _errors(_load()) == []


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("spec", "shutdownAfterJobFinish"), True, "Additional properties"),  # misspelt
        (("spec", "runtimeEnvYaml"), "pip: []", "Additional properties"),  # wrong case
        (("spec", "submissionMode"), "K8sJob", "is not one of"),
        (("spec", "ttlSecondsAfterFinished"), "600", "is not of type 'integer'"),
        (("spec", "rayClusterSpec", "headGroupSpec", "rayStartParams", "num-gpus"), 0, "string"),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "replica"), 3, "Additional properties"),
        (("spec", "rayClusterSpec", "authOptions", "mode"), "Token", "is not one of"),
        (("apiVersion",), "ray.io/v1alpha1", "was expected"),
    ],
)
def test_the_schema_catches_a_wrong_field(path, value, message):
    doc = copy.deepcopy(_load())
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    errors = _errors(doc)
    assert errors and any(message in e for e in errors), errors


def test_the_job_runs_a_real_config_into_storage():
    spec = _load()["spec"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(env) <= {"working_dir", "pip", "env_vars", "py_modules", "excludes", "uv", "conda"}
    assert env["env_vars"]["CLPD_OUT"].startswith("s3://")  # the pods' disks go with the cluster
    # `ray job stop` / deleting the RayJob: time for the stop checkpoint before Ray's SIGKILL.
    assert int(env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= 60
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["bash", "configs/rayjob-entrypoint.sh"], argv
    script = (ROOT / argv[1]).read_text()
    assert '--out "${out%/}/' in script and "CLPD_OUT" in script
    config_path = ROOT / argv[2]
    assert config_path.is_file(), (
        f"{argv[2]} (the real-model config of issue 10) is missing: the RayJob runs it"
    )
    config = load_config(config_path)
    assert config_path.name not in {"demo.yaml", "cluster_example.yaml"}
    # Real models: every rung and the student are pretrained checkpoints, not built tiny ones.
    assert config.teachers.ladder and all(t.path for t in config.teachers.ladder)
    assert config.student.path
    # One GPU per teacher pod and for the student pod, as the worker groups provide.
    groups = {g["groupName"]: g for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
    assert groups["teachers"]["replicas"] == len(config.teachers.ladder)
    assert config.cluster.gpus_per_actor == 1


def test_every_node_sees_the_models_at_the_paths_the_config_names(tmp_path):
    """The config's relative model paths resolve from CLPD_WORKDIR, and every pod mounts the
    models volume there: an actor on any node finds the same directory."""
    spec = _load()["spec"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    workdir = Path(env["CLPD_WORKDIR"])
    config = load_config(ROOT / shlex.split(spec["entrypoint"])[2])
    paths = [t.path for t in config.teachers.ladder] + [config.student.path]
    roots = {Path(str(p)).parts[0] for p in paths}
    assert len(roots) == 1, paths
    mount = str(workdir / roots.pop())
    cluster = spec["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
        claims = {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        assert mount in mounts.values(), group.get("groupName", "head")
        assert {n for n, p in mounts.items() if p == mount} <= claims
    # The script: clpd runs from CLPD_WORKDIR with the config made absolute first.
    fake = tmp_path / "bin" / "clpd"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\npwd\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    run = subprocess.run(
        ["bash", "configs/rayjob-entrypoint.sh", "configs/gsm8k_tiny.yaml"],
        cwd=ROOT,
        env={
            "PATH": f"{fake.parent}:/usr/bin:/bin",
            "CLPD_OUT": "s3://b/clpd",
            "CLPD_WORKDIR": str(work),
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == str(work)
    assert lines[1:3] == ["run", str(ROOT / "configs" / "gsm8k_tiny.yaml")]
