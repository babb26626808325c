"""The executor: runs a :class:`~clpd_ray.runtime.planner.Planner`'s steps on the actors.

The planner decides what each step is; the executor submits, collects, checkpoints, recovers and
replays. Pipeline, with prefetch depth D (``train.prefetch``)::

    plan(j), j = s .. s+D-1     planner.observation(j) ──▶ scheduler.decide ──▶ planner.plan(j)
                                Batch(j) ──put──▶ teacher.targets(ref)
    train(s .. s+m-1)           student.train_steps(Batch(s) ref, targets(s) ref, ...),
                                  m = D // 2 steps per call (planner.ends_call), one result
                                  object per step; a call ends early where a probe,
                                  evaluation or checkpoint must see the weights after its step
                                  (Ray hands the targets straight to the student: no driver hop)
    probe after s               student.snapshot (queued right after step s: a device-local
                                  copy of the weights) ──▶ student.probe, in the student's own
                                  "probe" concurrency group: no weights are shipped, training
                                  goes on, and decide() never waits behind a probe
    checkpoint after s          student files + controller.json + manifest ──▶ checkpoints/step-N

Teachers compute targets D steps ahead while the student trains, and the student always has the
next call queued, so neither waits on the driver. Several steps per call spare the student
Ray's per-call cost (dispatch, argument fetch, result store: about 3 ms on 2 CPU cores, a tenth
of a demo step) on all but one step of each call; each step is computed exactly as alone, so the
weights are the same bit for bit whatever the call sizes. Policies that read no probes (the fixed
schedules) get none.

Recovery: teachers are stateless and Ray re-runs their requests on a restarted instance. When
the student or the scheduler fails, Ray restarts it, and the executor rewinds everything to the
last checkpoint (or to step 0) and replays::

    failure ──▶ wait for the restarted actor ──▶ student.restore(step-N)
            ──▶ scheduler.load_state_dict, student.set_probes ──▶ planner.load_state_dict(step N)
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
from typing import Any

import numpy as np
import ray
from tqdm.auto import tqdm

from clpd_ray.config import Config
from clpd_ray.data.batching import encode_examples
from clpd_ray.data.tokenizer import load_tokenizer
from clpd_ray.distill.sequence import (
    SequenceSettings,
    same_vocab,
    settings_per_teacher,
    summarise_counts,
)
from clpd_ray.errors import ClpdError, PolicyError
from clpd_ray.messages import Batch, StepResult
from clpd_ray.policies import SchedulerPolicy
from clpd_ray.runtime.actors.launcher import Launcher
from clpd_ray.runtime.metrics import RunMetrics
from clpd_ray.runtime.phases import phase
from clpd_ray.runtime.planner import Planner, StepPlan, probe_sets
from clpd_ray.runtime.recovery import describe_failure, is_recoverable, wait_for_restarts
from clpd_ray.runtime.rundir import RunDir
from clpd_ray.runtime.stopping import RunStopped, stop_requested
from clpd_ray.runtime.target_store import store_location
from clpd_ray.runtime.tracking import Reporter
from clpd_ray.workload import Workload

__all__ = ["PROBE_GROUP", "Executor", "RunStats", "unwrap"]

_log = logging.getLogger(__name__)
_CLPD_ERROR_LINE = re.compile(r"clpd_ray\.errors\.\w+: ")
PROBE_GROUP = "probe"  # the student actor's concurrency group for probes (launcher.py)


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
    target_store: dict[str, dict[str, int]] = field(default_factory=dict)  # teacher -> counts
    # Teachers given by path, scored on their actors at the end: name -> evaluate() result.
    teacher_evaluation: dict[str, dict] = field(default_factory=dict)
    teacher_parameters: dict[str, int] = field(default_factory=dict)


@dataclass
class _Submitted:
    plan: StepPlan
    batch_ref: Any
    target_refs: list[Any]


class Executor:
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
        resume_from: str | None = None,
        max_recoveries: int = 10,
        reporter: Reporter | None = None,
    ) -> None:
        """``on_step(done)`` runs on the driver after step ``done - 1`` is planned and its teacher
        requests sent (the step itself may wait for the student's next call; a test hook; it
        runs again for replayed steps). ``resume_from``: a checkpoint to continue from."""
        self.c = config
        self.w = workload
        self.run_dir = run_dir
        self.reporter = reporter or Reporter(run_dir)  # run directory + train.report_to
        self.launcher = launcher
        self.planner = Planner(
            config,
            workload,
            policy_name=policy.name,
            curriculum=policy.curriculum,
            reads_probes=policy.reads_probes,
        )
        self.progress = progress
        self.on_step = on_step
        self.resume_from = resume_from
        self.max_recoveries = max_recoveries
        self.recoveries = 0
        self._store = store_location(config, run_dir.uri)  # None: teachers keep no store
        self.prom = RunMetrics(launcher.run_id)  # driver-side Prometheus metrics (recoveries)
        self.inflight: deque[tuple[int, Any]] = deque()  # (step, train_step ref), in step order
        # Planned steps not sent to the student yet: sent together in one call (_submit).
        self.held: list[_Submitted] = []
        self.pending_checkpoints: deque[tuple[int, Any]] = deque()  # (step, student files ref)
        self.probe_refs: dict[int, Any] = {}  # probe step -> ref, until recorded
        self.eval_refs: dict[int, Any] = {}  # eval step -> ref (train.eval_every), until written
        self.teacher_refs: dict[int, list[Any]] = {}  # rung -> requests that may be in flight
        self._probe_args: tuple[Any, ...] = ()
        # Sequence-level KD (distill/sequence.py): how teachers generate, and each step's counters
        # (refs until the step's result is collected; then the counters, for summary.json).
        self._sequence: list[SequenceSettings] = []  # per teacher (_setup_sequence)
        self._teachers_share_vocab = True
        self._sequence_refs: dict[int, Any] = {}
        self.sequence_counts: dict[int, dict[str, Any]] = {}
        self._last: tuple[str | None, dict] | None = None  # latest checkpoint and its state
        # Work ahead (teachers.work_ahead): per idle teacher, its precompute requests in flight
        # and how far along its future stage's stream it has been sent.
        self._ahead_refs: dict[int, list[Any]] = {}
        self._ahead_sent: dict[tuple[int, str], int] = {}  # (teacher, stream) -> examples sent

    @property
    def actors(self) -> Any:
        assert self.launcher.actors is not None
        return self.launcher.actors

    # ------------------------------------------------------------------ setup
    def _setup_probes(self) -> None:
        """Teacher targets and accuracy on each stage's probe set (sent to the student later).
        Sequence-level KD sets ``_teachers_share_vocab`` first (:meth:`_setup_sequence`)."""
        sets = probe_sets(self.planner, self.c.seed, self.c.scheduler.probe_size)
        if not self.launcher.placement.teacher_actors:
            # sft: no teacher is started, so none scores the probes (no KL part, no teacher
            # accuracy); the policy still sees the student's loss and accuracy on them.
            self.planner.teacher_accuracy = ()
            self._probe_args = (sets, [], self.w.max_new_tokens)
            return
        probe_batches = []
        for s, p in enumerate(sets):
            e = encode_examples(self.w.tokenizer, p, fmt=self.w.prompt_format)
            probe_batches.append(
                Batch(
                    step=-1 - s,
                    stage=s,
                    input_ids=e.input_ids,
                    attention_mask=e.attention_mask,
                    loss_mask=e.loss_mask,
                    example_ids=np.arange(len(p)),
                )
            )
        # Teachers of another tokenizer family (sequence-level KD) cannot score the student's
        # tokens: the probes then have no KL part (ProbeResult.kl_to_teacher == ()).
        kl = self._teachers_share_vocab
        target_refs, acc_refs = [], []
        for i in range(len(self.planner.names)):
            t = self.launcher.teacher(i)
            target_refs.append([t.targets.remote(b) for b in probe_batches] if kl else [])
            acc_refs.append(
                [
                    t.evaluate.remote(
                        p, self.w.max_new_tokens, self.w.prompt_format, self.w.extractor
                    )
                    for p in sets
                ]
            )
        targets = [unwrap(r) for r in target_refs] if kl else []
        self.planner.teacher_accuracy = tuple(
            tuple(a["accuracy"] for a in unwrap(r)) for r in acc_refs
        )
        self._probe_args = (sets, targets, self.w.max_new_tokens)
        if self.c.teachers.resident == "needed":
            for i in range(len(self.planner.names)):
                self.launcher.release_teacher(i)

    def _setup_sequence(self) -> None:
        """Sequence-level KD: whether the teachers share the student's tokenizer (token-level KD
        checked that before the run: runtime/run.py check_tokenizers), and each teacher's
        generation settings (its budget in its own tokens: distill/sequence.py)."""
        toks = [load_tokenizer(e.path) for e in self.w.ladder]
        self._teachers_share_vocab = all(same_vocab(self.w.tokenizer, t) for t in toks)
        self._sequence = settings_per_teacher(
            self.c, self.w.tokenizer, toks, self.w.eval, self.w.max_new_tokens
        )

    def _probe(self, step: int) -> Any:
        student = self.actors.student
        snapshot = student.snapshot.remote()  # in order, right after step `step`
        return student.probe.options(concurrency_group=PROBE_GROUP).remote(step, snapshot)

    # ------------------------------------------------------------------ collecting
    def _collect(self, upto: int) -> None:
        """Record the train results of every step <= upto, in order, and write metrics rows."""
        if self.held and self.held[0].plan.step <= upto:
            self._send()  # never wait for a step that is not sent yet
        while self.inflight and self.inflight[0][0] <= upto:
            _, ref = self.inflight.popleft()
            res: StepResult = unwrap(ref)
            if res.step in self._sequence_refs:  # tiny: the counters only, never the batch
                self.sequence_counts[res.step] = unwrap(self._sequence_refs.pop(res.step))
            for row in self.planner.record(res, time.perf_counter()):
                self.reporter.metrics({**row, "recoveries": self.recoveries})
                self._postfix(row)
            self._bar.update(1)
        for step in sorted(s for s in self.eval_refs if s <= upto + 1):
            result = unwrap(self.eval_refs.pop(step))
            self.reporter.evaluation(
                {
                    "step": step,
                    "accuracy": result["accuracy"],
                    "accuracy_by_difficulty": result["by_difficulty"],
                    "n": result["n"],
                }
            )

    def _record_probe(self, step: int) -> None:
        if step not in self.planner.probes:
            self.planner.record_probe(step, unwrap(self.probe_refs.pop(step)))

    # ------------------------------------------------------------------ planning
    def _plan(self, j: int) -> _Submitted:
        steps, probe = self.planner.missing(j)
        if steps:
            self._collect(max(steps))
        if probe is not None:
            self._record_probe(probe)
        obs = self.planner.observation(j)
        try:
            decision, policy_state = self._policy_call("decide", j, obs)
        except PolicyError as err:
            raise PolicyError(f"{err}\n{self._stopped(j)}") from None
        plan = self.planner.plan(j, decision, policy_state)
        if plan.decision_row is not None:
            self.reporter.decision(plan.decision_row)
        for i in plan.release:
            self.launcher.release_teacher(i, pending=self.teacher_refs.pop(i, []))
        batch_ref = ray.put(plan.batch)
        if self.c.distill.objective == "sequence":
            t = self.launcher.teacher(plan.teachers[0])
            settings = self._sequence[plan.teachers[0]]
            generated, counts = t.generate.options(num_returns=2).remote(batch_ref, settings)
            self._sequence_refs[plan.step] = counts
            refs = [generated]
        elif self.c.distill.objective == "sft":
            refs = []  # no teacher: the student trains on the batch's reference chains (hard CE)
        else:
            refs = [self.launcher.teacher(i).targets.remote(batch_ref) for i in plan.teachers]
        for i, ref in zip(plan.teachers, refs, strict=False):  # sft: no refs
            pending = self.teacher_refs.setdefault(i, [])
            pending.append(ref)
            if len(pending) > 4 * self.c.train.prefetch:  # keep only what may be in flight
                del pending[: len(pending) - 2 * self.c.train.prefetch]
        self._work_ahead(plan)
        return _Submitted(plan, batch_ref, refs)

    def _work_ahead(self, plan: StepPlan) -> None:
        """Keep each started teacher above the ones in use busy with the targets of its future
        stage's examples (planner.ahead_stream), two batches at a time: a request for it later
        waits behind at most those. Targets are per example, so this holds whatever step its
        stage begins at (adaptive policies too)."""
        if not self.c.teachers.work_ahead or self._store is None:
            return  # no store (a plain run's default, or off; sequence KD): nothing to fill
        size = self.c.train.batch_size
        for i in range(max(plan.teachers) + 1, len(self.planner.names)):
            handle = self.actors.teachers[i]
            if handle is None:  # not started (teachers.resident: needed): not started for this
                continue
            refs = self._ahead_refs.setdefault(i, [])
            if refs:
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                refs[:] = [r for r in refs if r not in done]
            for stream, stage in self.planner.ahead_streams(i):
                while len(refs) < 2:
                    sent = self._ahead_sent.get((i, stream), 0)
                    idx = self.planner.upcoming(stream, sent, size)
                    if idx.size == 0:
                        break
                    self._ahead_sent[(i, stream)] = sent + int(idx.size)
                    ref = handle.precompute.remote(self.planner.examples_batch(idx, stage))
                    refs.append(ref)
                    self.teacher_refs.setdefault(i, []).append(ref)

    def _policy_call(self, method: str, j: int, *args: Any) -> Any:
        """A call of the scheduler's policy, bounded by ``scheduler.timeout_s``."""
        timeout = self.c.scheduler.timeout_s
        try:
            return unwrap(getattr(self.actors.scheduler, method).remote(*args), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise PolicyError(
                f"policy {self.planner.policy_name!r}: {method}() at step {j} did not return "
                f"within scheduler.timeout_s={timeout:g} s; fix the policy (does it block or loop?) "
                "or raise scheduler.timeout_s"
            ) from None

    def _stopped(self, j: int) -> str:
        ckpt = self._last[0] if self._last else None
        if ckpt is None:
            return f"The run stopped at step {j}, before its first checkpoint; fix the policy and start it again."
        return (
            f"The run stopped at step {j}; its last checkpoint {ckpt} is intact: fix the policy, "
            f"then continue with `clpd run --resume {self.run_dir.uri}`."
        )

    # ------------------------------------------------------------------ main loop
    def run(self) -> RunStats:
        """Train to ``total_steps`` (replaying from a checkpoint after a failure), then evaluate
        the student on the held-out set and save it to ``<out>/student``."""
        if self.c.distill.objective == "sequence":
            self._setup_sequence()
        if self.planner.reads_probes:
            with phase("scoring the probe sets with every teacher", self.progress):
                self._setup_probes()
        start = time.perf_counter()
        if self.resume_from is not None:
            self._last = (self.resume_from, self.run_dir.read_checkpoint(self.resume_from))
        else:
            policy_state = self._policy_call("state_dict", 0)
            self.planner.reset()
            self._last = (None, self.planner.state_dict(0, policy_state))
        fresh = self.resume_from is None
        self.prom.recoveries(self.recoveries)
        self._bar = tqdm(
            total=self.c.train.total_steps,
            desc=f"clpd {self.planner.policy_name}",
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
                    self._bar.close()
                    what = f"evaluating the student on {len(self.w.eval)} held-out examples and saving it"
                    with phase(what, self.progress):
                        stats = self._finish()
                    break
                except Exception as err:
                    if not is_recoverable(err):
                        raise
                    self._recover(err)
                    fresh = False
        finally:
            self._bar.close()
            self.prom.close()
        stats.wall_s = trained - start  # training, replays included; not the final evaluation
        return stats

    def _train(self, start: int) -> None:
        """Plan, and submit at once, every step from ``start``: the student's queue holds up to D
        steps, and the driver waits only for what an observation may read (results <= j-D-1)."""
        total = self.c.train.total_steps
        self._bar.n = start  # the bar counts finished steps
        self._bar.refresh()
        for j in range(start, total):
            self._submit(self._plan(j))
            self._commit_ready()
            self.planner.forget_before(min([j + 1, *(n for n, _ in self.pending_checkpoints)]))
            if self.on_step is not None:
                self.on_step(j + 1)
            if j + 1 < total and stop_requested() is not None:  # SIGINT/SIGTERM (stopping.py)
                self._send()
                self._stop_at(j + 1)
        self._collect(total - 1)
        self._commit_ready(wait=True)

    def _stop_at(self, n: int) -> None:
        """Stop at step boundary ``n`` on request: commit the checkpoints queued so far and one
        at ``n`` (the student has exactly ``n`` steps queued; the policy decided up to n-1),
        then raise :class:`RunStopped`, from which ``clpd run --resume`` continues at ``n``."""
        sig = stop_requested()
        assert sig is not None
        # A checkpoint due at n itself (train.checkpoint_every) is committed below, with the
        # policy's state: the planner has no snapshot of a step it has not planned.
        due_at_n = None
        if (
            self.pending_checkpoints
            and self.pending_checkpoints[-1][0] == n
            and not self.planner.is_planned(n)
        ):
            _, due_at_n = self.pending_checkpoints.pop()
        self._commit_ready(wait=True)  # those due before n (and n's, were n planned)
        if self._last is None or int(self._last[1]["step"]) != n:
            ref = due_at_n
            if ref is None:  # the student writes its files for n now
                ref = self.actors.student.checkpoint.remote(self.run_dir.checkpoint_dir(n))
            self._collect(n - 1)
            for p in self.planner.probes_for_checkpoint(n):
                self._record_probe(p)
            policy_state = self._policy_call("state_dict", n)
            unwrap(ref)
            state = self.planner.state_dict(n, policy_state)
            self._last = (self.run_dir.commit_checkpoint(n, state), json.loads(json.dumps(state)))
        raise RunStopped(sig, n, self.run_dir.uri)

    def _submit(self, sub: _Submitted) -> None:
        """Hold step j for the student's next call; send the call when step j ends it
        (planner.ends_call: ``steps_per_call`` steps, or a probe, evaluation or checkpoint
        after j, or the last step)."""
        self.held.append(sub)
        if self.planner.ends_call(sub.plan, len(self.held)):
            self._send()

    def _send(self) -> None:
        """Queue the held steps on the student in one call (each step's result is an object of
        its own), then whatever must see the weights right after the last of them."""
        if not self.held:
            return
        held, self.held = self.held, []
        student = self.actors.student
        args: list[Any] = []
        layout: list[tuple[int, list[float] | None]] = []
        for sub in held:
            plan = sub.plan
            if self.c.distill.objective == "sequence":
                args.append(sub.target_refs[0])  # the teacher's GeneratedBatch
                layout.append((0, None))
            else:
                weights = list(plan.weights) if plan.weights and sub.target_refs else None
                args += [sub.batch_ref, *sub.target_refs]
                layout.append((len(sub.target_refs), weights))
        if len(held) == 1:
            weights = layout[0][1]
            refs = [student.train_step.remote(*args, weights=weights)]
        else:
            refs = student.train_steps.options(num_returns=len(held)).remote(layout, *args)
        for sub, ref in zip(held, refs, strict=True):
            self.inflight.append((sub.plan.step, ref))
        plan = held[-1].plan
        done = plan.step + 1
        # The actor runs its calls in order: these see the weights after exactly `done` steps.
        if plan.probe_after:
            self.probe_refs[done] = self._probe(done)
        if plan.eval_after:
            self.eval_refs[done] = student.evaluate.remote(self.w.eval, self.w.max_new_tokens)
        if plan.checkpoint_after:
            uri = self.run_dir.checkpoint_dir(done)
            self.pending_checkpoints.append((done, student.checkpoint.remote(uri)))

    def _postfix(self, row: dict[str, Any]) -> None:
        """Show the latest metrics row: its window's mean loss and its steps' stage and teacher."""
        self._bar.set_postfix(
            loss=f"{row['loss']:.3f}", stage=row["stage"], teacher=row["teacher"], refresh=False
        )

    def _finish(self) -> RunStats:
        actors = self.actors
        student_eval = actors.student.evaluate.remote(self.w.eval, self.w.max_new_tokens)
        # Teachers without a score (given by path) are scored on the same held-out set, on
        # their own actors, at the same time.
        eval_args = (self.w.eval, self.w.max_new_tokens, self.w.prompt_format, self.w.extractor)
        teacher_evals = {
            e.name: self.launcher.teacher(i).evaluate.remote(*eval_args)
            for i, e in enumerate(self.w.ladder)
            if e.accuracy is None
        }
        evaluation = unwrap(student_eval)
        unwrap(actors.student.save_pretrained.remote(self.run_dir.student_dir()))
        student = unwrap(actors.student.stats.remote())
        busy = {"student": student["busy_s"], "student-probes": student["probe_busy_s"]}
        teacher_stats: dict[str, dict[str, int]] = {}
        params: dict[str, dict[str, Any]] = {}
        for name, h in zip(self.planner.names, actors.teachers, strict=True):
            if h is not None:
                st = unwrap(h.stats.remote())
                busy[f"teacher-{name}"] = st["busy_s"]
                params[name] = st
                teacher_stats[name] = st.get("target_store", {})
        busy["scheduler"] = unwrap(actors.scheduler.stats.remote())["busy_s"]
        store = {k: v for k, v in teacher_stats.items() if v}
        return RunStats(
            steps=self.c.train.total_steps,
            recoveries=self.recoveries,
            evaluation=evaluation,
            student=student,
            busy_s=busy,
            target_store=store,
            teacher_evaluation={
                name: {k: v for k, v in unwrap(ref).items() if k != "predictions"}
                for name, ref in teacher_evals.items()
            },
            teacher_parameters={
                n: int(s["parameters"]) for n, s in params.items() if "parameters" in s
            },
        )

    # ------------------------------------------------------------------ checkpoints
    def _commit_ready(self, *, wait: bool = False) -> None:
        """Commit each checkpoint whose step results are all recorded (the observations collect
        them anyway, D steps later); ``wait``: collect what is missing (the end of training)."""
        while self.pending_checkpoints:
            n, ref = self.pending_checkpoints[0]
            if not wait and self.inflight and self.inflight[0][0] < n:
                return
            self._collect(n - 1)
            for p in self.planner.probes_for_checkpoint(n):
                self._record_probe(p)
            unwrap(ref)  # the student has written its files
            state = self.planner.state_dict(n)
            final = self.run_dir.commit_checkpoint(n, state)
            self._last = (final, json.loads(json.dumps(state)))  # exactly what a resume reads
            self.pending_checkpoints.popleft()

    def _restore(self, ckpt: str | None, state: dict[str, Any], *, fresh: bool) -> None:
        """Put actors, planner and run directory back to ``state`` (step N), ready to plan N."""
        actors = self.actors
        where = f"checkpoint {ckpt}" if ckpt else "the start of the run"
        step = self.planner.load_state_dict(state, where)
        if not fresh:
            unwrap(actors.student.restore.remote(ckpt))
            self.run_dir.rewind(step)
        if self.planner.reads_probes:
            unwrap(actors.student.set_probes.remote(*self._probe_args))
        self._policy_call("load_state_dict", step, state["policy"])
        self.inflight = deque()
        self.held = []
        self.pending_checkpoints = deque()
        self.eval_refs = {}
        self.teacher_refs = {}
        self._ahead_refs = {}  # the store keeps what was computed; the stream offsets stay
        self.probe_refs = {int(p): self._probe(int(p)) for p in state["pending_probes"]}
        self.planner.start_clock(time.perf_counter())

    def _recover(self, err: BaseException) -> None:
        """After a lost actor: wait until Ray has restarted it; the loop then replays."""
        self.recoveries += 1
        self.prom.recoveries(self.recoveries)
        ckpt, state = self._last or (None, {})
        if self.recoveries > self.max_recoveries:
            raise RuntimeError(
                f"gave up after {self.max_recoveries} recoveries in one run; the last failure was "
                f"{describe_failure(err)}. Continue later with `clpd run --resume {self.run_dir.uri}`"
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

    def summary_sequence_kd(self) -> dict[str, dict[str, Any]]:
        """Per teacher: chains generated, cached, correct, accepted (and the acceptance rate),
        over the steps this process trained (a replayed step counts once)."""
        return summarise_counts([self.sequence_counts[s] for s in sorted(self.sequence_counts)])

    def summary_stages(self) -> dict[str, list[int]]:
        return self.planner.stage_summary()
