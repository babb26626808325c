"""Shared fixtures: one local Ray cluster per test session, with logical GPUs for placement tests."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from filelock import FileLock

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def s3_endpoint():
    """A local S3-compatible server (moto) for the session; the AWS_* variables point at it.

    Set before Ray starts (``ray_cluster`` asks for it), so every Ray worker inherits them, as the
    workers of a real cluster get them from their node's environment."""
    import s3_server

    server, endpoint = s3_server.start()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_server.s3_env(endpoint).items():
            mp.setenv(k, v)
        yield endpoint
    server.stop()  # type: ignore[attr-defined]


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """``s3://<a new, empty bucket>`` on the session's S3 server."""
    import s3_server

    return s3_server.new_bucket(s3_endpoint)


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """A local Ray cluster (2 CPUs, 3 logical GPUs) shared by every test that needs Ray."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(
            # A new cluster even when another `ray start` / cluster_utils cluster on this machine
            # is recorded in /tmp/ray/ray_current_cluster (plain ray.init() would join it).
            address="local",
            num_cpus=2,
            num_gpus=3,
            include_dashboard=False,
            namespace="clpd",
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


TINY_LADDER = [
    {"name": "t0", "n_layer": 1, "n_embd": 16, "n_head": 2, "train_steps": 10},
    {"name": "t1", "n_layer": 1, "n_embd": 24, "n_head": 2, "train_steps": 10},
    {"name": "t2", "n_layer": 2, "n_embd": 32, "n_head": 2, "train_steps": 10},
]
# tiny_config(**TWO_RUNGS): a 2-rung ladder, for Ray tests that need a ladder but not 3 stages
# (each rung is an actor process whose start-up, importing the model stack, is most of what a
# tiny run costs).
TWO_RUNGS = {"teachers": {"ladder": TINY_LADDER[:2]}, "curriculum": {"num_stages": 2}}
# tiny_config(**ONE_RUNG): one teacher, one stage, for Ray tests of the machinery around a run
# (jobs, shared clusters, stops) that no schedule changes.
ONE_RUNG = {"teachers": {"ladder": TINY_LADDER[:1]}, "curriculum": {"num_stages": 1}}


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    """A directory every pytest-xdist worker of this session shares (the workers' base
    temporary directories are its children); without xdist, the session's own."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def ladder_cache(session_dir) -> Path:
    """One teacher cache for the whole session, shared by the xdist workers: tiny teachers are
    trained once (train_teacher's file lock lets one worker train an entry while another
    waits for it)."""
    path = session_dir / "ladder-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture
def tiny_config(ladder_cache):
    """A factory for a tiny end-to-end config (3 tiny teachers, 30 steps); kwargs are --set items."""
    from clpd_ray.config import config_from_dict

    def make(*overrides: str, **sections):
        from clpd_ray.config import apply_overrides

        raw = {
            "seed": 0,
            "task": {"max_difficulty": 3, "train_size": 300, "eval_size": 30},
            "teachers": {
                "ladder": TINY_LADDER,
                "cache_dir": str(ladder_cache),
                "top_k": 8,
                "batch_size": 16,
            },
            "student": {"n_layer": 1, "n_embd": 16, "n_head": 2},
            "curriculum": {"num_stages": 3},
            "scheduler": {"policy": "clpd", "probe_every": 10, "probe_size": 4},
            "train": {"total_steps": 30, "batch_size": 8, "log_every": 5, "checkpoint_every": 15},
            # CPU bundles: the session cluster's 3 logical GPUs are fewer than 3 teachers + the
            # student need, which is an error (no silent CPU fallback); GPU tests ask for them.
            "cluster": {"gpus_per_actor": 0},
        }
        for k, v in sections.items():
            raw[k] = {**raw.get(k, {}), **v}
        return config_from_dict(apply_overrides(raw, list(overrides)), "tiny test config")

    return make


def pytest_collection_modifyitems(config, items):
    """The tests that mostly wait first, then the slow tests, then the other Ray tests (a stable
    sort: the same order on every pytest-xdist worker). With pyproject's addopts (two workers,
    tests handed out two at a time) a waiting test runs beside the first busy one on the other
    worker, the long Ray runs spread over both workers and the many fast tests fill in after
    them, instead of one worker finishing a long run alone at the end."""
    items.sort(
        key=lambda item: (
            item.get_closest_marker("waits") is None,
            item.get_closest_marker("slow") is None,
            item.get_closest_marker("ray") is None,
        )
    )


@pytest.fixture
def uninterrupted(ray_cluster, session_dir):
    """The run directory of an uninterrupted run of ``config``: one per config per session,
    shared by the fault, resume, signal and replica tests that compare their runs with it, on
    every xdist worker (the first to need it runs it under a file lock while another waits).
    Read it, never write to it: copy it first."""
    from clpd_ray.runtime.run import run_distillation

    def get(config) -> Path:
        key = json.dumps(config.to_dict(), sort_keys=True)
        home = session_dir / f"uninterrupted-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        out, done = home / "run", home / "finished"
        with FileLock(f"{home}.lock"):
            if not done.exists():
                if home.exists():  # a worker that failed mid-run left it: run it again
                    shutil.rmtree(home)
                home.mkdir()
                run_distillation(config, out, progress=False)
                done.touch()
        return out

    return get
