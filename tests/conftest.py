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
