"""The controller: drives one CLPD run over the actors. It acts; the policy decides.

Pipeline, with prefetch depth D (``train.prefetch``)::

    plan(j), j = s .. s+D-1            obs(j) ──▶ scheduler.decide ──▶ Decision(stage, teacher)
                                       sampler(stage) ──▶ Batch(j) ──put──▶ teacher.targets(ref)
    train(s)                           student.train_step(Batch(s) ref, targets(s) ref)
                                         (Ray hands the targets straight to the student: no driver hop)
    every probe_every steps            student.weights ──▶ scheduler.probe (off the critical path)

Teachers compute targets D steps ahead while the student trains, and the student always has
the next step queued, so neither waits on the driver. Everything a decision sees is fixed by step
numbers, not timing: decision j sees the losses of steps <= j-D-1 and the probes taken at least
``probe_lag`` steps earlier, so a run with the same seeds makes the same decisions.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from tqdm.auto import tqdm

from clpd_ray.actors.launcher import Launcher
from clpd_ray.batching import encode_examples
from clpd_ray.config import Config
from clpd_ray.curriculum import CurriculumSampler, split_stages
from clpd_ray.errors import ClpdError
from clpd_ray.messages import Batch, Decision, Observation, ProbeResult, StepResult
from clpd_ray.policies import SchedulerPolicy
from clpd_ray.rundir import RunDir, write_json_atomic
from clpd_ray.workload import Workload, difficulty_scores, stage_of

__all__ = ["Controller", "RunStats", "unwrap"]


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
        cause = getattr(err, "cause", None)
        if isinstance(cause, ray.exceptions.RayTaskError) and isinstance(cause.cause, ClpdError):
            raise cause.cause from None
        raise


@dataclass
class RunStats:
    wall_s: float = 0.0
    steps: int = 0
    busy_s: dict[str, float] = field(default_factory=dict)


@dataclass
class _Planned:
    step: int
    decision: Decision
    batch_ref: Any
    target_refs: list[Any]
    weights: list[float] | None
    sampler_state: dict  # before this step was drawn (for checkpoints)
    policy_state: dict  # before this step was decided


class Controller:
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
    ) -> None:
        self.c = config
        self.w = workload
        self.run_dir = run_dir
        self.launcher = launcher
        self.policy_name = policy.name
        self.mode = policy.curriculum
        self.progress = progress
        self.on_step = on_step
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
        self.losses: list[float] = []
        self.results: dict[int, StepResult] = {}
        self.probes: list[tuple[int, Any]] = []  # (visible_at_step, ref) in order taken
        self.visible_probe: tuple[int, tuple[ProbeResult, ...]] | None = None
        self.stage_start = 0
        self.current: Decision | None = None
        self.stage_ranges: dict[int, list[int]] = {}
        self.teacher_acc: tuple[tuple[float, ...], ...] = ()

    # ------------------------------------------------------------------ setup
    def _probe_sets(self) -> list[list]:
        pool = self.w.probe_pool
        if self.mode == "random":
            # Random stages have no difficulty range: probe each with a random share of the pool.
            rng = np.random.default_rng([self.c.seed, 11])
            parts = np.array_split(rng.permutation(len(pool)), len(self.stages))
        else:
            scores = difficulty_scores(self.c, pool, self.w.tokenizer, self.w.ladder)
            which = stage_of(scores, self.stages, self.w.scores)
            parts = [np.flatnonzero(which == s) for s in range(len(self.stages))]
        size = self.c.scheduler.probe_size
        sets = []
        for s, idx in enumerate(parts):
            if len(idx) == 0:
                idx = np.arange(len(pool))  # a stage with no held-out probe items: use the pool
            sets.append([pool[i] for i in idx[:size]])
            del s
        return sets

    def _setup_probes(self) -> None:
        actors = self.launcher.actors
        assert actors is not None
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
        unwrap(actors.scheduler.set_probes.remote(sets, targets, self.w.max_new_tokens))
        if self.c.teachers.resident == "needed":
            for i in range(len(self.names)):
                self.launcher.release_teacher(i)

    # ------------------------------------------------------------------ observation / plan
    def _collect(self, upto: int, inflight: deque) -> None:
        """Wait for train results of every step <= upto, in order."""
        while inflight and inflight[0][0] <= upto:
            step, ref = inflight.popleft()
            res: StepResult = unwrap(ref)
            self.results[step] = res
            self.losses.append(res.loss)

    def _observation(self, j: int, inflight: deque) -> Observation:
        self._collect(j - self.D - 1, inflight)
        while self.probes and self.probes[0][0] <= j:
            visible_at, ref = self.probes.pop(0)
            self.visible_probe = (visible_at - self.probe_lag, unwrap(ref))
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
            probe_step=self.visible_probe[0] if self.visible_probe else None,
            probes=self.visible_probe[1] if self.visible_probe else (),
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

    def _plan(self, j: int, inflight: deque) -> _Planned:
        actors = self.launcher.actors
        assert actors is not None
        obs = self._observation(j, inflight)
        decision, policy_state = unwrap(actors.scheduler.decide.remote(obs))
        self._apply(j, decision)
        sampler_state = self.sampler.state_dict()
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
        return _Planned(j, decision, batch_ref, refs, weights, sampler_state, policy_state)

    # ------------------------------------------------------------------ main loop
    def run(self) -> RunStats:
        actors = self.launcher.actors
        assert actors is not None
        self._setup_probes()
        total = self.c.train.total_steps
        planned: deque[_Planned] = deque()
        inflight: deque[tuple[int, Any]] = deque()
        next_plan = 0
        log_from = 0
        t_log = start = time.perf_counter()
        bar = tqdm(
            total=total, desc=f"clpd {self.policy_name}", disable=not self.progress, unit="step"
        )
        for s in range(total):
            while next_plan < min(total, s + self.D):
                planned.append(self._plan(next_plan, inflight))
                next_plan += 1
            p = planned.popleft()
            if self.c.distill.objective == "sequence":
                ref = actors.student.train_step.remote(p.target_refs[0])
            else:
                ref = actors.student.train_step.remote(
                    p.batch_ref, *p.target_refs, weights=p.weights
                )
            inflight.append((s, ref))
            done = s + 1
            if done % self.probe_every == 0 and done < total:
                weights_ref = actors.student.weights.remote()
                self.probes.append(
                    (done + self.probe_lag, actors.scheduler.probe.remote(done, weights_ref))
                )
            if (
                self.c.train.checkpoint_every
                and done % self.c.train.checkpoint_every == 0
                and done < total
            ):
                nxt = planned[0] if planned else None
                self._checkpoint(done, nxt)
            if done % self.c.train.log_every == 0 or done == total:
                self._collect(s - 1 if done != total else s, inflight)
                t_now = time.perf_counter()
                self._log(log_from, done, t_now - t_log)
                log_from, t_log = done, t_now
                bar.set_postfix(
                    loss=f"{np.mean(self.losses[-10:]):.3f}" if self.losses else "-",
                    stage=self.current.stage if self.current else 0,
                    teacher=self.names[self.current.teacher] if self.current else "-",
                    refresh=False,
                )
            bar.update(1)
            if self.on_step is not None:
                self.on_step(done)
        self._collect(total, inflight)
        bar.close()
        wall = time.perf_counter() - start
        return RunStats(wall_s=wall, steps=total)

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

    def _checkpoint(self, done: int, nxt: _Planned | None) -> None:
        """Student state after ``done`` steps, plus what the controller needs to replay from there."""
        actors = self.launcher.actors
        assert actors is not None
        tmp = self.run_dir.checkpoint_tmp(done)
        unwrap(actors.student.checkpoint.remote(str(tmp)))
        write_json_atomic(
            tmp / "controller.json",
            {
                "step": done,
                "sampler": nxt.sampler_state if nxt else self.sampler.state_dict(),
                "policy": nxt.policy_state if nxt else unwrap(actors.scheduler.state_dict.remote()),
            },
        )
        self.run_dir.commit_checkpoint(tmp, done)

    def summary_stages(self) -> dict[str, list[int]]:
        return {str(k): v for k, v in sorted(self.stage_ranges.items())}
