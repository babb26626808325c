"""Ablation arms: what each arm of ``clpd ablate`` runs, and the config of one arm x seed.

An arm is a policy with its constructor kwargs and config overrides, written as one spec::

    SPEC  := [LABEL "="] BASE ("@" KEY "=" VALUE)*
    BASE  := a built-in policy (clpd, standard_kd, ...) | sft | single:<teacher>
    KEY   := a policy kwarg (no dot: boundaries, patience, ...) or a config key (dotted, as
             --set takes it: distill.temperature, student.lr, curriculum.replay, ...)
    VALUE := a YAML scalar or flow list, as --set parses it ([300,600], 0.001, true)

    clpd                                the built-in, its defaults
    clpd@boundaries=[300,600]           kwargs: the fixed schedule's stage starts
    clpd-lr1e-3=clpd@student.lr=0.001   a label, and a config override
    standard_kd@distill.temperature=2   a baseline with another KD temperature
    sft                                 no teacher: hard cross-entropy on the gold chains
    single:t-small                      standard KD from that one rung of the ladder

``sft`` is ``standard_kd`` with ``distill.objective=sft`` (the student trains on the reference
chain of thought with cross-entropy, same batches and budget, no teacher). ``single:<teacher>``
is ``standard_kd@teacher=<index>`` (the "stronger teacher, worse student?" check). The config's
``scheduler.kwargs`` belong to its own ``scheduler.policy``; an arm of that policy starts from
them and its spec's kwargs win. A label defaults to the spec itself; values cannot contain '@'.
Overrides may not touch what all arms share (the data, the teacher ladder, the seed): the
workload is built once from the base config.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from clpd_ray._yaml import parse_yaml
from clpd_ray.config import SEED_MAX, Config, apply_overrides, config_from_dict
from clpd_ray.errors import ClpdError, ConfigError
from clpd_ray.policies import BUILTIN_POLICIES, resolve_policy

__all__ = [
    "DEFAULT_ARMS",
    "SFT",
    "SINGLE_PREFIX",
    "Arm",
    "describe_seeds",
    "parse_arm",
    "parse_arms",
    "parse_seeds",
    "run_config",
    "single_arm_map",
    "split_arms",
]

DEFAULT_ARMS = ("standard_kd", "data_only", "teacher_only", "clpd", "random_curriculum", "adaptive")
SINGLE_PREFIX = "single:"
SFT = "sft"  # the no-teacher baseline arm
SPEC_HELP = (
    "an arm is [LABEL=]BASE[@KEY=VALUE...]: BASE a built-in policy, sft or single:<teacher>; "
    "KEY a policy kwarg (boundaries=[300,600]) or a dotted config key (student.lr=0.001)"
)
# Config keys every arm shares: the workload (data, difficulty scores, ladder) is built once
# from the base config, and each run's seed is set by --seeds.
_SHARED_KEYS = (
    "seed",
    "task",
    "data",
    "teachers.ladder",
    "teachers.batch_size",
    "teachers.cache_dir",
    "curriculum.scorer",
    "train.max_length",
    "train.overlong",
    "scheduler.policy",
    "scheduler.kwargs",
)
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]*")


@dataclass(frozen=True)
class Arm:
    """One arm: a built-in policy with its constructor kwargs and config overrides."""

    name: str  # "clpd", "single:t-small", "clpd@boundaries=[300,600]", a label...
    policy: str  # a key of BUILTIN_POLICIES
    kwargs: dict[str, Any] = field(default_factory=dict)
    teacher: str | None = None  # the only teacher, for standard KD arms
    overrides: tuple[str, ...] = ()  # "key=value" items, applied like --set
    spec: str = ""  # the text it was parsed from ("" = its name)

    @property
    def slug(self) -> str:
        """The arm as a directory / actor-name component."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.name).strip("_") or "arm"

    @property
    def source(self) -> str:
        """The spec that :func:`parse_arm` turns back into this arm."""
        return self.spec or self.name


def split_arms(text: str) -> list[str]:
    """``--arms`` text split on the commas outside brackets: "clpd@boundaries=[3,6],sft"."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth <= 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [*parts, cur]


def _value(spec: str, item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ClpdError(f"arm {spec!r}: {item!r} is not KEY=VALUE; {SPEC_HELP}")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except Exception:  # not YAML: keep the text (as --set does)
        value = raw
    return key, value


def parse_arm(spec: str, config: Config) -> Arm:
    """One arm from its spec (see the module docstring), checked against ``config``: the
    policy and its kwargs construct, the overrides make a valid config; else ClpdError naming
    the spec."""
    spec = spec.strip()
    head, *items = spec.split("@")
    label, eq, base = head.rpartition("=")
    base, label = base.strip(), label.strip()
    if eq and not _LABEL.fullmatch(label):
        raise ClpdError(
            f"arm {spec!r}: label {label!r} must be letters, digits and . _ : + - (starting with "
            f"a letter or digit); {SPEC_HELP}"
        )
    ladder = [t.name for t in config.teachers.ladder]
    kwargs: dict[str, Any] = {}
    overrides: list[str] = []
    for item in items:
        key, value = _value(spec, item)
        if any(key == k or key.startswith(k + ".") for k in _SHARED_KEYS):
            raise ClpdError(
                f"arm {spec!r}: {key} cannot differ between arms (all arms share the data, the "
                f"teacher ladder and the seed: set it in the config or with --set; seeds with "
                f"--seeds; the policy as the arm's base)"
            )
        if "." not in key:
            if key in kwargs:
                raise ClpdError(f"arm {spec!r} gives the kwarg {key!r} twice; give it once")
            kwargs[key] = value
            continue
        overrides.append(f"{key}={item.partition('=')[2]}")
    if base.startswith(SINGLE_PREFIX):
        teacher = base.removeprefix(SINGLE_PREFIX)
        if teacher not in ladder:
            raise ClpdError(
                f"arm {spec!r}: no teacher {teacher!r} in the ladder; single-teacher arms are "
                f"{', '.join(SINGLE_PREFIX + t for t in ladder)}"
            )
        if "teacher" in kwargs:
            raise ClpdError(f"arm {spec!r}: {base} fixes the teacher; drop teacher=")
        policy, kwargs = "standard_kd", {"teacher": ladder.index(teacher), **kwargs}
    elif base == SFT:
        if kwargs:
            raise ClpdError(
                f"arm {spec!r}: sft has no teacher and no schedule, so it takes no policy "
                f"kwargs ({', '.join(kwargs)}); give config keys (student.lr=...) only"
            )
        if any(o.startswith("distill.objective=") for o in overrides):
            raise ClpdError(f"arm {spec!r}: sft sets distill.objective=sft itself; drop it")
        policy, overrides = "standard_kd", ["distill.objective=sft", *overrides]
    elif base in BUILTIN_POLICIES:
        policy = base
        if base == config.scheduler.policy:  # the config's kwargs belong to its own policy
            kwargs = {**config.scheduler.kwargs, **kwargs}
    else:
        raise ClpdError(
            f"unknown arm {base!r} in {spec!r}; arms are the built-in policies "
            f"({', '.join(BUILTIN_POLICIES)}), {SFT} (no teacher), and single:<teacher> for a "
            f"teacher of the ladder ({', '.join(ladder)}); {SPEC_HELP}"
        )
    name = label if eq else spec.replace(" ", "")
    only = None if base == SFT else _fixed_teacher(policy, kwargs, ladder)
    arm = Arm(name, policy, kwargs, only, tuple(overrides), spec if spec != name else "")
    try:
        resolve_policy(arm.policy, arm.kwargs)
        run_config(config, arm, config.seed)
    except ClpdError as err:
        raise ClpdError(f"arm {spec!r}: {err}") from None
    return arm


def parse_arms(names: Sequence[str], config: Config, *, single_teachers: bool = False) -> list[Arm]:
    """Arms from their specs (see :func:`parse_arm`); ``single_teachers`` adds ``single:<t>`` for
    each rung (but the strongest when ``standard_kd``, its twin, is an arm)."""
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
    arms = [parse_arm(n, config) for n in names]
    labels = [a.name for a in arms]
    dupes = sorted({n for n in labels if labels.count(n) > 1})
    if dupes:
        raise ClpdError(f"--arms names {dupes} more than once; list each arm once")
    slugs = [a.slug for a in arms]
    if len(set(slugs)) != len(slugs):
        raise ClpdError(
            f"arms {labels} map to clashing directory names {slugs}; give them labels "
            f"(LABEL=spec) or rename a teacher"
        )
    return arms


def parse_seeds(text: str | int) -> list[int]:
    """``--seeds``: ``N`` is seeds 0..N-1 (as always); ``A-B`` is A..B inclusive; a comma list
    mixes both forms' ranges and single seeds: ``0,2,4``, ``5-9``, ``0-4,10`` (a lone ``5`` in a
    list is seed 5; alone it means 0..4, so seed 5 by itself is ``5-5``)."""
    raw = str(text).strip()
    bad = ClpdError(
        f"--seeds {raw!r}: give N (seeds 0..N-1, N >= 1), a range A-B (e.g. 5-9) or a comma "
        f"list (e.g. 0,2,4 or 0-4,10) of seeds in [0, {SEED_MAX}]"
    )
    if re.fullmatch(r"\d+", raw):
        n = int(raw)
        if n < 1:
            raise ClpdError(f"--seeds {raw}: an ablation needs at least one seed per arm")
        return list(range(n))
    seeds: list[int] = []
    for part in raw.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise bad
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if hi < lo or hi > SEED_MAX:
            raise bad
        seeds += range(lo, hi + 1)
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ClpdError(f"--seeds {raw!r} names seeds {twice} more than once; list each once")
    return seeds


def describe_seeds(seeds: Sequence[int]) -> str:
    """``[0, 1, 2, 3, 7]`` -> ``"seeds 0-3,7"``, ``[100]`` -> ``"seed 100"``: the plan line shows
    which seeds run, so ``--seeds 100`` (seeds 0-99) is not mistaken for seed 100."""
    runs: list[list[int]] = []
    for s in seeds:
        if runs and s == runs[-1][-1] + 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    text = ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
    return f"seed {text}" if len(seeds) == 1 else f"seeds {text}"


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
    """The base config with this arm's overrides, policy and kwargs, and this seed (student
    init + sampler)."""
    try:
        raw = apply_overrides(base.to_dict(), list(arm.overrides))
    except ConfigError as err:
        raise ConfigError(f"ablation arm {arm.name}: {err}") from None
    raw["seed"] = seed
    raw["scheduler"]["policy"] = arm.policy
    raw["scheduler"]["kwargs"] = dict(arm.kwargs)
    return config_from_dict(raw, f"ablation run {arm.name} seed {seed}")
