"""The fixed-schedule policies: CLPD and the three baselines it is compared with.

=====================  ==============  ==========================  ==========================
name                   curriculum      stage                       teacher
=====================  ==============  ==========================  ==========================
``standard_kd``        ``"none"``      always 0 (a label)          strongest (or ``teacher``)
``data_only``          ``"difficulty"`` stage clock                 strongest
``teacher_only``       ``"none"``      stage clock (a label)       = stage (ladder)
``clpd``               ``"difficulty"`` stage clock                 = stage (ladder)
``random_curriculum``  ``"random"``    stage clock                 = stage (ladder)
=====================  ==============  ==========================  ==========================

``standard_kd`` takes an optional ``teacher`` kwarg, a fixed ladder index (default: the strongest),
so the same baseline distils from any single rung (the "stronger teacher, worse student?" check).
The stage clock gives every stage an equal budget of steps, or follows ``boundaries`` (kwarg: the
first step of each stage after stage 0). ``random_curriculum`` is the same-pacing control for
``clpd``: identical stage sizes and teachers, examples assigned to stages at random. All are
stateless: a decision is a function of ``obs.step`` and the bound geometry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from clpd_ray.errors import PolicyError
from clpd_ray.messages import Decision, Observation
from clpd_ray.policies._clock import StageClock, validate_boundaries
from clpd_ray.policies.base import SchedulerPolicy

__all__ = [
    "ClpdPolicy",
    "DataOnlyPolicy",
    "RandomCurriculumPolicy",
    "StandardKDPolicy",
    "TeacherOnlyPolicy",
]


class StandardKDPolicy(SchedulerPolicy):
    """Standard KD: one fixed teacher on batches drawn from all the data, no schedule.

    ``teacher`` is the ladder index (0 = weakest) of the only teacher; ``None`` (the default)
    means the strongest, whatever the ladder's length.
    """

    name = "standard_kd"
    curriculum = "none"
    reads_probes = False
    # Class-level default, so subclasses that override __init__ without super() still work.
    _teacher: int | None = None

    def __init__(self, teacher: int | None = None) -> None:
        if teacher is not None and (
            isinstance(teacher, bool) or not isinstance(teacher, int) or teacher < 0
        ):
            raise PolicyError(
                f"policy {self.name!r}: teacher={teacher!r} must be a ladder index (an int >= 0, "
                f"0 = weakest) or None for the strongest teacher"
            )
        self._teacher = teacher

    def bind(self, *, num_stages: int, num_teachers: int, total_steps: int) -> None:
        super().bind(num_stages=num_stages, num_teachers=num_teachers, total_steps=total_steps)
        if self._teacher is not None and self._teacher >= num_teachers:
            raise PolicyError(
                f"policy {self.name!r}: teacher={self._teacher} is out of range for a ladder of "
                f"{num_teachers} teachers; use an index in [0, {num_teachers - 1}] or None for "
                f"the strongest"
            )

    def decide(self, obs: Observation) -> Decision:
        self._require_bound(obs)
        strongest = self.num_teachers - 1
        teacher = strongest if self._teacher is None else self._teacher
        which = "strongest teacher" if teacher == strongest else "fixed teacher"
        return Decision(
            stage=0,
            teacher=teacher,
            reason=f"standard KD: {which} {teacher}, batches from all data, no schedule",
        )


class _ClockPolicy(SchedulerPolicy):
    """A policy whose stage follows the stage clock; subclasses say who teaches."""

    _ladder: ClassVar[bool]  # True: teacher k at stage k; False: always the strongest teacher
    reads_probes = False  # the stage clock reads step numbers only
    _explain: ClassVar[str]

    def __init__(self, boundaries: Sequence[int] | None = None) -> None:
        self._boundaries = (
            None if boundaries is None else validate_boundaries(self.name, boundaries)
        )

    def bind(self, *, num_stages: int, num_teachers: int, total_steps: int) -> None:
        super().bind(num_stages=num_stages, num_teachers=num_teachers, total_steps=total_steps)
        if self._ladder:
            self._require_ladder()
        self._clock = StageClock.build(
            self.name, num_stages=num_stages, total_steps=total_steps, boundaries=self._boundaries
        )

    def decide(self, obs: Observation) -> Decision:
        self._require_bound(obs)
        stage = self._clock.stage_at(obs.step)
        if self._ladder:
            teacher, who = stage, f"teacher {stage} = stage {stage} (ladder)"
        else:
            teacher = self.num_teachers - 1
            who = f"strongest teacher {teacher}"
        return Decision(
            stage=stage,
            teacher=teacher,
            reason=f"{self._clock.describe(obs.step)}; {who}{self._explain}",
        )


class DataOnlyPolicy(_ClockPolicy):
    """Data curriculum alone: easy -> hard stages on the clock, always the strongest teacher."""

    name = "data_only"
    curriculum = "difficulty"
    _ladder = False
    _explain = ""


class TeacherOnlyPolicy(_ClockPolicy):
    """Teacher ladder alone: teacher k during clock phase k, batches from all the data."""

    name = "teacher_only"
    curriculum = "none"
    _ladder = True
    _explain = "; batches from all data"


class ClpdPolicy(_ClockPolicy):
    """CLPD: K stages easy -> hard, teacher k supervises stage k, paced by the stage clock."""

    name = "clpd"
    curriculum = "difficulty"
    _ladder = True
    _explain = ""


class RandomCurriculumPolicy(_ClockPolicy):
    """CLPD's same-pacing control: the same stage sizes and teachers, random stage membership."""

    name = "random_curriculum"
    curriculum = "random"
    _ladder = True
    _explain = "; stages hold random examples (same pacing as clpd)"
