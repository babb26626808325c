"""How many runs of one config the running Ray cluster can hold at once (ablations use it)."""

from __future__ import annotations

import ray

from clpd_ray.config import Config
from clpd_ray.runtime.actors.launcher import Launcher

__all__ = ["default_parallel", "runs_that_fit"]


def runs_that_fit(config: Config) -> int:
    """How many runs the running Ray cluster can place at once, by the launcher's own bundles."""
    res = ray.cluster_resources()
    probe = Launcher(config, [], "", run_id="plan")  # computes the bundles, starts nothing
    n = len(probe.names)
    fits = int(res.get("CPU", 1.0) // (probe.cpu * (n + 2)) + 1e-9)
    if probe.use_gpu:
        fits = min(fits, int(res.get("GPU", 0) // (config.cluster.gpus_per_actor * (n + 1))))
    return fits


def default_parallel(config: Config) -> int:
    """The runs that fit, capped at half the CPUs: each run's actors also need real cores."""
    return max(1, min(runs_that_fit(config), int(ray.cluster_resources().get("CPU", 1) // 2)))
