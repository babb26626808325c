"""``adaptive``: CLPD with the stage and teacher switches driven by the student's probes.

Stage advance (checked before every step, first match wins)::

    last stage ............................ stay (never beyond the last stage)
    steps_in_stage >= max_steps_per_stage . advance
    steps_in_stage <  min_steps_per_stage . stay (never before the minimum)
    remaining steps <= remaining stages x min_steps_per_stage
        .................................. advance (so every stage is visited by the end)
    no probe of this stage yet ............ follow clpd's equal-budget clock
    advance_on signal ..................... advance
        plateau: the stage's probe loss improved on its best by < epsilon (relative) for
                 `patience` consecutive probes (a rise counts as flat)   [plateau trigger]
        mastery: probe accuracy >= rho x the current teacher's accuracy on this stage's probe
                 set (obs.teacher_accuracy)                             [mastery gate]

Teacher choice (a monotone climb, never down): stage k starts with teacher
``base(k) = k * num_teachers // num_stages`` (= k on a matched ladder, as in CLPD) or the current
teacher if that is stronger. Within a stage the student moves one rung up once its KL to the
current teacher on this stage's probe set, ``probes[stage].kl_to_teacher[teacher]``, has
flattened (improved by < kl_epsilon for `patience` probes): it has absorbed what that teacher
shows on this data (KL-transition trigger, after Panigrahi et al. 2025). It climbs at most
``climb`` rungs above ``base(k)``, because a large teacher-student gap hurts (Mirzadeh et al.
2020; Li et al. 2025). A climb restarts the stage's plateau count, to give the new teacher a
chance. With ``mix_next > 0`` a share of the next allowed teacher's targets is mixed in before the
switch (``Decision.teacher_mix``; Li et al. found ~20% strong-teacher data best for a 3B student).
Without KL values in the probes the teacher follows ``base(k)`` only.

``replay`` (share of each batch from earlier stages) is 0 in stage 0 and ``replay`` after.
A probe is counted once, identified by ``obs.probe_step`` and its losses; one taken before the
current stage began is ignored, except that at a switch the latest probe of the new stage seeds
its baseline. Stage advance is checked before the teacher climb; one switch per decision.
Call ``bind`` before ``load_state_dict``.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

from clpd_ray.errors import PolicyError
from clpd_ray.messages import Decision, Observation, ProbeResult
from clpd_ray.policies._clock import StageClock
from clpd_ray.policies._plateau import Plateau
from clpd_ray.policies.base import SchedulerPolicy

__all__ = ["AdaptivePolicy", "AdvanceOn"]

AdvanceOn = Literal["plateau", "mastery", "either", "both"]
_STATE_KEYS = frozenset(
    {
        "stage",
        "stage_start",
        "teacher",
        "loss",
        "kl",
        "accuracy",
        "kl_values",
        "last_probe_key",
    }
)


class AdaptivePolicy(SchedulerPolicy):
    """Advance stages on plateau / mastery of the stage's probe set; climb teachers on KL plateau.

    Args:
        advance_on: which probe signal ends a stage: "plateau", "mastery", "either" or "both".
        epsilon: relative probe-loss improvement below which a probe counts as flat.
        patience: consecutive flat probes that make a plateau (loss and KL alike).
        rho: mastery threshold as a fraction of the current teacher's probe accuracy.
        min_steps_per_stage: default half the equal budget (total_steps / num_stages).
        max_steps_per_stage: default twice the equal budget; the last stage has no maximum.
        replay: share of each batch drawn from earlier stages, from stage 1 on.
        climb: how many rungs above ``base(stage)`` the teacher may climb (0 = fixed ladder).
        kl_epsilon: relative KL improvement below which a probe counts as flat.
        mix_next: share of the next allowed teacher mixed into the targets (0 = off).
    """

    name = "adaptive"
    curriculum = "difficulty"

    def __init__(
        self,
        *,
        advance_on: AdvanceOn = "either",
        epsilon: float = 0.01,
        patience: int = 2,
        rho: float = 0.9,
        min_steps_per_stage: int | None = None,
        max_steps_per_stage: int | None = None,
        replay: float = 0.2,
        climb: int = 1,
        kl_epsilon: float = 0.01,
        mix_next: float = 0.0,
    ) -> None:
        if advance_on not in get_args(AdvanceOn):
            raise PolicyError(
                f"policy 'adaptive': advance_on={advance_on!r} is not one of "
                f"{list(get_args(AdvanceOn))}"
            )
        self.advance_on = advance_on
        self.epsilon = _real("epsilon", epsilon, 0.0, 1.0, "in (0, 1)", low_open=True)
        self.patience = _integer("patience", patience, 1)
        self.rho = _real("rho", rho, 0.0, 2.0, "in (0, 2]", low_open=True, high_open=False)
        self._min_arg = (
            None
            if min_steps_per_stage is None
            else _integer("min_steps_per_stage", min_steps_per_stage, 1)
        )
        self._max_arg = (
            None
            if max_steps_per_stage is None
            else _integer("max_steps_per_stage", max_steps_per_stage, 1)
        )
        if (
            self._min_arg is not None
            and self._max_arg is not None
            and self._max_arg < self._min_arg
        ):
            raise PolicyError(
                f"policy 'adaptive': max_steps_per_stage={self._max_arg} is below "
                f"min_steps_per_stage={self._min_arg}; allowed: max >= min"
            )
        self.replay = _real("replay", replay, 0.0, 1.0, "in [0, 1)")
        self.climb = _integer("climb", climb, 0)
        self.kl_epsilon = _real("kl_epsilon", kl_epsilon, 0.0, 1.0, "in (0, 1)", low_open=True)
        self.mix_next = _real("mix_next", mix_next, 0.0, 1.0, "in [0, 1)")
        self._reset()

    # -- geometry ---------------------------------------------------------------------------

    def bind(self, *, num_stages: int, num_teachers: int, total_steps: int) -> None:
        super().bind(num_stages=num_stages, num_teachers=num_teachers, total_steps=total_steps)
        budget = total_steps / num_stages
        self.min_steps = self._min_arg if self._min_arg is not None else max(1, int(budget // 2))
        self.max_steps = (
            self._max_arg
            if self._max_arg is not None
            else max(self.min_steps, math.ceil(2 * budget))
        )
        if num_stages * self.min_steps > total_steps:
            raise PolicyError(
                f"policy 'adaptive': min_steps_per_stage={self.min_steps} x num_stages="
                f"{num_stages} needs {num_stages * self.min_steps} steps but total_steps="
                f"{total_steps}; lower min_steps_per_stage to <= {total_steps // num_stages} "
                f"or raise train.total_steps"
            )
        if self.max_steps < self.min_steps:
            raise PolicyError(
                f"policy 'adaptive': max_steps_per_stage={self.max_steps} is below the minimum "
                f"of {self.min_steps} steps per stage; raise max_steps_per_stage or set "
                f"min_steps_per_stage"
            )
        self._clock = StageClock.build(self.name, num_stages=num_stages, total_steps=total_steps)

    def _base(self, stage: int) -> int:
        """The weakest teacher for ``stage``: the ladder spread evenly over the stages."""
        return stage * self.num_teachers // self.num_stages

    def _top(self, stage: int) -> int:
        """The strongest teacher ``stage`` may climb to."""
        return min(self.num_teachers - 1, self._base(stage) + self.climb)

    # -- state ------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._stage: int | None = None  # None until the first decide()
        self._stage_start = 0
        self._teacher = 0
        self._loss = Plateau()  # current stage's probe loss
        self._kl = Plateau()  # KL to the current teacher on the current stage's probe set
        self._accuracy: float | None = None  # latest probe accuracy on the current stage
        self._kl_values: list[float] = []  # latest KL to each teacher on the current stage
        self._last_probe_key: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self._stage,
            "stage_start": self._stage_start,
            "teacher": self._teacher,
            "loss": self._loss.to_dict(),
            "kl": self._kl.to_dict(),
            "accuracy": self._accuracy,
            "kl_values": list(self._kl_values),
            "last_probe_key": self._last_probe_key,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or set(state) != _STATE_KEYS:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise PolicyError(
                f"policy 'adaptive': state {keys} does not match the expected keys "
                f"{sorted(_STATE_KEYS)}; the checkpoint was written by another policy or version"
            )
        self._stage = state["stage"]
        self._stage_start = int(state["stage_start"])
        self._teacher = int(state["teacher"])
        self._loss = Plateau.from_dict(state["loss"])
        self._kl = Plateau.from_dict(state["kl"])
        self._accuracy = state["accuracy"]
        self._kl_values = [float(v) for v in state["kl_values"]]
        self._last_probe_key = state["last_probe_key"]

    # -- deciding ---------------------------------------------------------------------------

    def decide(self, obs: Observation) -> Decision:
        self._require_bound(obs)
        if self._stage is None:
            self._start(obs)
        stage = self._stage
        assert stage is not None
        self._fold_probe(obs)
        steps_in = obs.step - self._stage_start
        why = self._advance_reason(obs, stage, steps_in)
        if why:
            self._enter_stage(obs, stage + 1)
            reason = f"{why}; now stage {self._stage}, teacher {self._teacher}"
        else:
            why = self._maybe_climb(stage)
            reason = (
                f"{why}; {self._status(obs, stage, steps_in)}"
                if why
                else self._status(obs, stage, steps_in)
            )
        return self._decision(reason)

    def _start(self, obs: Observation) -> None:
        """Take over the run's position: a fresh run, or a resume without saved state."""
        stage = min(max(obs.stage, 0), self.num_stages - 1)
        self._stage = stage
        self._stage_start = max(0, obs.step - max(obs.steps_in_stage, 0))
        if obs.step == 0:
            self._teacher = self._base(stage)
        else:
            self._teacher = min(max(obs.teacher, self._base(stage)), self._top(stage))

    def _fold_probe(self, obs: Observation) -> None:
        """Count a new probe of the current stage into the loss and KL trackers, once."""
        if not obs.probes:
            return
        # A string, so that it survives JSON and compares equal even with NaN losses.
        key = f"{obs.probe_step}|" + ",".join(repr(float(p.loss)) for p in obs.probes)
        if key == self._last_probe_key:
            return
        self._last_probe_key = key
        if obs.probe_step is not None and obs.probe_step < self._stage_start:
            return  # measured before this stage began
        probe = _probe_of(obs, self._stage)
        if probe is None:
            return
        self._loss = self._loss.update(probe.loss, self.epsilon)
        self._accuracy = float(probe.accuracy)
        self._kl_values = [float(v) for v in probe.kl_to_teacher]
        if self._teacher < len(self._kl_values):
            self._kl = self._kl.update(self._kl_values[self._teacher], self.kl_epsilon)

    def _advance_reason(self, obs: Observation, stage: int, steps_in: int) -> str:
        """Why the stage ends now, or '' to stay."""
        if stage >= self.num_stages - 1:
            return ""
        if steps_in >= self.max_steps:
            return f"stage {stage} reached its maximum of {self.max_steps} steps"
        if steps_in < self.min_steps:
            return ""
        left, stages_left = self.total_steps - obs.step, self.num_stages - 1 - stage
        if left <= stages_left * self.min_steps:
            return (
                f"{left} steps left, just enough for the minimum of {self.min_steps} steps in "
                f"each of the {stages_left} remaining stages (after {steps_in} steps in stage "
                f"{stage})"
            )
        if self._loss.count == 0:
            if self._clock.stage_at(obs.step) > stage:
                return f"no probe of stage {stage} yet: {self._clock.describe(obs.step)}"
            return ""
        plateau, mastery = self._plateau_text(), self._mastery_text(obs, stage)
        used = [mastery] if self.advance_on == "mastery" else [plateau]
        if self.advance_on in ("either", "both"):
            used = [plateau, mastery]
        met = [t for t in used if t]
        if not met or (self.advance_on == "both" and len(met) < 2):
            return ""
        return f"{' and '.join(met)} after {steps_in} steps in stage {stage}"

    def _plateau_text(self) -> str:
        if self._loss.streak < self.patience:
            return ""
        return (
            f"probe loss plateaued: {self._loss.streak_from:.3g} -> {self._loss.last:.3g} "
            f"(<{self.epsilon * 100:g}% for {self._loss.streak} probes)"
        )

    def _mastery_text(self, obs: Observation, stage: int) -> str:
        target = _teacher_accuracy(obs, self._teacher, stage)
        if target is None or target <= 0 or self._accuracy is None:
            return ""
        if self._accuracy < self.rho * target:
            return ""
        return (
            f"mastery: probe accuracy {self._accuracy:.3g} >= {self.rho:g} x teacher "
            f"{self._teacher}'s {target:.3g}"
        )

    def _enter_stage(self, obs: Observation, stage: int) -> None:
        """Start ``stage`` at ``obs.step``, seeded with the latest probe of it as a baseline."""
        self._stage = stage
        self._stage_start = obs.step
        self._teacher = min(max(self._teacher, self._base(stage)), self._top(stage))
        self._loss, self._kl, self._accuracy, self._kl_values = Plateau(), Plateau(), None, []
        probe = _probe_of(obs, stage)
        if probe is not None:
            self._loss = self._loss.update(probe.loss, self.epsilon)
            self._accuracy = float(probe.accuracy)
            self._kl_values = [float(v) for v in probe.kl_to_teacher]
            self._seed_kl()

    def _seed_kl(self) -> None:
        self._kl = Plateau()
        if self._teacher < len(self._kl_values):
            self._kl = self._kl.update(self._kl_values[self._teacher], self.kl_epsilon)

    def _maybe_climb(self, stage: int) -> str:
        """Move one rung up if the KL to the current teacher flattened; '' if not."""
        if self._teacher >= self._top(stage) or self._kl.streak < self.patience:
            return ""
        why = (
            f"KL to teacher {self._teacher} on stage {stage} flattened: "
            f"{self._kl.streak_from:.3g} -> {self._kl.last:.3g} "
            f"(<{self.kl_epsilon * 100:g}% for {self._kl.streak} probes); moving up to teacher "
            f"{self._teacher + 1}"
        )
        self._teacher += 1
        self._seed_kl()
        self._loss = self._loss.restart_streak()
        return why

    def _status(self, obs: Observation, stage: int, steps_in: int) -> str:
        """Why nothing changes: where the stage stands against its rules."""
        head = f"stage {stage}, teacher {self._teacher}: {steps_in} steps in"
        if stage >= self.num_stages - 1:
            return f"{head}, last stage (stays until the end)"
        limits = f"min {self.min_steps}, max {self.max_steps}"
        if steps_in < self.min_steps:
            return f"{head}, below the minimum ({limits})"
        if self._loss.count == 0:
            clock = self._clock.describe(obs.step)
            return f"{head} ({limits}), no probe yet so following the clock: {clock}"
        flat = self._loss.streak
        text = f"{head} ({limits}); probe loss {self._loss.last:.3g}, " + (
            f"plateaued ({flat} flat probes)"
            if flat >= self.patience
            else f"{flat}/{self.patience} flat probes"
        )
        if self.advance_on != "plateau":
            target = _teacher_accuracy(obs, self._teacher, stage)
            if target is not None and self._accuracy is not None:
                text += f", accuracy {self._accuracy:.3g} (mastery at {self.rho * target:.3g})"
            else:
                text += ", no teacher accuracy for the mastery gate"
        return text

    def _decision(self, reason: str) -> Decision:
        stage, teacher = self._stage, self._teacher
        assert stage is not None
        mix = None
        if self.mix_next > 0 and teacher < self._top(stage):
            weights = [0.0] * self.num_teachers
            weights[teacher], weights[teacher + 1] = 1.0 - self.mix_next, self.mix_next
            mix = tuple(weights)
            reason += f"; mixing {self.mix_next:g} of teacher {teacher + 1}"
        return Decision(
            stage=stage,
            teacher=teacher,
            reason=reason,
            replay=0.0 if stage == 0 else self.replay,
            teacher_mix=mix,
        )


def _probe_of(obs: Observation, stage: int | None) -> ProbeResult | None:
    return next((p for p in obs.probes if p.stage == stage), None)


def _teacher_accuracy(obs: Observation, teacher: int, stage: int) -> float | None:
    rows = obs.teacher_accuracy
    if teacher < len(rows) and stage < len(rows[teacher]):
        return float(rows[teacher][stage])
    return None


def _real(
    key: str,
    value: object,
    low: float,
    high: float,
    allowed: str,
    *,
    low_open: bool = False,
    high_open: bool = True,
) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        raise PolicyError(f"policy 'adaptive': {key}={value!r} must be a number {allowed}")
    return float(value)  # type: ignore[arg-type]


def _integer(key: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PolicyError(f"policy 'adaptive': {key}={value!r} must be an integer >= {low}")
    return value
