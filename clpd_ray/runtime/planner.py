"""The planner: everything about a run that step numbers decide, with no Ray and no I/O.

The executor (:mod:`clpd_ray.runtime.executor`) moves data between actors; the planner says what
each step is. For step j, with prefetch depth D (``train.prefetch``) and probe interval P::

    needs(j)         results of steps <= j-D-1 and the probe at the latest multiple of P that is
                     at least ``probe_lag`` steps old: what obs(j) may see, fixed by step numbers
    observation(j)   ──▶ policy.decide (in the scheduler actor) ──▶ plan(j, decision, state)
    plan(j)          decision row if something changed, teachers to release, the batch (sampler),
                     the teachers to ask, probe / checkpoint / eval after this step
    ends_call(plan)  whether step j ends the student's next call (the executor sends up to
                     D // 2 planned steps in one call; a probe, evaluation or checkpoint after
                     j, or the last step, ends one early)
    record(result)   ──▶ metrics rows, one per window of ``train.log_every`` steps, each with the
                     stage and teacher of the steps it aggregates
    state_dict(N)    what a checkpoint after N steps needs to plan step N again exactly as the
                     first time; load_state_dict puts a fresh planner there

Because an observation reads only what step numbers allow, the order and timing in which
results arrive never change a decision: a run with the same seeds makes the same decisions, and
a run replayed from a checkpoint continues exactly as it would have.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clpd_ray.config import Config
from clpd_ray.curriculum.sampler import CurriculumSampler, _Stream, split_stages
from clpd_ray.data.batching import encode_examples
from clpd_ray.data.example import Example
from clpd_ray.errors import RunDirError
from clpd_ray.messages import Batch, Decision, Observation, ProbeResult, StepResult
from clpd_ray.runtime.recovery import (
    STATE_VERSION,
    decision_from_json,
    decision_to_json,
    probes_from_json,
    probes_to_json,
    result_from_json,
    result_to_json,
)
from clpd_ray.workload import Workload, stage_of

__all__ = ["Planner", "StepPlan", "probe_sets"]


@dataclass(frozen=True)
class StepPlan:
    """What the executor does for one step."""

    step: int
    decision: Decision
    batch: Batch
    teachers: tuple[int, ...]  # rungs asked for targets (several for a mixture) or generation
    weights: tuple[float, ...] | None  # mixture weights, aligned with ``teachers``
    decision_row: dict[str, Any] | None  # for decisions.jsonl when the decision changed
    release: tuple[int, ...] = ()  # teachers the schedule has moved past (resident: needed)
    probe_after: bool = False  # probe the student's weights after this step
    checkpoint_after: bool = False
    eval_after: bool = False  # held-out evaluation after this step (train.eval_every)


@dataclass
class _Snapshot:
    """The planner's state before a step is planned (the checkpoint of that step uses it)."""

    sampler: dict[str, Any]
    current: dict[str, Any] | None
    stage_start: int
    stage_ranges: dict[str, list[int]]
    policy: dict[str, Any] = field(default_factory=dict)


class Planner:
    """Step arithmetic, observation history, decisions in force and metrics windows of one run."""

    def __init__(
        self,
        config: Config,
        workload: Workload,
        *,
        policy_name: str,
        curriculum: str,
        reads_probes: bool,
    ) -> None:
        self.c = config
        self.w = workload
        self.policy_name = policy_name
        self.mode = curriculum
        self.reads_probes = reads_probes
        self.names = [t.name for t in config.teachers.ladder]
        self.total = config.train.total_steps
        self.D = config.train.prefetch
        self.log_every = config.train.log_every
        self.probe_every = config.scheduler.probe_every
        self.probe_lag = max(self.D + 1, self.probe_every // 2)
        # Steps the student runs per call (ends_call): a call's results all come back at its
        # end, and step j's plan needs the results of steps <= j-D-1; with D // 2 steps per call
        # the driver can plan a call's last step while the student still has two steps or more
        # queued, so the student never waits for the driver.
        self.steps_per_call = max(1, self.D // 2)
        self.keep_losses = max(50, self.log_every)  # observations read the last 50 and log_every
        self.stages = split_stages(
            workload.scores,
            config.curriculum.num_stages,
            boundaries=config.curriculum.boundaries,
            mode="random" if curriculum == "random" else "difficulty",
            seed=config.seed,
        )
        self.sampler = CurriculumSampler(self.stages, config.train.batch_size, seed=config.seed)
        self.teacher_accuracy: tuple[tuple[float, ...], ...] = ()
        self.reset()

    def reset(self) -> None:
        """The state before step 0 (the sampler is reseeded too)."""
        self.sampler = CurriculumSampler(self.stages, self.c.train.batch_size, seed=self.c.seed)
        self.current: Decision | None = None
        self.stage_start = 0
        self.stage_ranges: dict[int, list[int]] = {}
        self.results: dict[int, StepResult] = {}
        self.probes: dict[int, tuple[ProbeResult, ...]] = {}
        self.decisions: dict[int, Decision] = {}  # decision of each planned step, until logged
        self.log_from = 0
        self._t_log: float | None = None
        self._before: dict[int, _Snapshot] = {}

    # ------------------------------------------------------------------ what a step needs
    def probe_step_visible(self, j: int) -> int | None:
        """The latest probe decision j may see: taken at least ``probe_lag`` steps before j."""
        if not self.reads_probes:
            return None
        p = (j - self.probe_lag) // self.probe_every * self.probe_every
        return p if p >= self.probe_every else None

    def needs(self, j: int) -> tuple[int, int | None]:
        """(last step whose result obs(j) reads, probe step it reads or None)."""
        return j - self.D - 1, self.probe_step_visible(j)

    def missing(self, j: int) -> tuple[list[int], int | None]:
        """Step results and the probe that must be recorded before :meth:`observation` (j)."""
        last, p = self.needs(j)
        lo = max(0, last + 1 - self.keep_losses)
        steps = [i for i in range(lo, last + 1) if i not in self.results]
        return steps, (p if p is not None and p not in self.probes else None)

    def observation(self, j: int) -> Observation:
        last, p = self.needs(j)
        steps, probe = self.missing(j)
        if steps or probe is not None:
            raise RuntimeError(f"observation({j}) needs steps {steps} and probe {probe} recorded")
        history = [self.results[i].loss for i in range(max(0, last + 1 - 50), last + 1)]
        recent = [self.results[i].loss for i in range(max(0, last + 1 - self.log_every), last + 1)]
        cur = self.current
        return Observation(
            step=j,
            total_steps=self.total,
            stage=cur.stage if cur else 0,
            num_stages=len(self.stages),
            teacher=cur.teacher if cur else 0,
            num_teachers=len(self.names),
            steps_in_stage=j - self.stage_start,
            recent_loss=float(np.mean(recent)) if recent else None,
            loss_history=tuple(history),
            probe_step=p,
            probes=self.probes[p] if p is not None else (),
            teacher_accuracy=self.teacher_accuracy,
        )

    # ------------------------------------------------------------------ planning
    def _snapshot(self) -> _Snapshot:
        return _Snapshot(
            sampler=self.sampler.state_dict(),
            current=decision_to_json(self.current),
            stage_start=self.stage_start,
            stage_ranges={str(k): list(v) for k, v in self.stage_ranges.items()},
        )

    def plan(self, j: int, decision: Decision, policy_state: dict[str, Any]) -> StepPlan:
        """Apply ``decision`` (taken on :meth:`observation` (j); ``policy_state``: the policy's
        state before it) and draw step j's batch."""
        before = self._snapshot()
        before.policy = copy.deepcopy(policy_state)
        self._before[j] = before
        prev = self.current
        if prev is None or decision.stage != prev.stage:
            self.stage_start = j
        self.stage_ranges.setdefault(decision.stage, [j, j])[1] = j
        self.current = decision
        self.decisions[j] = decision
        changed = prev is None or _key(decision) != _key(prev)
        row = None
        release: tuple[int, ...] = ()
        if changed:
            row = {
                "step": j,
                "stage": decision.stage,
                "teacher": self.names[decision.teacher],
                "teacher_index": decision.teacher,
                "policy": self.policy_name,
                "reason": decision.reason,
                "replay": decision.replay,
                "teacher_mix": list(decision.teacher_mix) if decision.teacher_mix else None,
            }
            if self.c.teachers.resident == "needed":
                release = tuple(range(min(_in_use(decision))))
        replay = decision.replay if decision.replay is not None else self.c.curriculum.replay
        stage = None if self.mode == "none" else decision.stage
        idx = self.sampler.next_batch(stage, replay=replay if stage else 0.0)
        batch = self._batch(j, decision.stage, idx)
        teachers: tuple[int, ...] = (decision.teacher,)
        weights: tuple[float, ...] | None = None
        if decision.teacher_mix and self.c.distill.objective != "sequence":
            use = [(i, w) for i, w in enumerate(decision.teacher_mix) if w > 0]
            teachers, weights = tuple(i for i, _ in use), tuple(w for _, w in use)
        done = j + 1
        every = self.c.train.checkpoint_every
        eval_every = self.c.train.eval_every
        return StepPlan(
            step=j,
            decision=decision,
            batch=batch,
            teachers=teachers,
            weights=weights,
            decision_row=row,
            release=release,
            probe_after=self._probes_after(j),
            checkpoint_after=bool(every) and done % every == 0 and done < self.total,
            eval_after=bool(eval_every) and done % eval_every == 0 and done < self.total,
        )

    def ends_call(self, plan: StepPlan, held: int) -> bool:
        """Whether ``plan``'s step, the ``held``-th planned step not yet sent to the student,
        ends the student's next call: at ``steps_per_call`` steps, where a probe, evaluation or
        checkpoint must see the weights right after the step, and at the last step."""
        return (
            held >= self.steps_per_call
            or plan.probe_after
            or plan.eval_after
            or plan.checkpoint_after
            or plan.step + 1 >= self.total
        )

    def _probes_after(self, j: int) -> bool:
        """Whether the student is probed after step j (every probe_every steps, not at the end)."""
        done = j + 1
        return self.reads_probes and done > 0 and done % self.probe_every == 0 and done < self.total

    # ------------------------------------------------------------------ work ahead
    def ahead_streams(self, teacher: int) -> list[tuple[str, int]]:
        """(sampler stream, stage) of the examples teacher ``teacher`` will see when its turn
        comes, most certain first: its own stage's stream (teacher k teaches stage k on a
        ladder; the last stage for rungs past it), then that stage's replay stream when batches
        may replay earlier stages (``curriculum.replay`` > 0, or a policy that decides online and
        may ask for replay); without a curriculum, the stream over all examples."""
        if self.mode == "none":
            return [("all", 0)]
        stage = min(teacher, len(self.stages) - 1)
        streams = [(f"stage/{stage}", stage)]
        if stage > 0 and (self.c.curriculum.replay > 0 or self.reads_probes):
            streams.append((f"replay/{stage}", stage))
        return streams

    def upcoming(self, stream: str, offset: int, count: int) -> np.ndarray:
        """Example indices ``offset .. offset+count-1`` of ``stream`` counted from its current
        position, in the order the sampler will serve them; the sampler does not move. Empty
        past one epoch's worth (one pass covers every example of the pool)."""
        streams = self.sampler._streams
        known = stream in streams
        live = self.sampler._stream(stream)
        if not known:  # a stream not drawn from yet stays out of the sampler's state
            del streams[stream]
        count = min(count, live.pool.size - offset)
        if count <= 0:
            return np.zeros(0, dtype=np.int64)
        ahead = _Stream(live.pool, live.key)
        ahead.seek(live.epoch, live.position)
        if offset:
            ahead.take(offset)
        return ahead.take(count)

    def examples_batch(self, idx: np.ndarray, stage: int) -> Batch:
        """A batch of the given training examples (step -1: not a training step)."""
        return self._batch(-1, stage, idx)

    def _batch(self, j: int, stage: int, idx: np.ndarray) -> Batch:
        examples = [self.w.train[i] for i in idx]
        enc = encode_examples(self.w.tokenizer, examples, fmt=self.w.prompt_format)
        sequence = self.c.distill.objective == "sequence"
        return Batch(
            step=j,
            stage=stage,
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            loss_mask=enc.loss_mask,
            example_ids=np.asarray(idx),
            prompts=tuple(e.prompt for e in examples) if sequence else (),
            targets=tuple(e.target for e in examples) if sequence else (),
            answers=tuple(e.answer for e in examples) if sequence else (),
        )

    # ------------------------------------------------------------------ results and metrics
    def start_clock(self, now: float) -> None:
        """The time the open metrics window started (training start, or after a restore)."""
        self._t_log = now

    def record(self, result: StepResult, now: float) -> list[dict[str, Any]]:
        """Count one step's result; returns the metrics rows of the windows it completes."""
        self.results[result.step] = result
        rows: list[dict[str, Any]] = []
        while True:
            hi = min(self.total, (self.log_from // self.log_every + 1) * self.log_every)
            if hi <= self.log_from or any(i not in self.results for i in range(self.log_from, hi)):
                return rows
            rows.append(self._row(self.log_from, hi, now))
            for i in range(self.log_from, hi):
                self.decisions.pop(i, None)
            self.log_from = hi
            self._t_log = now

    def _row(self, lo: int, hi: int, now: float) -> dict[str, Any]:
        rows = [self.results[i] for i in range(lo, hi)]
        last = self.decisions.get(hi - 1)
        stage = last.stage if last else (self.current.stage if self.current else 0)
        teacher = last.teacher if last else (self.current.teacher if self.current else 0)
        wall = now - self._t_log if self._t_log is not None else 0.0
        tokens = sum(r.tokens for r in rows)
        return {
            "step": hi,
            "stage": stage,
            "teacher": self.names[teacher],
            "loss": float(np.mean([r.loss for r in rows])),
            "kd_loss": float(np.mean([r.kd_loss for r in rows])),
            "ce_loss": float(np.mean([r.ce_loss for r in rows])),
            "lr": rows[-1].lr,
            "tokens_per_s": tokens / max(wall, 1e-9),
            "student_busy_s": float(sum(r.busy_s for r in rows)),
        }

    def record_probe(self, step: int, probes: tuple[ProbeResult, ...]) -> None:
        self.probes[step] = probes

    def probes_for_checkpoint(self, n: int) -> list[int]:
        """Probe steps a decision >= n can still see (all < n, so they are taken already)."""
        if not self.reads_probes:
            return []
        seen = self.probe_step_visible(n) or 0
        return [p for p in range(self.probe_every, n, self.probe_every) if p >= seen]

    def stage_summary(self) -> dict[str, list[int]]:
        return {str(k): v for k, v in sorted(self.stage_ranges.items())}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, n: int, policy_state: dict[str, Any] | None = None) -> dict[str, Any]:
        """The checkpoint state after ``n`` steps: enough to plan step n again exactly.

        Step results of steps < n and the probes of :meth:`probes_for_checkpoint` must be
        recorded. ``policy_state``: the policy's current state, needed only when step n has
        not been planned yet (prefetch 1, or a run that has not started).
        """
        before = self._before.get(n)
        if before is None:
            if policy_state is None:
                raise ValueError(f"step {n} is not planned yet: pass the current policy_state")
            before = self._snapshot()
            before.policy = copy.deepcopy(policy_state)
        lo = max(0, min(self.log_from, n - self.D - self.keep_losses))
        return {
            "version": STATE_VERSION,
            "step": n,
            "policy_name": self.policy_name,
            "sampler": before.sampler,
            "current": before.current,
            "stage_start": before.stage_start,
            "stage_ranges": before.stage_ranges,
            "policy": before.policy,
            "log_from": self.log_from,
            "results_from": lo,
            "results": [result_to_json(self.results[i]) for i in range(lo, n)],
            "probes": {
                str(p): probes_to_json(self.probes[p]) for p in self.probes_for_checkpoint(n)
            },
            "pending_probes": [n] if self._probes_after(n - 1) else [],
        }

    def is_planned(self, n: int) -> bool:
        """Whether step n is planned (its checkpoint needs no policy state from outside)."""
        return n in self._before

    def forget_before(self, n: int) -> None:
        """Drop planning snapshots of steps < n (their checkpoints are written or skipped)."""
        for j in [j for j in self._before if j < n]:
            del self._before[j]

    def load_state_dict(self, state: dict[str, Any], where: str = "the checkpoint") -> int:
        """Put the planner where ``state`` (from :meth:`state_dict`) was; returns its step.

        The policy state (``state["policy"]``) is the scheduler's to load; pending probes are
        the executor's to take again.
        """
        if state.get("version") != STATE_VERSION:
            raise RunDirError(
                f"{where} has format version {state.get('version')!r}; this clpd reads version "
                f"{STATE_VERSION}: resume it with the clpd version that wrote it"
            )
        if state.get("policy_name") != self.policy_name:
            raise RunDirError(
                f"{where} was written by policy {state.get('policy_name')!r}, but this run uses "
                f"{self.policy_name!r}; resume with the policy that wrote it"
            )
        step = int(state["step"])
        self.reset()
        try:
            self.sampler.load_state_dict(state["sampler"])
        except ValueError as err:
            raise RunDirError(f"{where}: {err}") from None
        self.current = decision_from_json(state["current"])
        self.stage_start = int(state["stage_start"])
        self.stage_ranges = {int(k): list(v) for k, v in state["stage_ranges"].items()}
        self.log_from = int(state["log_from"])
        lo = int(state["results_from"])
        results = [result_from_json(r) for r in state["results"]]
        if lo + len(results) != step:
            raise RunDirError(f"{where}: its step results do not reach step {step}")
        self.results = {lo + i: r for i, r in enumerate(results)}
        # Rows of the open window report the decision of their last step: the one in force.
        if self.current is not None:
            for i in range(self.log_from, step):
                self.decisions[i] = self.current
        self.probes = {int(k): probes_from_json(v) for k, v in state["probes"].items()}
        return step


def _key(d: Decision) -> tuple[Any, ...]:
    return (d.stage, d.teacher, d.replay, d.teacher_mix)


def _in_use(d: Decision) -> list[int]:
    return [d.teacher] if not d.teacher_mix else [i for i, w in enumerate(d.teacher_mix) if w > 0]


def probe_sets(planner: Planner, seed: int, size: int) -> list[list[Example]]:
    """One probe set per stage from the held-out probe pool (the pool itself for an empty stage)."""
    w = planner.w
    pool = w.probe_pool
    if planner.mode == "random":
        # Random stages have no difficulty range: probe each with a random share of the pool.
        rng = np.random.default_rng([seed, 11])
        parts = np.array_split(rng.permutation(len(pool)), len(planner.stages))
    else:
        which = stage_of(w.probe_scores, planner.stages, w.scores)
        parts = [np.flatnonzero(which == s) for s in range(len(planner.stages))]
    sets = []
    for idx in parts:
        if len(idx) == 0:
            idx = np.arange(len(pool))
        sets.append([pool[i] for i in idx[:size]])
    return sets
