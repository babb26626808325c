"""A user-written scheduling policy: competence-based pacing (Platanios et al., 2019).

The student's competence grows as c(t) = min(1, sqrt(t (1 - c0^2) / T + c0^2)) over a ramp of
T = ramp * total_steps steps; examples whose difficulty percentile is <= c(t) are available.
With the training data split into K difficulty quantiles, the hardest available stage is the
one containing percentile c, and the share of available data from earlier stages becomes the
replay share. Teacher k * num_teachers // num_stages supervises stage k (the CLPD ladder).

Use it with ``PYTHONPATH=examples`` and, in the run config::

    scheduler:
      policy: "custom_policy:CompetencePolicy"
      kwargs: {c0: 0.2, ramp: 0.8}
"""

from __future__ import annotations

import math

from clpd_ray.errors import PolicyError
from clpd_ray.policies import Decision, Observation, SchedulerPolicy

__all__ = ["CompetencePolicy", "competence"]


def competence(step: int, ramp_steps: int, c0: float) -> float:
    """Platanios et al.'s square-root competence c(t) in [c0, 1]."""
    return min(1.0, math.sqrt(step * (1.0 - c0**2) / ramp_steps + c0**2))


class CompetencePolicy(SchedulerPolicy):
    name = "competence"
    curriculum = "difficulty"
    reads_probes = False  # competence grows with the step count alone

    def __init__(self, c0: float = 0.1, ramp: float = 0.8) -> None:
        if not 0.0 < c0 <= 1.0:
            raise PolicyError(f"policy 'competence': c0={c0!r} must be in (0, 1]")
        if not 0.0 < ramp <= 1.0:
            raise PolicyError(
                f"policy 'competence': ramp={ramp!r} (share of the run spent growing competence) "
                f"must be in (0, 1]"
            )
        self.c0, self.ramp = c0, ramp

    def decide(self, obs: Observation) -> Decision:
        ramp_steps = max(1, round(self.ramp * obs.total_steps))
        c = competence(obs.step, ramp_steps, self.c0)
        k = obs.num_stages
        stage = min(k - 1, max(0, math.ceil(c * k - 1e-9) - 1))  # the stage holding percentile c
        teacher = stage * obs.num_teachers // k
        replay = (stage / k) / c  # earlier stages' share of the available data
        return Decision(
            stage=stage,
            teacher=teacher,
            reason=f"competence {c:.3f} at step {obs.step}: stages 0-{stage} available",
            replay=min(replay, 0.99),
        )
