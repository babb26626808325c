"""Shared fixtures: one local Ray cluster per test session, with logical GPUs for placement tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster (2 CPUs, 3 logical GPUs) shared by every test that needs Ray."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(
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


@pytest.fixture(scope="session")
def ladder_cache(tmp_path_factory) -> Path:
    """One teacher cache for the whole session: tiny teachers are trained once."""
    return tmp_path_factory.mktemp("ladder-cache")


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
        }
        for k, v in sections.items():
            raw[k] = {**raw.get(k, {}), **v}
        return config_from_dict(apply_overrides(raw, list(overrides)), "tiny test config")

    return make
