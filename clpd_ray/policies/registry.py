"""Finding a policy by name or import string, and checking what it decides.

``resolve_policy`` turns the config's ``scheduler.policy`` (+ ``scheduler.kwargs``) into a
constructed policy. An import string ``"package.module:ClassName"`` imports and runs the user's
module, so only point it at code you trust. ``check_decision`` is the controller's guard on every
Decision a policy returns, so a buggy user policy fails with a clear message, not deep in a worker.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import numbers
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from clpd_ray.errors import ClpdError, PolicyError
from clpd_ray.messages import Decision
from clpd_ray.policies.adaptive import AdaptivePolicy
from clpd_ray.policies.base import SchedulerPolicy
from clpd_ray.policies.fixed import (
    ClpdPolicy,
    DataOnlyPolicy,
    RandomCurriculumPolicy,
    StandardKDPolicy,
    TeacherOnlyPolicy,
)
from clpd_ray.policies.guard import is_builtin, policy_call_error

__all__ = ["BUILTIN_POLICIES", "check_decision", "resolve_policy"]

BUILTIN_POLICIES: dict[str, type[SchedulerPolicy]] = {
    cls.name: cls
    for cls in (
        StandardKDPolicy,
        DataOnlyPolicy,
        TeacherOnlyPolicy,
        ClpdPolicy,
        RandomCurriculumPolicy,
        AdaptivePolicy,
    )
}

_SPEC_HELP = (
    f"scheduler.policy must be a built-in name ({', '.join(BUILTIN_POLICIES)}) or an import "
    f"string 'package.module:ClassName' naming a SchedulerPolicy subclass"
)


def resolve_policy(spec: object, kwargs: Mapping[str, Any] | None = None) -> SchedulerPolicy:
    """A constructed policy from a built-in name, ``"pkg.module:Class"``, a class, or an instance.

    ``kwargs`` go to the class's constructor; an instance is returned as is and takes none.
    """
    kwargs = dict(kwargs or {})
    if isinstance(spec, SchedulerPolicy):
        if kwargs:
            raise PolicyError(
                f"policy {spec.name!r} was given as an instance, so scheduler.kwargs "
                f"{sorted(kwargs)} cannot be applied; pass the class instead, or drop the kwargs"
            )
        return spec
    if isinstance(spec, str):
        cls = _load_class(spec)
    elif isinstance(spec, type):
        cls = spec
    else:
        raise PolicyError(f"policy {spec!r} is a {type(spec).__name__}; {_SPEC_HELP}")
    if not issubclass(cls, SchedulerPolicy):
        raise PolicyError(
            f"policy {spec!r}: {cls.__module__}.{cls.__qualname__} does not subclass "
            f"clpd_ray.policies.SchedulerPolicy; subclass it and implement decide()"
        )
    if inspect.isabstract(cls):
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        raise PolicyError(
            f"policy {spec!r}: {cls.__qualname__} is abstract (does not implement "
            f"{', '.join(missing)}); implement them"
        )
    return _construct(spec, cls, kwargs)


def _load_class(spec: str) -> type:
    if spec in BUILTIN_POLICIES:
        return BUILTIN_POLICIES[spec]
    if ":" not in spec:
        close = difflib.get_close_matches(spec, BUILTIN_POLICIES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise PolicyError(f"unknown policy {spec!r}; {hint}{_SPEC_HELP}")
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or ":" in attr:
        raise PolicyError(f"policy {spec!r} is not of the form 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise PolicyError(
                f"policy {spec!r}: module {module_name!r} not found; install it or add its "
                f"directory to PYTHONPATH (on every Ray node)"
            ) from e
        raise PolicyError(
            f"policy {spec!r}: importing {module_name!r} failed because it imports the missing "
            f"module {e.name!r}; install that dependency"
        ) from e
    except Exception as e:
        raise PolicyError(
            f"policy {spec!r}: importing {module_name!r} raised {type(e).__name__}: {e}; fix "
            f"the module"
        ) from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            found = sorted(
                n
                for n, v in vars(module).items()
                if isinstance(v, type)
                and issubclass(v, SchedulerPolicy)
                and v is not SchedulerPolicy
            )
            raise PolicyError(
                f"policy {spec!r}: module {module_name!r} has no attribute {attr!r}; policy "
                f"classes it defines or imports: {found or 'none'}"
            )
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise PolicyError(
            f"policy {spec!r}: {attr!r} is a {type(obj).__name__}, not a class; name a "
            f"SchedulerPolicy subclass"
        )
    return obj


def _construct(spec: object, cls: type[SchedulerPolicy], kwargs: dict[str, Any]) -> SchedulerPolicy:
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        signature = None
    label = spec if isinstance(spec, str) else cls.name
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as e:
            accepted = ", ".join(
                p.name if p.default is p.empty else f"{p.name}={p.default!r}"
                for p in signature.parameters.values()
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            )
            raise PolicyError(
                f"policy {label!r}: bad scheduler.kwargs {kwargs}: {e}; it accepts "
                f"{cls.__name__}({accepted})"
            ) from e
    try:
        return cls(**kwargs)
    except ClpdError:
        raise
    except (TypeError, ValueError) as e:  # how constructors reject bad arguments
        raise PolicyError(
            f"policy {label!r}: constructing {cls.__name__}(**{kwargs}) failed: "
            f"{type(e).__name__}: {e}; fix scheduler.kwargs"
        ) from e
    except Exception as e:
        if is_builtin(cls):
            raise  # a bug in a built-in policy: an internal error, with its traceback
        fix = "fix the policy or scheduler.kwargs"
        raise policy_call_error(cls.name, cls, f"__init__(**{kwargs})", e, fix) from None


def check_decision(
    policy_name: str, decision: object, num_stages: int, num_teachers: int
) -> Decision:
    """``decision`` with plain Python numbers if valid for this geometry, else PolicyError.

    numpy scalars are accepted and converted, so the Decision stays JSON-serialisable.
    """

    def bad(what: str) -> PolicyError:
        return PolicyError(f"policy {policy_name!r} returned an invalid decision: {what}")

    if not isinstance(decision, Decision):
        raise bad(
            f"got {type(decision).__name__} {decision!r}; decide() must return "
            f"clpd_ray.messages.Decision"
        )
    for key, value, count in (
        ("stage", decision.stage, num_stages),
        ("teacher", decision.teacher, num_teachers),
    ):
        if not _is_int(value) or not 0 <= value < count:
            raise bad(f"{key}={value!r} is not an int in [0, {count - 1}]")
    if not isinstance(decision.reason, str) or not decision.reason.strip():
        raise bad(f"reason={decision.reason!r}; give a non-empty string saying why")
    replay = decision.replay
    if replay is not None and not (_is_real(replay) and 0.0 <= replay < 1.0):
        raise bad(f"replay={replay!r} is not None or a number in [0, 1)")
    mix = decision.teacher_mix
    if mix is not None:
        if (
            not isinstance(mix, (tuple, list))
            or len(mix) != num_teachers
            or not all(_is_real(w) and w >= 0 for w in mix)
        ):
            raise bad(
                f"teacher_mix={mix!r} must hold {num_teachers} non-negative weights, one per "
                f"teacher (weakest first)"
            )
        if not math.isclose(sum(mix), 1.0, abs_tol=1e-3):
            raise bad(f"teacher_mix={mix!r} sums to {sum(mix):.4g}, not 1")
    return replace(
        decision,
        stage=int(decision.stage),
        teacher=int(decision.teacher),
        replay=None if replay is None else float(replay),
        teacher_mix=None if mix is None else tuple(float(w) for w in mix),
    )


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return math.isfinite(value)
