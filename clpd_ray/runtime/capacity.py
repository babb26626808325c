"""How many runs of one config the running Ray cluster can hold at once (ablations use it)."""

from __future__ import annotations

import ray

from clpd_ray.config import Config
from clpd_ray.runtime.placement import plan_placement

__all__ = ["default_parallel", "runs_that_fit"]


def runs_that_fit(config: Config) -> int:
    """How many runs the running Ray cluster can place at once, by the launcher's own bundles.

    Raises ``ClusterError`` when the cluster has GPUs but too few for even one run.
    """
    res = ray.cluster_resources()
    return plan_placement(config, res).runs_that_fit(res)


def default_parallel(config: Config) -> int:
    """The runs that fit, capped at half the CPUs: each run's actors also need real cores."""
    return max(1, min(runs_that_fit(config), int(ray.cluster_resources().get("CPU", 1) // 2)))
