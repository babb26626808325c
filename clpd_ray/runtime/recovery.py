"""Recovering a run: the checkpoint state format, and waiting for restarted actors.

A checkpoint ``checkpoints/step-<N>/`` holds the student's files and ``controller.json``: what the
planner (runtime/planner.py) needs to plan step N again exactly as the first time. Decisions depend on step numbers
only (decision j sees the losses of steps <= j-D-1 and the probe taken at the latest multiple of
``probe_every`` that is at least ``probe_lag`` steps old), so this is a small, fixed set::

    step            N: the student has finished steps 0..N-1
    policy_name     the policy that wrote it (a resume with another policy is refused)
    sampler         CurriculumSampler state before step N was drawn
    policy          the policy's state_dict() before step N was decided
    current         the decision in force for step N-1 (null at step 0)
    stage_start     first step of the current stage;  stage_ranges: {stage: [first, last]}
    log_from        first step of the open metrics window
    results_from    first step of ``results``: StepResults of steps results_from..N-1 (the loss
                    history later observations and the open metrics window use)
    probes          {probe step: [ProbeResult, ...]} every probe a decision >= N can still see
    pending_probes  probes taken at step N: recomputed from the restored student on resume
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict
from typing import Any

import ray

from clpd_ray.messages import Decision, ProbeResult, StepResult

__all__ = [
    "STATE_VERSION",
    "StateLostError",
    "decision_from_json",
    "decision_to_json",
    "describe_failure",
    "is_recoverable",
    "probes_from_json",
    "probes_to_json",
    "result_from_json",
    "result_to_json",
    "wait_alive",
    "wait_for_restarts",
]

STATE_VERSION = 1


class StateLostError(RuntimeError):
    """Raised by a restarted stateful actor called before its state was put back: a call that
    reached the new instance instead of failing with the old one (Ray queues calls made while
    an actor restarts and sends them to the new instance)."""


# A lost actor (dead, restarting, or on a lost node), a lost object, or a restarted actor that
# lost its state: replay from a checkpoint.
_RECOVERABLE = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, StateLostError)


def is_recoverable(err: BaseException) -> bool:
    """True for a process or node failure; False for an error in user or package code.

    An actor whose ``__init__`` raised fails the same way on every restart: not recoverable.
    """
    return isinstance(err, _RECOVERABLE) and not getattr(err, "actor_init_failed", False)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def describe_failure(err: BaseException) -> str:
    """One line naming the failure, for logs and messages."""
    text = _ANSI.sub("", str(err)).strip()
    first = text.splitlines()[0][:200] if text else ""
    return f"{type(err).__name__}: {first}"


def wait_alive(handle: Any, method: str, what: str, timeout_s: float = 300.0) -> None:
    """Block until actor ``handle`` answers ``method`` (Ray restarts it in the meantime).

    Raises ``RuntimeError`` if the actor is dead for good (restarts used up, or it cannot be
    placed again) or does not come back within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            ray.get(getattr(handle, method).remote(), timeout=max(1.0, left))
            return
        except ray.exceptions.ActorUnavailableError:
            if left <= 0:
                break
            time.sleep(0.5)
        except ray.exceptions.ActorDiedError as err:
            raise RuntimeError(
                f"the {what} actor is dead for good ({describe_failure(err)}): its restarts are "
                "used up or it cannot be placed again; fix the cause, then continue the run with "
                "`clpd run --resume <run dir>`"
            ) from err
        except ray.exceptions.GetTimeoutError:
            break
    raise RuntimeError(
        f"the {what} actor did not come back within {timeout_s:.0f} s; check `ray status` for "
        "free resources, then continue the run with `clpd run --resume <run dir>`"
    )


def wait_for_restarts(launcher: Any) -> None:
    """Wait until the student and the scheduler answer again (Ray restarts them after a failure).

    A teacher that is dead for good is forgotten, so the launcher starts a new one on its next
    use; a restarting one is waited for.
    """
    actors = launcher.actors
    wait_alive(actors.student, "pid", "student")
    wait_alive(actors.scheduler, "pid", "scheduler")
    for i, h in enumerate(actors.teachers):
        if h is None:
            continue
        try:
            wait_alive(h, "ping", f"teacher-{launcher.names[i]}")
        except RuntimeError:
            launcher.forget_teacher(i)


# ---------------------------------------------------------------------- JSON forms of messages


def decision_to_json(d: Decision | None) -> dict[str, Any] | None:
    if d is None:
        return None
    out = asdict(d)
    out["teacher_mix"] = list(d.teacher_mix) if d.teacher_mix is not None else None
    return out


def decision_from_json(d: dict[str, Any] | None) -> Decision | None:
    if d is None:
        return None
    mix = d.get("teacher_mix")
    return Decision(
        stage=int(d["stage"]),
        teacher=int(d["teacher"]),
        reason=str(d["reason"]),
        replay=d.get("replay"),
        teacher_mix=tuple(float(w) for w in mix) if mix is not None else None,
    )


def result_to_json(r: StepResult) -> dict[str, Any]:
    return asdict(r)


def result_from_json(r: dict[str, Any]) -> StepResult:
    return StepResult(**r)


def probes_to_json(probes: tuple[ProbeResult, ...]) -> list[dict[str, Any]]:
    return [{**asdict(p), "kl_to_teacher": list(p.kl_to_teacher)} for p in probes]


def probes_from_json(rows: list[dict[str, Any]]) -> tuple[ProbeResult, ...]:
    return tuple(
        ProbeResult(
            stage=int(r["stage"]),
            loss=float(r["loss"]),
            accuracy=float(r["accuracy"]),
            kl_to_teacher=tuple(float(v) for v in r["kl_to_teacher"]),
        )
        for r in rows
    )
