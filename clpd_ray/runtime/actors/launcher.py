"""The one place that turns the plain actor classes into Ray actors and places them.

Placement (:mod:`clpd_ray.runtime.placement`): every teacher and the student get a bundle of one
placement group (gang-scheduled, PACK) holding ``cluster.gpus_per_actor`` GPUs, so each teacher
and the student own a distinct GPU; CPU bundles only when the config asks for them or the cluster
has no GPU (never as a silent fallback). When the cluster advertises the custom resources
``teacher_slot`` / ``student_slot`` (cluster.yaml), bundles ask for them too, so each lands on its
own node type.

Names: every run has a run id, so several runs share a cluster: the placement group is
``clpd-<run id>``, the actors ``teacher-<name>-<run id>``, ``student-<run id>`` and
``scheduler-<run id>`` in namespace ``clpd`` (an ablation appends its arm and seed), as the
dashboard's Actors view shows them.

Replicas (``teachers.ladder[].replicas: N``): a teacher is N actors, each in a bundle of its
own (its own GPU on a GPU cluster), named ``teacher-<name>-<run id>`` (replica 0) and
``teacher-<name>-r<k>-<run id>`` (replica k), behind one
:class:`~clpd_ray.runtime.teacher_pool.TeacherPool`: :meth:`Launcher.teacher` returns the pool,
whose ``.targets.remote(...)`` etc. go to the least loaded replica. Each replica restarts on its
own as a single teacher does; releasing a teacher releases all its replicas.

Fault tolerance (see docs/reliability.md): teachers are stateless, so Ray restarts them and re-runs
their in-flight requests (``max_task_retries=-1``), at most ``TEACHER_MAX_RESTARTS`` times per
instance, and the launcher replaces a teacher whose restarts ran out at most
``TEACHER_MAX_REPLACEMENTS`` times: a teacher that dies on every start (out of memory at load)
stops the run with a message instead of restarting forever. The student and the scheduler hold
state, so Ray restarts them (``STATEFUL_MAX_RESTARTS``) but never re-runs a call
(``max_task_retries=0``): the caller sees the failure and the executor restores them from the last
checkpoint and replays from there. An ``__init__`` that raises is never retried: it is reported
as :class:`~clpd_ray.errors.ActorInitError` naming the actor, its input and the cause.

Releasing a teacher (``teachers.resident: needed``)::

    release_teacher(i, pending=refs) ──▶ retiring: (teacher i, its unfinished request refs)
    any later launcher call (reap)   ──▶ kill the retiring teachers whose refs are all done
    teacher(i) while i is retiring   ──▶ the same live actor is taken back
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from clpd_ray.config import Config
from clpd_ray.errors import ActorInitError, ClpdError, ClusterError
from clpd_ray.runtime.actors.device import actor_location
from clpd_ray.runtime.actors.init_errors import reporting_init_errors
from clpd_ray.runtime.actors.scheduler import SchedulerService
from clpd_ray.runtime.actors.student import StudentTrainer
from clpd_ray.runtime.actors.teacher import TeacherService
from clpd_ray.runtime.connect import NAMESPACE
from clpd_ray.runtime.placement import Placement, plan_placement
from clpd_ray.runtime.teacher_pool import TeacherPool

__all__ = [
    "NAMESPACE",
    "STATEFUL_MAX_RESTARTS",
    "TEACHER_MAX_REPLACEMENTS",
    "TEACHER_MAX_RESTARTS",
    "ActorPlace",
    "Actors",
    "Launcher",
]

_PG_TIMEOUT_S = 120
# Restarts of the student and the scheduler in one run (each one replays from a checkpoint);
# CLPD_STATEFUL_MAX_RESTARTS raises it for soak tests (benchmarks/chaos.py).
STATEFUL_MAX_RESTARTS = int(os.environ.get("CLPD_STATEFUL_MAX_RESTARTS", "3"))
# Restarts of one teacher instance (a crash or a lost node; its requests are re-run);
# CLPD_TEACHER_MAX_RESTARTS raises it for soak tests.
TEACHER_MAX_RESTARTS = int(os.environ.get("CLPD_TEACHER_MAX_RESTARTS", "3"))
# New instances of a teacher whose restarts ran out, before the run stops.
TEACHER_MAX_REPLACEMENTS = 2


@dataclass
class Actors:
    student: Any
    scheduler: Any
    # A TeacherPool per teacher (its replicas), None where a teacher is not resident.
    teachers: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class ActorPlace:
    """Where one actor runs, for the run header."""

    name: str
    node_ip: str
    node_id: str
    device: str  # the torch device the actor computes on: cuda:0 (its assigned GPU) or cpu
    gpu_ids: tuple[str, ...]  # the GPUs Ray assigned to it (logical ids)


@dataclass
class _Retiring:
    """A released teacher (all its replicas) that still owes answers to ``pending`` requests."""

    index: int
    handle: TeacherPool
    pending: list[Any]


class Launcher:
    """Starts, looks up and stops the actors of one run."""

    def __init__(
        self,
        config: Config,
        teacher_dirs: list[str],
        tokenizer_dir: str,
        *,
        run_id: str,
        name_suffix: str = "",
        placement: Placement | None = None,
        target_store: str | None = None,
        weights_sha256: dict[str, str] | None = None,
    ) -> None:
        """``target_store``: the teachers' target store root (runtime/target_store.py), None
        for none; ``weights_sha256``: teacher name -> its weights' sha256 (run.json), which
        keys the store (a teacher without one hashes its weights itself)."""
        self.config = config
        self.target_store = target_store
        self.weights_sha256 = weights_sha256 or {}
        self.teacher_dirs = teacher_dirs
        self.tokenizer_dir = tokenizer_dir
        self.run_id = run_id
        self.suffix = name_suffix
        self.names = [t.name for t in config.teachers.ladder]
        # ClusterError here when the cluster has GPUs but too few (run.py checks it earlier).
        self.placement = placement or plan_placement(config, ray.cluster_resources())
        self.use_gpu = self.placement.use_gpu
        self.cpu = self.placement.cpu
        self.pg: PlacementGroup | None = None
        self.actors: Actors | None = None
        self._retiring: list[_Retiring] = []
        self._replaced = [0] * len(self.names)

    # ------------------------------------------------------------------ names
    def actor_name(self, base: str) -> str:
        """``base`` (``student``, ``teacher-<name>``, ...) made unique to this run."""
        return f"{base}-{self.run_id}{self.suffix}"

    @property
    def pg_name(self) -> str:
        return f"clpd-{self.run_id}{self.suffix}"

    def teacher_name(self, i: int, replica: int = 0) -> str:
        """Replica 0: ``teacher-<name>-<run id>``; replica k: ``teacher-<name>-r<k>-<run id>``."""
        tag = f"-r{replica}" if replica else ""
        return self.actor_name(f"teacher-{self.names[i]}{tag}")

    def teacher_names(self, i: int) -> list[str]:
        """The actor names of every replica of teacher ``i``."""
        return [self.teacher_name(i, r) for r in range(self.placement.replicas_of(i))]

    # ------------------------------------------------------------------ placement
    def _place(self) -> PlacementGroup:
        bundles = self.placement.bundles()
        pg = placement_group(bundles, strategy="PACK", name=self.pg_name)
        ready, _ = ray.wait([pg.ready()], timeout=_PG_TIMEOUT_S)
        if not ready:
            remove_placement_group(pg)
            raise ClusterError(
                f"the Ray cluster cannot place {self.placement.teacher_actors} teacher actors + "
                "student + scheduler "
                f"with bundles {bundles} within {_PG_TIMEOUT_S} s (cluster has "
                f"{ray.cluster_resources()}, free now {ray.available_resources()}); other runs "
                "may hold them: wait for them, add GPUs/CPUs, or set cluster.gpus_per_actor: 0 "
                "to run on CPUs"
            )
        return pg

    def _options(self, bundle: int, name: str, **extra: Any) -> dict[str, Any]:
        assert self.pg is not None
        b = self.pg.bundle_specs[bundle]
        return {
            "name": name,
            "namespace": NAMESPACE,
            "num_cpus": b["CPU"],
            "num_gpus": b.get("GPU", 0),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=bundle
            ),
            **extra,
        }

    # ------------------------------------------------------------------ actors
    def start(self, policy: Any, policy_kwargs: dict[str, Any] | None) -> Actors:
        self.pg = self._place()
        c = self.config
        n = len(self.names)
        student_bundle = self.placement.student_bundle
        student_name = self.actor_name("student")
        student_cls = reporting_init_errors(StudentTrainer, student_name, self.tokenizer_dir)
        student: Any = (
            # Probes run on their own thread, on a snapshot of the weights the student holds.
            ray.remote(concurrency_groups={"probe": 1})(student_cls)  # type: ignore[call-overload]
            .options(
                **self._options(
                    student_bundle,
                    student_name,
                    max_restarts=STATEFUL_MAX_RESTARTS,
                    max_task_retries=0,
                )
            )
            .remote(c, self.tokenizer_dir, run_id=self.run_id)
        )
        scheduler_name = self.actor_name("scheduler")
        scheduler_cls = reporting_init_errors(
            SchedulerService, scheduler_name, f"policy {c.scheduler.policy}"
        )
        scheduler: Any = (
            ray.remote(scheduler_cls)
            .options(
                **self._options(
                    self.placement.scheduler_bundle,
                    scheduler_name,
                    max_restarts=STATEFUL_MAX_RESTARTS,
                    max_task_retries=0,
                )
            )
            .remote(
                policy,
                policy_kwargs,
                num_stages=c.curriculum.num_stages,
                teacher_names=self.names,
                total_steps=c.train.total_steps,
                run_id=self.run_id,
            )
        )
        teachers: list[Any] = [None] * n
        self.actors = Actors(student=student, scheduler=scheduler, teachers=teachers)
        # Only what the placement placed: an sft run has no teacher actors (placement.py).
        if c.teachers.resident == "all" and self.placement.teacher_actors:
            for i in range(n):
                self.teacher(i)
        return self.actors

    def teacher(self, i: int) -> TeacherPool:
        """Teacher ``i`` (a :class:`TeacherPool` of its replicas, called like an actor handle),
        started on first use (resident teachers already are).

        A teacher released but still finishing its requests is taken back, not started again.
        """
        assert self.actors is not None
        self.reap()
        if self.actors.teachers[i] is None:
            back = next((r for r in self._retiring if r.index == i), None)
            if back is not None:
                self._retiring.remove(back)
                self.actors.teachers[i] = back.handle
            else:
                self.actors.teachers[i] = self._start_teacher(i)
        pool: TeacherPool = self.actors.teachers[i]
        return pool

    def _start_teacher(self, i: int) -> TeacherPool:
        replicas = [self._start_replica(i, r) for r in range(self.placement.replicas_of(i))]
        return TeacherPool(self.teacher_name(i), replicas)

    def _start_replica(self, i: int, replica: int) -> Any:
        name = self.teacher_name(i, replica)
        cls = reporting_init_errors(TeacherService, name, f"model {self.teacher_dirs[i]}")
        bundle = self.placement.teacher_bundle(i, replica)
        return (
            ray.remote(cls)
            .options(
                # Target requests are idempotent: a restarted teacher re-runs them.
                **self._options(
                    bundle, name, max_restarts=TEACHER_MAX_RESTARTS, max_task_retries=-1
                )
            )
            .remote(
                self.names[i],
                i,
                self.teacher_dirs[i],
                top_k=self.config.teachers.top_k,
                temperature=self.config.distill.temperature,
                run_id=self.run_id,
                student_tokenizer_dir=self.tokenizer_dir,  # sequence-level KD re-tokenizes with it
                dtype=self.config.teachers.dtype,
                micro_batch=self.config.teachers.micro_batch,
                target_dtype=self.config.teachers.target_dtype,
                target_store=self.target_store,
                weights_sha256=self.weights_sha256.get(self.names[i]),
            )
        )

    def release_teacher(self, i: int, pending: Iterable[Any] = ()) -> None:
        """Stop teacher ``i`` once every request in ``pending`` has finished; returns at once.

        ``pending``: the ObjectRefs of the requests submitted to teacher ``i`` that may still be
        queued or running (``targets``/``generate`` results not yet consumed). Killing the actor
        before they finish would fail them and force a replay (the requests the teacher's replicas
        have not answered yet are added to ``pending``). The teacher is killed by a later
        :meth:`reap` (every :meth:`teacher` and :meth:`release_teacher` call runs one) once they
        are all done, or by :meth:`shutdown`. Used by ``teachers.resident: needed``.
        """
        assert self.actors is not None
        handle = self.actors.teachers[i]
        if handle is not None:
            self.actors.teachers[i] = None
            known = {id(r) for r in pending}
            owed = [*pending, *(r for r in handle.outstanding() if id(r) not in known)]
            self._retiring.append(_Retiring(i, handle, owed))
        self.reap()

    def reap(self) -> int:
        """Kill the released teachers whose pending requests are all done (never waits);
        returns how many released teachers are still finishing requests."""
        waiting = []
        for r in self._retiring:
            if r.pending:
                # fetch_local=False: only ask whether the results exist, do not pull them here.
                _, r.pending = ray.wait(
                    r.pending, num_returns=len(r.pending), timeout=0, fetch_local=False
                )
            if r.pending:
                waiting.append(r)
            else:
                for h in r.handle.replicas:
                    ray.kill(h, no_restart=True)
        self._retiring = waiting
        return len(waiting)

    def forget_teacher(self, i: int) -> None:
        """Replace the replicas of teacher ``i`` that are dead for good (restarts used up) or do
        not answer: with one replica, drop it (:meth:`teacher` starts a new one); with several,
        start new actors in place of the lost ones and keep the live ones. At most
        ``TEACHER_MAX_REPLACEMENTS`` times per teacher in a run."""
        assert self.actors is not None
        pool = self.actors.teachers[i]
        self._replaced[i] += 1
        if self._replaced[i] > TEACHER_MAX_REPLACEMENTS:
            raise ClusterError(
                f"{self.teacher_name(i)} died {self._replaced[i]} times after "
                f"{TEACHER_MAX_RESTARTS} restarts each; it fails on every start (out of memory "
                f"loading {self.teacher_dirs[i]}, or a node that cannot run it): see its log in "
                "the dashboard (Actors, or `ray logs`), give it a larger GPU or "
                "cluster.gpus_per_actor, then continue with `clpd run --resume <run dir>`"
            )
        if pool is None:
            return
        lost = _lost_replicas(pool.replicas)
        if len(lost) in (0, len(pool.replicas)):  # all lost, or none singled out: start afresh
            lost = list(range(len(pool.replicas)))
            self.actors.teachers[i] = None
        for r in lost:
            _kill_quietly(pool.replicas[r])  # an unresponsive one too: its name is reused
            if self.actors.teachers[i] is not None:
                pool.replace(r, self._start_replica(i, r))

    # ------------------------------------------------------------------ where they landed
    def locate(self, timeout_s: float = 600.0) -> list[ActorPlace]:
        """Where each started actor runs (node, device, GPUs), once it has finished ``__init__``.

        Raises :class:`ActorInitError` (the actor's name, input and cause) when one failed to
        start, and :class:`ClusterError` when one is not up within ``timeout_s``.
        """
        assert self.actors is not None
        named = [(self.actor_name("student"), self.actors.student)]
        named.append((self.actor_name("scheduler"), self.actors.scheduler))
        for i, pool in enumerate(self.actors.teachers):
            if pool is not None:  # every replica, under its own name
                named += [(self.teacher_name(i, r), h) for r, h in enumerate(pool.replicas)]
        refs = [h.__ray_call__.remote(actor_location) for _, h in named]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if len(ready) < len(refs):
            late = [n for (n, _), r in zip(named, refs, strict=True) if r not in ready]
            raise ClusterError(
                f"{', '.join(late)} did not start within {timeout_s:.0f} s; check `ray status` "
                "and the actors' logs in the dashboard"
            )
        places = []
        for (name, _), ref in zip(named, refs, strict=True):
            try:
                where = ray.get(ref)
            except ray.exceptions.ActorDiedError as err:
                raise _init_error(name, err) from None
            places.append(ActorPlace(name=name, **where))
        return places

    def shutdown(self) -> None:
        """Kill every actor of the run (released ones too) and free the placement group."""
        handles = [h for r in self._retiring for h in r.handle.replicas]
        self._retiring = []
        if self.actors is not None:
            handles += [self.actors.student, self.actors.scheduler]
            handles += [
                h for pool in self.actors.teachers if pool is not None for h in pool.replicas
            ]
            self.actors = None
        for h in handles:
            if h is not None:
                ray.kill(h, no_restart=True)
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None


def _lost_replicas(handles: list[Any], timeout_s: float = 10.0) -> list[int]:
    """The indices of the actors that are dead for good or do not answer within ``timeout_s``."""
    refs = [h.ping.remote() for h in handles]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    lost = []
    for r, ref in enumerate(refs):
        if ref not in ready:
            lost.append(r)
            continue
        try:
            ray.get(ref)
        except ray.exceptions.ActorDiedError:
            lost.append(r)
        except ray.exceptions.RayError:
            pass  # restarting (unavailable): Ray brings it back
    return lost


def _kill_quietly(handle: Any) -> None:
    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # already gone
        _ = None


def _init_error(name: str, err: ray.exceptions.ActorDiedError) -> ClpdError:
    """The package error an ``ActorDiedError`` from a failed ``__init__`` carries, else one
    naming the actor and Ray's reason."""
    text = str(err)
    marker = "clpd_ray.errors.ActorInitError: "
    if marker in text:
        return ActorInitError(text[text.rindex(marker) + len(marker) :].strip().splitlines()[0])
    lines = text.strip().splitlines()
    return ClusterError(
        f"{name} died while starting ({lines[0][:300] if lines else type(err).__name__}); see "
        "its log in the dashboard (Actors) or `ray logs`"
    )
