"""The scheduler service: hosts a scheduling policy (users watch it as ``scheduler``).

The policy only decides (pure, no I/O); this service does the rest: it checks every decision
and records the schedule as Ray metrics. Probes, which feed later observations, run on the
student actor, where the weights are (runtime/actors/student.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from clpd_ray.errors import ClpdError
from clpd_ray.messages import Decision, Observation
from clpd_ray.policies import SchedulerPolicy, check_decision, resolve_policy
from clpd_ray.policies.guard import bind_policy, is_builtin, policy_call_error, policy_state
from clpd_ray.runtime.actors.device import set_threads
from clpd_ray.runtime.metrics import RunMetrics
from clpd_ray.runtime.recovery import StateLostError

__all__ = ["SchedulerService"]


class SchedulerService:
    def __init__(
        self,
        policy: str | type[SchedulerPolicy] | SchedulerPolicy,
        policy_kwargs: dict[str, Any] | None,
        *,
        num_stages: int,
        teacher_names: Sequence[str],
        total_steps: int,
        run_id: str = "local",
        threads: int | None = 1,
    ) -> None:
        set_threads(threads)
        self.policy = bind_policy(
            resolve_policy(policy, policy_kwargs),
            num_stages=num_stages,
            num_teachers=len(teacher_names),
            total_steps=total_steps,
        )
        self.num_stages = num_stages
        self.teacher_names = list(teacher_names)
        self.metrics = RunMetrics(run_id)
        self.busy_s = 0.0  # time spent in decide()
        # A restarted instance has lost the policy's state: it answers decide/state_dict only
        # once the executor has put the state back (load_state_dict), so a call that reaches
        # it after a crash fails, and the run replays, instead of deciding from a reset policy.
        self._lost_state = _reconstructed()

    def __repr__(self) -> str:
        # Safe on a half-built object (Ray calls repr when __init__ raised).
        policy = getattr(getattr(self, "policy", None), "name", "?")
        teachers = len(getattr(self, "teacher_names", ()))
        return (
            f"SchedulerService(policy={policy}, stages={getattr(self, 'num_stages', '?')}, "
            f"teachers={teachers})"
        )

    @property
    def policy_name(self) -> str:
        return self.policy.name

    def info(self) -> dict:
        return {"policy": self.policy.name, "curriculum": self.policy.curriculum}

    def decide(self, obs: Observation) -> tuple[Decision, dict]:
        """The checked decision for ``obs`` and the policy state *before* it (for checkpoints)."""
        self._check_state()
        start = time.perf_counter()
        before = policy_state(self.policy)  # JSON-ready: numpy numbers become plain ones
        try:
            raw = self.policy.decide(obs)
        except ClpdError:
            raise
        except Exception as err:
            if is_builtin(type(self.policy)):
                raise  # a bug in a built-in policy: an internal error, with its traceback
            call = f"decide() at step {obs.step}"
            raise policy_call_error(self.policy.name, type(self.policy), call, err) from None
        decision = check_decision(self.policy.name, raw, self.num_stages, len(self.teacher_names))
        self.metrics.schedule(
            decision.stage, decision.teacher, self.teacher_names[decision.teacher], decision.reason
        )
        self.busy_s += time.perf_counter() - start
        return decision, before

    def state_dict(self) -> dict:
        self._check_state()
        return policy_state(self.policy)

    def load_state_dict(self, state: dict) -> None:
        """Put the policy back where a checkpoint left it (after a restart, resume or rewind)."""
        self.policy.load_state_dict(state)
        self._lost_state = False

    def _check_state(self) -> None:
        if self._lost_state:
            raise StateLostError(
                "the scheduler actor was restarted and its policy state not restored yet"
            )

    def stats(self) -> dict:
        return {"policy": self.policy.name, "busy_s": self.busy_s}

    def pid(self) -> int:
        return os.getpid()


def _reconstructed() -> bool:
    """Whether this actor is a restarted instance (False outside Ray)."""
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed
    except Exception:  # not in an actor
        return False
