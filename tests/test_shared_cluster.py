"""Operating on a shared cluster: connection and auth problems stop a run before it writes
anything (exit 2, with the fix), and two runs on one cluster at the same time both complete."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from conftest import ONE_RUNG

from clpd_ray.cli import main
from clpd_ray.errors import ClusterError
from clpd_ray.runtime.connect import check_address


def _write(tmp_path: Path, config) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


# --------------------------------------------------------------------- connection (no cluster)


@pytest.mark.parametrize(
    ("address", "needles"),
    [
        ("127.0.0.1:1", ["cannot reach the Ray cluster at 127.0.0.1:1", "`ray status`"]),
        ("127.0.0.1:port", ["127.0.0.1:port", "not host:port", "10.0.0.1:6379"]),
    ],
    ids=["refused", "no-port"],
)
def test_a_bad_address_is_reported_in_seconds(address, needles):
    start = time.monotonic()
    with pytest.raises(ClusterError) as err:
        check_address(address)
    assert time.monotonic() - start < 10  # ray.init itself retries for minutes
    for needle in needles:
        assert needle in str(err.value)


def test_clpd_run_with_an_unreachable_address_exits_2_and_writes_nothing(
    tiny_config, tmp_path, capsys
):
    # Checked even when this process is already connected to the test cluster (it may be).
    out = tmp_path / "run"
    cfg = _write(tmp_path, tiny_config())
    assert main(["run", str(cfg), "--address", "127.0.0.1:1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    [line] = err.strip().splitlines()
    assert line.startswith("clpd: error: cannot reach the Ray cluster at 127.0.0.1:1")
    assert "ray status" in line
    assert not out.exists()


# --------------------------------------------------------------------- token auth


@pytest.mark.ray
def test_a_client_without_the_token_is_told_how_to_get_it(ray_cluster):
    import ray

    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        pytest.skip("the test cluster runs without token authentication (RAY_AUTH_MODE set)")
    gcs = ray.get_runtime_context().gcs_address
    check_address(gcs)  # this process has the token: accepted
    # A shell that never exported RAY_AUTH_MODE=token: Ray sends no token to an explicit address.
    # A new process, since the auth mode is read once per process.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    code = (
        "import sys; from clpd_ray.runtime.connect import check_address; check_address(sys.argv[1])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, gcs], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 1
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("clpd_ray.errors.ClusterError")]
    assert f"the Ray cluster at {gcs} requires token authentication" in line
    assert "export RAY_AUTH_MODE=token" in line and "ray get-auth-token" in line


# --------------------------------------------------------------------- two runs, one cluster


@pytest.mark.ray
@pytest.mark.slow
def test_two_runs_on_one_cluster_at_the_same_time_both_complete(
    ray_cluster, tiny_config, tmp_path, caplog
):
    from clpd_ray.runtime.run import run_distillation
    from clpd_ray.workload import build_workload

    # sft runs (the student and the scheduler: what makes two runs collide, their placement
    # groups and actor names, is the same without a teacher actor). CPU bundles: both runs fit
    # the session cluster's 2 CPUs at once.
    config = tiny_config(
        "distill.objective=sft",
        "train.total_steps=8",
        "train.checkpoint_every=4",
        "scheduler.probe_every=4",
        **ONE_RUNG,
    )
    workload = build_workload(config, progress=False)
    summaries: dict[str, dict] = {}
    errors: list[BaseException] = []

    def one(name: str) -> None:
        # As the ablation runner does: a tokenizer per thread (Rust tokenizers are not shared).
        wl = replace(workload, tokenizer=copy.deepcopy(workload.tokenizer))
        try:
            summaries[name] = run_distillation(config, tmp_path / name, progress=False, workload=wl)
        except BaseException as err:
            errors.append(err)

    caplog.set_level(logging.INFO, logger="clpd_ray.runtime.run")
    threads = [threading.Thread(target=one, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert {n: s["steps"] for n, s in summaries.items()} == {"a": 8, "b": 8}
    ids = {s["run_id"] for s in summaries.values()}
    assert len(ids) == 2
    # Each run printed its header: its id, run directory and where its actors landed.
    headers = [r.getMessage() for r in caplog.records if r.getMessage().startswith("clpd run ")]
    assert len(headers) == 2
    for run_id in ids:
        [h] = [h for h in headers if h.startswith(f"clpd run {run_id} -> ")]
        assert f"student-{run_id}" in h and f"scheduler-{run_id}" in h
        assert "CPU bundles (cluster.gpus_per_actor is 0)" in h
