"""The scheduling-policy interface: a pure object that turns an Observation into a Decision.

The controller owns all I/O; a policy only decides (STYLE 2). Its life cycle::

    policy = resolve_policy(spec, kwargs)        # construct, validate kwargs
    policy.bind(num_stages=K, num_teachers=M, total_steps=T)   # once, before the run
    policy.load_state_dict(state)                # only when resuming
    decision = policy.decide(observation)        # before each step (or each probe)
    state = policy.state_dict()                  # at each checkpoint, JSON-serialisable

``reads_probes`` (default True) says whether the policy reads probe results; fixed schedules set
False and their runs take no probes.

``curriculum`` tells the controller how the training data is split into stages:

* ``"difficulty"``: stages are easy -> hard difficulty quantiles; ``Decision.stage`` picks one.
* ``"random"``: the same stage sizes, but examples are assigned to stages at random (the
  same-pacing control a curriculum experiment needs).
* ``"none"``: stage-agnostic; batches come from all the data and ``Decision.stage`` is a label.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Literal, get_args

from clpd_ray.errors import PolicyError
from clpd_ray.messages import Decision, Observation

__all__ = ["CurriculumMode", "SchedulerPolicy"]

CurriculumMode = Literal["difficulty", "random", "none"]
_CURRICULUM_MODES: tuple[str, ...] = get_args(CurriculumMode)


class SchedulerPolicy(abc.ABC):
    """Decides the stage, teacher and replay share for the next steps.

    Subclasses set ``name`` (defaults to the class name) and ``curriculum`` and implement
    :meth:`decide`. Policies with state between calls override :meth:`state_dict` and
    :meth:`load_state_dict`; policies with geometry requirements extend :meth:`bind`.
    """

    name: ClassVar[str]
    curriculum: ClassVar[CurriculumMode] = "difficulty"
    # Whether decide() reads Observation.probes / teacher_accuracy. Probes cost the student a
    # weight snapshot and the scheduler an evaluation every probe_every steps: a policy that
    # never reads them says False and the run takes none.
    reads_probes: ClassVar[bool] = True

    num_stages: int
    num_teachers: int
    total_steps: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A subclass of a built-in is a different policy: never inherit its registry name.
        if "name" not in cls.__dict__:
            cls.name = cls.__name__
        if cls.curriculum not in _CURRICULUM_MODES:
            raise PolicyError(
                f"policy class {cls.__qualname__}: curriculum={cls.curriculum!r} is not one of "
                f"{list(_CURRICULUM_MODES)}"
            )

    def bind(self, *, num_stages: int, num_teachers: int, total_steps: int) -> None:
        """Learn the run's geometry once, before the first decision; raise if it cannot work."""
        for key, value in (
            ("num_stages", num_stages),
            ("num_teachers", num_teachers),
            ("total_steps", total_steps),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PolicyError(
                    f"policy {self.name!r}: bind() got {key}={value!r}; it must be an int >= 1"
                )
        self.num_stages = num_stages
        self.num_teachers = num_teachers
        self.total_steps = total_steps

    @abc.abstractmethod
    def decide(self, obs: Observation) -> Decision:
        """The stage and teacher from ``obs.step`` on, with a human-readable reason."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state needed to resume; stateless policies have none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (after :meth:`bind`)."""
        if not isinstance(state, dict):
            raise PolicyError(
                f"policy {self.name!r}: load_state_dict() needs a dict, got {type(state).__name__}"
            )
        if state:
            raise PolicyError(
                f"policy {self.name!r} is stateless but was given state with keys "
                f"{sorted(state)}; the checkpoint was probably written by another policy: "
                f"resume with the policy that wrote it"
            )

    # -- helpers for subclasses -------------------------------------------------------------

    def _require_bound(self, obs: Observation | None = None) -> None:
        """Raise unless bind() ran and ``obs`` (if given) matches the bound geometry."""
        if not hasattr(self, "total_steps"):
            raise PolicyError(
                f"policy {self.name!r}: decide() was called before bind(); call "
                f"bind(num_stages=..., num_teachers=..., total_steps=...) first"
            )
        if obs is not None and (
            obs.num_stages != self.num_stages or obs.num_teachers != self.num_teachers
        ):
            raise PolicyError(
                f"policy {self.name!r} was bound to {self.num_stages} stages and "
                f"{self.num_teachers} teachers but the observation has {obs.num_stages} stages "
                f"and {obs.num_teachers} teachers"
            )

    def _require_ladder(self) -> None:
        """For policies that give stage k to teacher k: one teacher per stage."""
        if self.num_stages != self.num_teachers:
            raise PolicyError(
                f"policy {self.name!r} gives stage k to teacher k, so it needs as many stages as "
                f"teachers, but num_stages={self.num_stages} and "
                f"num_teachers={self.num_teachers}; set curriculum.num_stages="
                f"{self.num_teachers} or use a ladder of {self.num_stages} teachers"
            )
