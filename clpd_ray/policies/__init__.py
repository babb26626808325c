"""Scheduling policies: when to move to the next curriculum stage and which teacher to use.

A policy is a pure object (no Ray, no I/O) that maps an :class:`Observation` to a
:class:`Decision`; the controller acts on it. See ``docs/policies.md`` to write your own.
"""

from __future__ import annotations

from clpd_ray.messages import Decision, Observation, ProbeResult
from clpd_ray.policies.adaptive import AdaptivePolicy
from clpd_ray.policies.base import CurriculumMode, SchedulerPolicy
from clpd_ray.policies.fixed import (
    ClpdPolicy,
    DataOnlyPolicy,
    RandomCurriculumPolicy,
    StandardKDPolicy,
    TeacherOnlyPolicy,
)
from clpd_ray.policies.guard import bind_policy, policy_state, to_jsonable
from clpd_ray.policies.registry import BUILTIN_POLICIES, check_decision, resolve_policy

__all__ = [
    "BUILTIN_POLICIES",
    "AdaptivePolicy",
    "ClpdPolicy",
    "CurriculumMode",
    "DataOnlyPolicy",
    "Decision",
    "Observation",
    "ProbeResult",
    "RandomCurriculumPolicy",
    "SchedulerPolicy",
    "StandardKDPolicy",
    "TeacherOnlyPolicy",
    "bind_policy",
    "check_decision",
    "policy_state",
    "resolve_policy",
    "to_jsonable",
]
