"""Calling a policy's code: a user policy's exceptions become one PolicyError line, and its
state becomes JSON.

A user policy (imported from ``scheduler.policy: "pkg.module:Class"``) may raise anything in
``__init__``, ``bind()``, ``decide()`` or ``state_dict()``; that is a mistake in the user's code,
so it is reported as bad input (exit 2) naming the policy, the method, the exception and the
line of the policy's file. A built-in policy raising is a bug in clpd: it propagates unchanged
and stays an internal error with its traceback. ``ClpdError`` raised on purpose passes as is.

``policy_state`` is what checkpoints store: ``state_dict()`` with numpy scalars and arrays
turned into plain numbers and lists, so ``json.dump`` of a checkpoint cannot fail midway.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Mapping
from typing import Any

import numpy as np

from clpd_ray.errors import ClpdError, PolicyError
from clpd_ray.policies.base import SchedulerPolicy

__all__ = ["bind_policy", "is_builtin", "policy_call_error", "policy_state", "to_jsonable"]


def is_builtin(cls: type) -> bool:
    """A policy class shipped with clpd (its errors are clpd's bugs, not the user's)."""
    return cls.__module__.startswith("clpd_ray.")


def _where(cls: type, err: BaseException) -> str:
    """``file:line`` of the innermost frame in the policy's own file (else the innermost)."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return "unknown location"
    module = sys.modules.get(cls.__module__)
    own = getattr(module, "__file__", None)
    mine = [f for f in frames if own is not None and f.filename == own]
    frame = (mine or frames)[-1]
    return f"{frame.filename}:{frame.lineno}"


def policy_call_error(
    name: str, cls: type, call: str, err: BaseException, fix: str = "fix the policy"
) -> PolicyError:
    """The one-line error for a user policy whose ``call`` (e.g. ``"decide() at step 3"``) raised."""
    return PolicyError(
        f"policy {name!r} raised {type(err).__name__}: {err} in {call} ({_where(cls, err)}); {fix}"
    )


def bind_policy(
    policy: SchedulerPolicy, *, num_stages: int, num_teachers: int, total_steps: int
) -> SchedulerPolicy:
    """``policy.bind(...)``; a user policy's exception becomes a PolicyError naming it."""
    try:
        policy.bind(num_stages=num_stages, num_teachers=num_teachers, total_steps=total_steps)
    except ClpdError:
        raise
    except Exception as err:
        if is_builtin(type(policy)):
            raise
        call = (
            f"bind(num_stages={num_stages}, num_teachers={num_teachers}, total_steps={total_steps})"
        )
        raise policy_call_error(policy.name, type(policy), call, err) from None
    return policy


def policy_state(policy: SchedulerPolicy) -> dict[str, Any]:
    """``policy.state_dict()`` as JSON-ready values (numpy numbers and arrays converted)."""
    try:
        state = policy.state_dict()
    except ClpdError:
        raise
    except Exception as err:
        if is_builtin(type(policy)):
            raise
        raise policy_call_error(policy.name, type(policy), "state_dict()", err) from None
    if not isinstance(state, dict):
        raise PolicyError(
            f"policy {policy.name!r}: state_dict() returned {type(state).__name__}; return a dict "
            f"(empty for a stateless policy)"
        )
    try:
        return to_jsonable(state)
    except TypeError as err:
        raise PolicyError(
            f"policy {policy.name!r}: state_dict() {err}; return only dicts, lists, str, int, "
            f"float, bool, None (numpy numbers and arrays are converted)"
        ) from None


def to_jsonable(value: Any, where: str = "state") -> Any:
    """``value`` with numpy scalars as Python numbers, arrays and tuples as lists (recursively).

    Raises TypeError naming the path (``state['window'][2]``) of anything JSON cannot hold.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return to_jsonable(value.item(), where)
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist(), where)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            k = key.item() if isinstance(key, np.generic) else key
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TypeError(f"holds the key {key!r} ({type(key).__name__}) in {where}")
            out[k] = to_jsonable(item, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(f"holds a {type(value).__name__} at {where}, which JSON cannot store")
