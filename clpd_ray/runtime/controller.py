"""The controller: drives one CLPD run over the actors. It acts; the policy decides.

Pipeline, with prefetch depth D (``train.prefetch``)::

    plan(j), j = s .. s+D-1            obs(j) ──▶ scheduler.decide ──▶ Decision(stage, teacher)
                                       sampler(stage) ──▶ Batch(j) ──put──▶ teacher.targets(ref)
    train(s)                           student.train_step(Batch(s) ref, targets(s) ref)
                                         (Ray hands the targets straight to the student: no driver hop)
    every probe_every steps            student.weights ──▶ scheduler.probe (off the critical path)
    every checkpoint_every steps       student.checkpoint + controller.json ──▶ checkpoints/step-N

Teachers compute targets D steps ahead while the student trains, and the student always has
the next step queued, so neither waits on the driver. Everything a decision sees is fixed by step
numbers, not timing: decision j sees the losses of steps <= j-D-1 and the probes taken at least
``probe_lag`` steps earlier, so a run with the same seeds makes the same decisions.

Recovery: that determinism is what makes failures cheap. Teachers are stateless and Ray re-runs
their requests on a restarted instance. When the student or the scheduler fails, Ray restarts
it, and the controller rewinds everything to the last checkpoint (or to step 0) and replays::

    failure ──▶ wait for the restarted actor ──▶ student.restore(step-N)
            ──▶ scheduler.load_state_dict + set_probes ──▶ controller state of step N
            ──▶ drop metrics/decisions rows past N ──▶ plan and train from step N again

A resumed run (``clpd run --resume``) starts the same way from its latest checkpoint, so it ends
with the same student, bit for bit on CPU, as a run that never stopped.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from tqdm.auto import tqdm

from clpd_ray.config import Config
from clpd_ray.curriculum.sampler import CurriculumSampler, split_stages
from clpd_ray.data.batching import encode_examples
from clpd_ray.errors import ClpdError, PolicyError, RunDirError
from clpd_ray.messages import Batch, Decision, Observation, ProbeResult, StepResult
from clpd_ray.policies import SchedulerPolicy
from clpd_ray.runtime.actors.launcher import Launcher
from clpd_ray.runtime.recovery import (
    STATE_VERSION,
    decision_from_json,
    decision_to_json,
    describe_failure,
    is_recoverable,
    probes_from_json,
    probes_to_json,
    result_from_json,
    result_to_json,
    wait_for_restarts,
)
from clpd_ray.runtime.rundir import RunDir, write_json_atomic
from clpd_ray.workload import Workload, stage_of

__all__ = ["Controller", "RunStats", "unwrap"]

_log = logging.getLogger(__name__)
_CLPD_ERROR_LINE = re.compile(r"clpd_ray\.errors\.\w+: ")


def unwrap(refs: Any, timeout: float | None = None) -> Any:
    """``ray.get`` that re-raises a package error from an actor as itself (exit 2, no traceback)."""
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.RayTaskError as err:
        cause = err.cause if hasattr(err, "cause") else None
        if isinstance(cause, ClpdError):
            raise cause from None
        raise
    except ray.exceptions.ActorDiedError as err:
        # Ray keeps only the text of an error raised in an actor's __init__: a package error
        # there (a model that cannot be loaded, say) shows as its last traceback line.
        matches = list(_CLPD_ERROR_LINE.finditer(str(err)))
        if err.actor_init_failed and matches:
            raise ClpdError(str(err)[matches[-1].end() :].strip()) from None
        raise


@dataclass
class RunStats:
    wall_s: float = 0.0
    steps: int = 0
    recoveries: int = 0
    evaluation: dict = field(default_factory=dict)  # student.evaluate on the held-out set
    student: dict = field(default_factory=dict)  # student.stats
    busy_s: dict[str, float] = field(default_factory=dict)


@dataclass
class _Planned:
    step: int
    decision: Decision
    batch_ref: Any
    target_refs: list[Any]
    weights: list[float] | None
    before: dict  # controller, sampler and policy state before this step was planned


class Controller:
    _bar: Any  # the progress bar of run()

    def __init__(
        self,
        config: Config,
        workload: Workload,
        run_dir: RunDir,
        launcher: Launcher,
        policy: SchedulerPolicy,
        *,
        progress: bool = True,
        on_step: Callable[[int], None] | None = None,
        resume_from: Path | None = None,
        max_recoveries: int = 10,
    ) -> None:
        """``on_step(done)`` runs on the driver after step ``done`` is submitted (a test hook; it
        runs again for replayed steps). ``resume_from``: a checkpoint directory to continue from."""
        self.c = config
        self.w = workload
        self.run_dir = run_dir
        self.launcher = launcher
        self.policy_name = policy.name
        self.mode = policy.curriculum
        self.progress = progress
        self.on_step = on_step
        self.resume_from = resume_from
        self.max_recoveries = max_recoveries
        self.names = [t.name for t in config.teachers.ladder]
        k = config.curriculum.num_stages
        self.stages = split_stages(
            workload.scores,
            k,
            boundaries=config.curriculum.boundaries,
            mode="random" if self.mode == "random" else "difficulty",
            seed=config.seed,
        )
        self.sampler = CurriculumSampler(self.stages, config.train.batch_size, seed=config.seed)
        self.D = config.train.prefetch
        self.probe_every = config.scheduler.probe_every
        self.probe_lag = max(self.D + 1, self.probe_every // 2)
        # Observations read the last log_every and the last 50 losses.
        self.keep_losses = max(50, config.train.log_every)
        self.losses: list[float] = []
        self.results: dict[int, StepResult] = {}
        self.inflight: deque[tuple[int, Any]] = deque()  # (step, train_step ref), in step order
        self.probe_refs: dict[int, Any] = {}  # probe step -> ref, until resolved
        self.probe_results: dict[int, tuple[ProbeResult, ...]] = {}
        self.stage_start = 0
        self.current: Decision | None = None
        self.stage_ranges: dict[int, list[int]] = {}
        self.log_from = 0
        self.teacher_acc: tuple[tuple[float, ...], ...] = ()
        self.recoveries = 0
        self._probe_args: tuple[Any, ...] = ()
        self._last: tuple[Path | None, dict] | None = None  # latest checkpoint and its state

    # ------------------------------------------------------------------ setup
    def _probe_sets(self) -> list[list]:
        pool = self.w.probe_pool
        if self.mode == "random":
            # Random stages have no difficulty range: probe each with a random share of the pool.
            rng = np.random.default_rng([self.c.seed, 11])
            parts = np.array_split(rng.permutation(len(pool)), len(self.stages))
        else:
            which = stage_of(self.w.probe_scores, self.stages, self.w.scores)
            parts = [np.flatnonzero(which == s) for s in range(len(self.stages))]
        size = self.c.scheduler.probe_size
        sets = []
        for idx in parts:
            if len(idx) == 0:
                idx = np.arange(len(pool))  # a stage with no held-out probe items: use the pool
            sets.append([pool[i] for i in idx[:size]])
        return sets

    def _setup_probes(self) -> None:
        """Teacher targets and accuracy on each stage's probe set (sent to the scheduler later)."""
        sets = self._probe_sets()
        encoded = [encode_examples(self.w.tokenizer, p) for p in sets]
        probe_batches = [
            Batch(
                step=-1 - s,
                stage=s,
                input_ids=e.input_ids,
                attention_mask=e.attention_mask,
                loss_mask=e.loss_mask,
                example_ids=np.arange(len(p)),
            )
            for s, (e, p) in enumerate(zip(encoded, sets, strict=True))
        ]
        target_refs, acc_refs = [], []
        for i in range(len(self.names)):
            t = self.launcher.teacher(i)
            target_refs.append([t.targets.remote(b) for b in probe_batches])
            acc_refs.append([t.evaluate.remote(p, self.w.max_new_tokens) for p in sets])
        targets = [unwrap(r) for r in target_refs]
        self.teacher_acc = tuple(tuple(a["accuracy"] for a in unwrap(r)) for r in acc_refs)
        self._probe_args = (sets, targets, self.w.max_new_tokens)
        if self.c.teachers.resident == "needed":
            for i in range(len(self.names)):
                self.launcher.release_teacher(i)

    # ------------------------------------------------------------------ observation / plan
    def _collect(self, upto: int) -> None:
        """Wait for train results of every step <= upto, in order."""
        while self.inflight and self.inflight[0][0] <= upto:
            step, ref = self.inflight.popleft()
            res: StepResult = unwrap(ref)
            self.results[step] = res
            self.losses.append(res.loss)

    def _visible_probe(self, j: int) -> int | None:
        """The step of the latest probe decision j may see: taken at least probe_lag steps before."""
        p = (j - self.probe_lag) // self.probe_every * self.probe_every
        return p if p >= self.probe_every else None

    def _probe(self, p: int) -> tuple[ProbeResult, ...]:
        if p not in self.probe_results:
            self.probe_results[p] = unwrap(self.probe_refs.pop(p))
        return self.probe_results[p]

    def _observation(self, j: int) -> Observation:
        self._collect(j - self.D - 1)
        p = self._visible_probe(j)
        cur = self.current
        recent = self.losses[-self.c.train.log_every :]
        return Observation(
            step=j,
            total_steps=self.c.train.total_steps,
            stage=cur.stage if cur else 0,
            num_stages=len(self.stages),
            teacher=cur.teacher if cur else 0,
            num_teachers=len(self.names),
            steps_in_stage=j - self.stage_start,
            recent_loss=float(np.mean(recent)) if recent else None,
            loss_history=tuple(self.losses[-50:]),
            probe_step=p,
            probes=self._probe(p) if p is not None else (),
            teacher_accuracy=self.teacher_acc,
        )

    def _apply(self, j: int, d: Decision) -> None:
        prev = self.current
        if prev is None or d.stage != prev.stage:
            self.stage_start = j
        self.stage_ranges.setdefault(d.stage, [j, j])[1] = j
        changed = prev is None or (d.stage, d.teacher, d.replay, d.teacher_mix) != (
            prev.stage,
            prev.teacher,
            prev.replay,
            prev.teacher_mix,
        )
        self.current = d
        if changed:
            self.run_dir.decision(
                {
                    "step": j,
                    "stage": d.stage,
                    "teacher": self.names[d.teacher],
                    "teacher_index": d.teacher,
                    "policy": self.policy_name,
                    "reason": d.reason,
                    "replay": d.replay,
                    "teacher_mix": list(d.teacher_mix) if d.teacher_mix else None,
                }
            )
            if self.c.teachers.resident == "needed":
                in_use = (
                    [d.teacher]
                    if not d.teacher_mix
                    else [i for i, w in enumerate(d.teacher_mix) if w > 0]
                )
                for i in range(min(in_use)):
                    self.launcher.release_teacher(i)

    def _snapshot(self) -> dict[str, Any]:
        """The controller and sampler state before the next step is planned (JSON-ready)."""
        return {
            "sampler": self.sampler.state_dict(),
            "current": decision_to_json(self.current),
            "stage_start": self.stage_start,
            "stage_ranges": {str(k): list(v) for k, v in self.stage_ranges.items()},
        }

    def _plan(self, j: int) -> _Planned:
        actors = self.launcher.actors
        assert actors is not None
        before = self._snapshot()
        obs = self._observation(j)
        try:
            decision, policy_state = unwrap(actors.scheduler.decide.remote(obs))
        except PolicyError as err:
            raise PolicyError(f"{err}\n{self._stopped(j)}") from None
        before["policy"] = policy_state
        self._apply(j, decision)
        replay = decision.replay if decision.replay is not None else self.c.curriculum.replay
        stage = None if self.mode == "none" else decision.stage
        idx = self.sampler.next_batch(stage, replay=replay if stage else 0.0)
        examples = [self.w.train[i] for i in idx]
        enc = encode_examples(self.w.tokenizer, examples)
        batch = Batch(
            step=j,
            stage=decision.stage,
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            loss_mask=enc.loss_mask,
            example_ids=np.asarray(idx),
            prompts=tuple(e.prompt for e in examples)
            if self.c.distill.objective == "sequence"
            else (),
        )
        batch_ref = ray.put(batch)
        if self.c.distill.objective == "sequence":
            refs = [
                self.launcher.teacher(decision.teacher).generate.remote(
                    batch_ref, self.w.max_new_tokens
                )
            ]
            weights = None
        elif decision.teacher_mix:
            use = [(i, w) for i, w in enumerate(decision.teacher_mix) if w > 0]
            refs = [self.launcher.teacher(i).targets.remote(batch_ref) for i, _ in use]
            weights = [w for _, w in use]
        else:
            refs = [self.launcher.teacher(decision.teacher).targets.remote(batch_ref)]
            weights = None
        return _Planned(j, decision, batch_ref, refs, weights, before)

    def _stopped(self, j: int) -> str:
        ckpt = self._last[0] if self._last else None
        if ckpt is None:
            return f"The run stopped at step {j}, before its first checkpoint; fix the policy and start it again."
        return (
            f"The run stopped at step {j}; its last checkpoint {ckpt} is intact: fix the policy, "
            f"then continue with `clpd run --resume {self.run_dir.path}`."
        )

    # ------------------------------------------------------------------ main loop
    def run(self) -> RunStats:
        """Train to ``total_steps`` (replaying from a checkpoint after a failure), then evaluate
        the student on the held-out set and save it to ``<out>/student``."""
        actors = self.launcher.actors
        assert actors is not None
        self._setup_probes()
        start = time.perf_counter()
        initial = self._initial_state(unwrap(actors.scheduler.state_dict.remote()))
        if self.resume_from is not None:
            self._last = (self.resume_from, self.run_dir.read_checkpoint(self.resume_from))
        else:
            self._last = (None, initial)
        fresh = self.resume_from is None
        self._bar = tqdm(
            total=self.c.train.total_steps,
            desc=f"clpd {self.policy_name}",
            disable=not self.progress,
            unit="step",
        )
        try:
            while True:
                ckpt, state = self._last
                try:
                    self._restore(ckpt, state, fresh=fresh)
                    self._train(int(state["step"]))
                    trained = time.perf_counter()
                    stats = self._finish()
                    break
                except Exception as err:
                    if not is_recoverable(err):
                        raise
                    self._recover(err)
                    fresh = False
        finally:
            self._bar.close()
        stats.wall_s = trained - start  # training, replays included; not the final evaluation
        return stats

    def _train(self, start: int) -> None:
        actors = self.launcher.actors
        assert actors is not None
        total = self.c.train.total_steps
        planned: deque[_Planned] = deque()
        next_plan = start
        t_log = time.perf_counter()
        self._bar.n = start
        self._bar.refresh()
        for s in range(start, total):
            while next_plan < min(total, s + self.D):
                planned.append(self._plan(next_plan))
                next_plan += 1
            p = planned.popleft()
            if self.c.distill.objective == "sequence":
                ref = actors.student.train_step.remote(p.target_refs[0])
            else:
                ref = actors.student.train_step.remote(
                    p.batch_ref, *p.target_refs, weights=p.weights
                )
            self.inflight.append((s, ref))
            done = s + 1
            if done % self.probe_every == 0 and done < total:
                self.probe_refs[done] = actors.scheduler.probe.remote(
                    done, actors.student.weights.remote()
                )
            if done % self.c.train.log_every == 0 or done == total:
                self._collect(s - 1 if done != total else s)
                t_now = time.perf_counter()
                self._log(self.log_from, done, t_now - t_log)
                self.log_from, t_log = done, t_now
                self._bar.set_postfix(
                    loss=f"{np.mean(self.losses[-10:]):.3f}" if self.losses else "-",
                    stage=self.current.stage if self.current else 0,
                    teacher=self.names[self.current.teacher] if self.current else "-",
                    refresh=False,
                )
            if (
                self.c.train.checkpoint_every
                and done % self.c.train.checkpoint_every == 0
                and done < total
            ):
                self._checkpoint(done, planned[0] if planned else None)
            self._bar.update(1)
            if self.on_step is not None:
                self.on_step(done)
        self._collect(total)

    def _finish(self) -> RunStats:
        actors = self.launcher.actors
        assert actors is not None
        evaluation = unwrap(actors.student.evaluate.remote(self.w.eval, self.w.max_new_tokens))
        unwrap(actors.student.save_pretrained.remote(str(self.run_dir.path / "student")))
        student = unwrap(actors.student.stats.remote())
        busy = {"student": student["busy_s"]}
        for name, h in zip(self.names, actors.teachers, strict=True):
            if h is not None:
                busy[f"teacher-{name}"] = unwrap(h.stats.remote())["busy_s"]
        busy["scheduler"] = unwrap(actors.scheduler.stats.remote())["busy_s"]
        return RunStats(
            steps=self.c.train.total_steps,
            recoveries=self.recoveries,
            evaluation=evaluation,
            student=student,
            busy_s=busy,
        )

    def _log(self, lo: int, hi: int, wall: float) -> None:
        rows = [self.results[i] for i in range(lo, hi) if i in self.results]
        if not rows:
            return
        d = self.current
        assert d is not None
        tokens = sum(r.tokens for r in rows)
        self.run_dir.metrics(
            {
                "step": hi,
                "stage": d.stage,
                "teacher": self.names[d.teacher],
                "loss": float(np.mean([r.loss for r in rows])),
                "kd_loss": float(np.mean([r.kd_loss for r in rows])),
                "ce_loss": float(np.mean([r.ce_loss for r in rows])),
                "lr": rows[-1].lr,
                "tokens_per_s": tokens / max(wall, 1e-9),
                "student_busy_s": float(sum(r.busy_s for r in rows)),
            }
        )

    # ------------------------------------------------------------------ checkpoints
    def _initial_state(self, policy_state: dict) -> dict[str, Any]:
        """The state of step 0, in checkpoint form (the sampler and policy are still fresh)."""
        return {
            "version": STATE_VERSION,
            "step": 0,
            "policy_name": self.policy_name,
            **self._snapshot(),
            "policy": policy_state,
            "log_from": 0,
            "results_from": 0,
            "results": [],
            "probes": {},
            "pending_probes": [],
        }

    def _checkpoint(self, done: int, nxt: _Planned | None) -> None:
        """Student state after ``done`` steps, plus what the controller needs to replay from there."""
        actors = self.launcher.actors
        assert actors is not None
        if nxt is not None:
            before = nxt.before
        else:  # nothing planned ahead (prefetch 1): the live state is the state before step done
            before = {**self._snapshot(), "policy": unwrap(actors.scheduler.state_dict.remote())}
        tmp = self.run_dir.checkpoint_tmp(done)
        unwrap(actors.student.checkpoint.remote(str(tmp)))
        # Results of steps not yet collected are done (the checkpoint ran after them): read them
        # without collecting, so the pipeline is unchanged by checkpointing.
        lo = max(0, min(self.log_from, done - self.D - self.keep_losses))
        pending = {step: ref for step, ref in self.inflight if step < done}
        results = [
            self.results[i] if i in self.results else unwrap(pending[i]) for i in range(lo, done)
        ]
        seen = self._visible_probe(done) or 0
        state = {
            "version": STATE_VERSION,
            "step": done,
            "policy_name": self.policy_name,
            **before,
            "log_from": self.log_from,
            "results_from": lo,
            "results": [result_to_json(r) for r in results],
            "probes": {
                str(p): probes_to_json(self._probe(p))
                for p in range(self.probe_every, done, self.probe_every)
                if p >= seen
            },
            "pending_probes": [done] if done in self.probe_refs else [],
        }
        write_json_atomic(tmp / "controller.json", state)
        final = self.run_dir.commit_checkpoint(tmp, done)
        self._last = (final, json.loads(json.dumps(state)))  # exactly what a resume reads

    def _restore(self, ckpt: Path | None, state: dict[str, Any], *, fresh: bool) -> None:
        """Put actors, controller and run directory back to ``state`` (step N), ready to plan N."""
        actors = self.launcher.actors
        assert actors is not None
        step = int(state["step"])
        where = ckpt or "the start of the run"
        if state.get("version") != STATE_VERSION:
            raise RunDirError(
                f"checkpoint {where} has format version {state.get('version')!r}; this clpd "
                f"reads version {STATE_VERSION}: resume it with the clpd version that wrote it"
            )
        if state.get("policy_name") != self.policy_name:
            raise RunDirError(
                f"checkpoint {where} was written by policy {state.get('policy_name')!r}, but this "
                f"run uses {self.policy_name!r}; resume with the policy that wrote it"
            )
        if not fresh:
            unwrap(actors.student.restore.remote(str(ckpt) if ckpt else None))
            self.run_dir.rewind(step)
        unwrap(actors.scheduler.set_probes.remote(*self._probe_args))
        unwrap(actors.scheduler.load_state_dict.remote(state["policy"]))
        try:
            self.sampler.load_state_dict(state["sampler"])
        except ValueError as err:
            raise RunDirError(f"checkpoint {where}: {err}") from None
        self.current = decision_from_json(state["current"])
        self.stage_start = int(state["stage_start"])
        self.stage_ranges = {int(k): list(v) for k, v in state["stage_ranges"].items()}
        self.log_from = int(state["log_from"])
        lo = int(state["results_from"])
        results = [result_from_json(r) for r in state["results"]]
        if lo + len(results) != step:
            raise RunDirError(f"checkpoint {where}: its step results do not reach step {step}")
        # Observations collect losses as the pipeline goes: steps >= N-D are "in flight" again.
        cut = max(0, step - self.D)
        self.results = {lo + i: r for i, r in enumerate(results) if lo + i < cut}
        self.losses = [r.loss for i, r in enumerate(results) if lo + i < cut]
        self.inflight = deque((lo + i, ray.put(r)) for i, r in enumerate(results) if lo + i >= cut)
        self.probe_results = {int(k): probes_from_json(v) for k, v in state["probes"].items()}
        self.probe_refs = {
            int(p): actors.scheduler.probe.remote(int(p), actors.student.weights.remote())
            for p in state["pending_probes"]
        }

    def _recover(self, err: BaseException) -> None:
        """After a lost actor: wait until Ray has restarted it; the loop then replays."""
        self.recoveries += 1
        ckpt, state = self._last or (None, {})
        if self.recoveries > self.max_recoveries:
            raise RuntimeError(
                f"gave up after {self.max_recoveries} recoveries in one run; the last failure was "
                f"{describe_failure(err)}. Continue later with `clpd run --resume {self.run_dir.path}`"
            ) from err
        _log.warning(
            "clpd: an actor failed (%s); replaying from %s (step %s), recovery %d of at most %d",
            describe_failure(err),
            ckpt or "the start of the run",
            state.get("step", 0),
            self.recoveries,
            self.max_recoveries,
        )
        wait_for_restarts(self.launcher)

    def summary_stages(self) -> dict[str, list[int]]:
        return {str(k): v for k, v in sorted(self.stage_ranges.items())}
