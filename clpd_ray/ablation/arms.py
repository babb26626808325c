"""Ablation arms: what each arm of ``clpd ablate`` runs, and the config of one arm x seed.

An arm is a built-in policy with its constructor kwargs: ``clpd``, the baselines, ``adaptive``, or
``single:<teacher>`` (standard KD from that one rung of the ladder, the "stronger teacher, worse
student?" check). The config's ``scheduler.kwargs`` belong to its own ``scheduler.policy``; every
other arm runs with its policy's defaults.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from clpd_ray.config import Config, config_from_dict
from clpd_ray.errors import ClpdError
from clpd_ray.policies import BUILTIN_POLICIES

__all__ = [
    "DEFAULT_ARMS",
    "SINGLE_PREFIX",
    "Arm",
    "parse_arms",
    "run_config",
    "single_arm_map",
]

DEFAULT_ARMS = ("standard_kd", "data_only", "teacher_only", "clpd", "random_curriculum", "adaptive")
SINGLE_PREFIX = "single:"


@dataclass(frozen=True)
class Arm:
    """One arm: a built-in policy with its constructor kwargs."""

    name: str  # "clpd", "single:t-small", ...
    policy: str  # a key of BUILTIN_POLICIES
    kwargs: dict[str, Any] = field(default_factory=dict)
    teacher: str | None = None  # the only teacher, for standard KD arms

    @property
    def slug(self) -> str:
        """The arm as a directory / actor-name component."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.name)


def parse_arms(names: Sequence[str], config: Config, *, single_teachers: bool = False) -> list[Arm]:
    """Validate arm names against the built-ins and the ladder; ``single_teachers`` adds
    ``single:<t>`` for each rung (but the strongest when ``standard_kd``, its twin, is an arm)."""
    ladder = [t.name for t in config.teachers.ladder]
    names = [n.strip() for n in names]
    if not names or any(not n for n in names):
        raise ClpdError(
            f"--arms {','.join(names)!r} has an empty entry; give a comma-separated list such as "
            f"--arms {','.join(DEFAULT_ARMS)}"
        )
    if single_teachers:
        rungs = ladder[:-1] if "standard_kd" in names else ladder
        names += [f"{SINGLE_PREFIX}{t}" for t in rungs if f"{SINGLE_PREFIX}{t}" not in names]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ClpdError(f"--arms names {dupes} more than once; list each arm once")
    arms = []
    for name in names:
        if name.startswith(SINGLE_PREFIX):
            teacher = name.removeprefix(SINGLE_PREFIX)
            if teacher not in ladder:
                raise ClpdError(
                    f"arm {name!r}: no teacher {teacher!r} in the ladder; single-teacher arms are "
                    f"{', '.join(SINGLE_PREFIX + t for t in ladder)}"
                )
            kwargs = {"teacher": ladder.index(teacher)}
            arms.append(Arm(name, "standard_kd", kwargs, teacher))
        elif name in BUILTIN_POLICIES:
            # The config's scheduler.kwargs belong to its own policy; other arms use defaults.
            kwargs = dict(config.scheduler.kwargs) if name == config.scheduler.policy else {}
            arms.append(Arm(name, name, kwargs, _fixed_teacher(name, kwargs, ladder)))
        else:
            raise ClpdError(
                f"unknown arm {name!r}; arms are the built-in policies "
                f"({', '.join(BUILTIN_POLICIES)}) and single:<teacher> for a teacher of the "
                f"ladder ({', '.join(ladder)})"
            )
    slugs = [a.slug for a in arms]
    if len(set(slugs)) != len(slugs):
        raise ClpdError(f"arms {names} map to clashing directory names {slugs}; rename a teacher")
    return arms


def _fixed_teacher(policy: str, kwargs: dict[str, Any], ladder: list[str]) -> str | None:
    """The only teacher of a standard KD arm (None for other arms, or a bad index that
    resolving the policy reports)."""
    if policy != "standard_kd":
        return None
    i = kwargs.get("teacher")
    if i is None:
        return ladder[-1]
    return ladder[i] if isinstance(i, int) and 0 <= i < len(ladder) else None


def single_arm_map(arm_teachers: Mapping[str, str | None], ladder: Sequence[str]) -> dict[str, str]:
    """Teacher name -> the arm distilling from that teacher alone, weakest first, for the
    "stronger teacher, worse student?" check. ``arm_teachers`` maps arm -> its ``teacher`` (the
    results rows' field); ``standard_kd`` counts for the rung it uses. Empty unless a ``single:``
    arm was run."""
    if not any(a.startswith(SINGLE_PREFIX) for a in arm_teachers):
        return {}
    out = {}
    for t in ladder:
        for arm in (SINGLE_PREFIX + t, "standard_kd"):
            if arm in arm_teachers and arm_teachers[arm] == t:
                out[t] = arm
                break
    return out


def run_config(base: Config, arm: Arm, seed: int) -> Config:
    """The base config with this arm's policy and this seed (student init + sampler)."""
    raw = base.to_dict()
    raw["seed"] = seed
    raw["scheduler"]["policy"] = arm.policy
    raw["scheduler"]["kwargs"] = dict(arm.kwargs)
    return config_from_dict(raw, f"ablation run {arm.name} seed {seed}")
