"""The one place that turns the plain actor classes into Ray actors and places them.

Placement: every teacher and the student get a bundle of one placement group (gang-scheduled,
PACK). When the cluster has a GPU for each, a bundle holds ``cluster.gpus_per_actor`` GPUs, so
each teacher and the student own a distinct GPU; on a CPU-only cluster bundles hold a CPU share.
When the cluster advertises the custom resources ``teacher_slot`` / ``student_slot``
(cluster.yaml), bundles ask for them too, so each lands on its own node type.

Names: ``teacher-<name>``, ``student``, ``scheduler`` in namespace ``clpd`` (suffixed with the run
tag when several runs share a cluster), visible in the dashboard's Actors view.

Fault tolerance (see docs/reliability.md): teachers are stateless, so Ray restarts them and re-runs
their in-flight requests (``max_restarts=-1, max_task_retries=-1``). The student and the scheduler
hold state, so Ray restarts them (``STATEFUL_MAX_RESTARTS``) but never re-runs a call
(``max_task_retries=0``): the caller sees the failure and the controller restores them from the
last checkpoint and replays from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from clpd_ray.config import Config
from clpd_ray.errors import ClpdError
from clpd_ray.runtime.actors.scheduler import SchedulerService
from clpd_ray.runtime.actors.student import StudentTrainer
from clpd_ray.runtime.actors.teacher import TeacherService

__all__ = ["NAMESPACE", "STATEFUL_MAX_RESTARTS", "Actors", "Launcher"]

NAMESPACE = "clpd"
_PG_TIMEOUT_S = 120
# Restarts of the student and the scheduler in one run (each one replays from a checkpoint).
STATEFUL_MAX_RESTARTS = 3


@dataclass
class Actors:
    student: Any
    scheduler: Any
    teachers: list[Any] = field(default_factory=list)  # None where a teacher is not resident


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
    ) -> None:
        self.config = config
        self.teacher_dirs = teacher_dirs
        self.tokenizer_dir = tokenizer_dir
        self.run_id = run_id
        self.suffix = name_suffix
        self.names = [t.name for t in config.teachers.ladder]
        n = len(self.names)
        res = ray.cluster_resources()
        gpa = config.cluster.gpus_per_actor
        self.use_gpu = gpa > 0 and res.get("GPU", 0) >= gpa * (n + 1)
        self.use_slots = res.get("teacher_slot", 0) >= n and res.get("student_slot", 0) >= 1
        cpus = res.get("CPU", 1)
        # CPU shares are bookkeeping for Ray's scheduler (real threads are set per actor): one CPU
        # per actor on GPU nodes, capped so that a small cluster can still place the whole run.
        share = cpus / (n + 2)
        self.cpu = round(min(1.0, share) if self.use_gpu else min(0.5, share / 2), 3)
        self.pg: PlacementGroup | None = None
        self.actors: Actors | None = None

    # ------------------------------------------------------------------ placement
    def _bundle(self, slot: str) -> dict[str, float]:
        b: dict[str, float] = {"CPU": self.cpu}
        if self.use_gpu:
            b["GPU"] = self.config.cluster.gpus_per_actor
        if self.use_slots:
            b[slot] = 1
        return b

    def _place(self) -> PlacementGroup:
        n = len(self.names)
        bundles = [self._bundle("teacher_slot") for _ in range(n)] + [self._bundle("student_slot")]
        bundles.append({"CPU": self.cpu})  # scheduler
        pg = placement_group(bundles, strategy="PACK", name=f"clpd{self.suffix}")
        ready, _ = ray.wait([pg.ready()], timeout=_PG_TIMEOUT_S)
        if not ready:
            remove_placement_group(pg)
            raise ClpdError(
                f"the Ray cluster cannot place {n} teachers + student + scheduler with bundles "
                f"{bundles} (cluster has {ray.cluster_resources()}); add GPUs/CPUs, or set "
                "cluster.gpus_per_actor=0 to run on CPUs"
            )
        return pg

    def _options(self, bundle: int, name: str, **extra: Any) -> dict[str, Any]:
        assert self.pg is not None
        b = self.pg.bundle_specs[bundle]
        return {
            "name": f"{name}{self.suffix}",
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
        student = (
            ray.remote(StudentTrainer)
            .options(
                **self._options(
                    len(self.names),
                    "student",
                    max_restarts=STATEFUL_MAX_RESTARTS,
                    max_task_retries=0,
                )
            )
            .remote(c, self.tokenizer_dir, run_id=self.run_id)
        )
        scheduler = (
            ray.remote(SchedulerService)
            .options(
                **self._options(
                    len(self.names) + 1,
                    "scheduler",
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
                student_spec=c.student,
                tokenizer_dir=self.tokenizer_dir,
                run_id=self.run_id,
            )
        )
        teachers: list[Any] = [None] * len(self.names)
        self.actors = Actors(student=student, scheduler=scheduler, teachers=teachers)
        if c.teachers.resident == "all":
            for i in range(len(self.names)):
                self.teacher(i)
        return self.actors

    def teacher(self, i: int) -> Any:
        """The handle of teacher ``i``, started on first use (resident teachers already are)."""
        assert self.actors is not None
        if self.actors.teachers[i] is None:
            self.actors.teachers[i] = (
                ray.remote(TeacherService)
                .options(
                    # Target requests are idempotent: a restarted teacher re-runs them.
                    **self._options(
                        i, f"teacher-{self.names[i]}", max_restarts=-1, max_task_retries=-1
                    )
                )
                .remote(
                    self.names[i],
                    i,
                    self.teacher_dirs[i],
                    top_k=self.config.teachers.top_k,
                    temperature=self.config.distill.temperature,
                    run_id=self.run_id,
                )
            )
        return self.actors.teachers[i]

    def release_teacher(self, i: int) -> None:
        """Stop teacher ``i`` (resident=needed, once the schedule has moved past it)."""
        assert self.actors is not None
        handle = self.actors.teachers[i]
        if handle is not None:
            ray.kill(handle, no_restart=True)
            self.actors.teachers[i] = None

    def forget_teacher(self, i: int) -> None:
        """Drop the handle of a teacher that is dead for good; :meth:`teacher` starts a new one."""
        assert self.actors is not None
        self.actors.teachers[i] = None

    def shutdown(self) -> None:
        if self.actors is not None:
            for h in [self.actors.student, self.actors.scheduler, *self.actors.teachers]:
                if h is not None:
                    ray.kill(h, no_restart=True)
            self.actors = None
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
