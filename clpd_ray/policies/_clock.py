"""The stage clock: which stage a step belongs to when stages are paced by step count.

Shared by every clock-paced policy (``clpd``, ``data_only``, ``teacher_only``,
``random_curriculum``) and by ``adaptive`` before its first probe arrives. Steps are 0-based:
``step`` is the index of the next optimizer step, i.e. the number of steps already taken, so a
run of ``total_steps`` runs steps ``0 .. total_steps - 1``.

Stage ``k`` starts at ``boundaries[k - 1]`` (stage 0 at step 0). With equal budgets the stage of
a step is ``min(K - 1, step * K // total_steps)``, whose boundaries are ``ceil(k * total / K)``.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from clpd_ray.errors import PolicyError

__all__ = ["StageClock", "equal_boundaries", "validate_boundaries"]


def equal_boundaries(num_stages: int, total_steps: int) -> tuple[int, ...]:
    """First step of stages 1..K-1 under equal budgets: the smallest s with s*K//T >= k."""
    return tuple(-(-k * total_steps // num_stages) for k in range(1, num_stages))


def validate_boundaries(policy: str, boundaries: object) -> tuple[int, ...]:
    """Check the shape of a user's ``boundaries`` kwarg (length is checked at bind time)."""
    if not isinstance(boundaries, Sequence) or isinstance(boundaries, str):
        raise PolicyError(
            f"policy {policy!r}: boundaries={boundaries!r} must be a list of step numbers "
            f"where stages 1, 2, ... start, e.g. boundaries=[200, 400]"
        )
    out = []
    for b in boundaries:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise PolicyError(
                f"policy {policy!r}: boundaries={list(boundaries)!r} holds {b!r}; each boundary "
                f"must be an integer step >= 1 (stage 0 always starts at step 0)"
            )
        out.append(int(b))
    if any(b >= a for b, a in itertools.pairwise(out)):
        raise PolicyError(
            f"policy {policy!r}: boundaries={out} must be strictly increasing step numbers"
        )
    return tuple(out)


@dataclass(frozen=True)
class StageClock:
    """Stage pacing by step number; ``equal`` says the boundaries came from equal budgets."""

    boundaries: tuple[int, ...]  # (K-1,) first step of stages 1..K-1
    total_steps: int
    equal: bool

    @classmethod
    def build(
        cls,
        policy: str,
        *,
        num_stages: int,
        total_steps: int,
        boundaries: tuple[int, ...] | None = None,
    ) -> StageClock:
        """Equal budgets, or the given boundaries checked against the run's geometry."""
        if boundaries is None:
            if total_steps < num_stages:
                raise PolicyError(
                    f"policy {policy!r}: total_steps={total_steps} is fewer than "
                    f"num_stages={num_stages}, so some stage would get no step; raise "
                    f"train.total_steps to at least {num_stages} or lower curriculum.num_stages"
                )
            return cls(equal_boundaries(num_stages, total_steps), total_steps, equal=True)
        if len(boundaries) != num_stages - 1:
            raise PolicyError(
                f"policy {policy!r}: boundaries={list(boundaries)} has {len(boundaries)} values "
                f"but num_stages={num_stages} needs {num_stages - 1} (the first step of each "
                f"stage after stage 0)"
            )
        if boundaries and boundaries[-1] >= total_steps:
            raise PolicyError(
                f"policy {policy!r}: boundary {boundaries[-1]} is not before "
                f"total_steps={total_steps}, so the last stage would never run; use boundaries "
                f"below {total_steps}"
            )
        return cls(tuple(boundaries), total_steps, equal=False)

    @property
    def num_stages(self) -> int:
        return len(self.boundaries) + 1

    def stage_at(self, step: int) -> int:
        """The stage that step ``step`` belongs to."""
        return bisect.bisect_right(self.boundaries, step)

    def start(self, stage: int) -> int:
        return 0 if stage == 0 else self.boundaries[stage - 1]

    def end(self, stage: int) -> int:
        """One past the last step of ``stage``."""
        return self.boundaries[stage] if stage < len(self.boundaries) else self.total_steps

    def describe(self, step: int) -> str:
        """Why ``step`` is in its stage, e.g. 'step 200 reached stage-1 boundary (...)'."""
        stage = self.stage_at(step)
        if self.equal:
            budget = self.total_steps / self.num_stages
            pacing = f"equal budgets of {budget:.4g} steps"
        else:
            pacing = f"boundaries {list(self.boundaries)}"
        if stage > 0 and step == self.start(stage):
            return f"step {step} reached stage-{stage} boundary ({pacing})"
        return (
            f"step {step} is in stage {stage} of {self.num_stages} "
            f"(steps {self.start(stage)}-{self.end(stage) - 1}, {pacing})"
        )
