"""Where a run's actors go: GPU or CPU bundles, decided once from the cluster's resources.

A pure function of the config and ``ray.cluster_resources()`` (no Ray calls here), so the rule is
tested in milliseconds and the launcher, the ablation's capacity planner and the run header all
read the same decision. The rule never trades GPUs for CPUs behind the user's back::

    cluster.gpus_per_actor == 0          -> CPU bundles (asked for)
    the cluster has no GPU at all        -> CPU bundles (said so in the run header)
    GPUs >= gpus_per_actor * (teacher actors + 1)  -> GPU bundles: each teacher actor and the
                                            student get gpus_per_actor GPUs
    otherwise (some GPUs, too few)       -> ClusterError: how many are needed and how many exist,
                                            and the fixes (share GPUs, fewer replicas, or CPUs)

Teacher actors: a teacher with ``replicas: N`` (``teachers.ladder[]``) has N actors, each with a
bundle of its own, so each replica gets its own GPU(s). Bundle order::

    teacher 0 replicas 0..N0-1, teacher 1 replicas 0..N1-1, ..., student, scheduler
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from clpd_ray.config import Config
from clpd_ray.errors import ClusterError

__all__ = ["Placement", "plan_placement"]


@dataclass(frozen=True)
class Placement:
    """The bundles of one run: a bundle per teacher actor (each replica of each teacher), one for
    the student, one for the scheduler."""

    num_teachers: int
    gpus_per_actor: float  # GPUs in each teacher/student bundle (0: CPU bundles)
    cpu: float  # CPU share of every bundle (Ray bookkeeping; threads are set per actor)
    use_slots: bool  # bundles also ask for teacher_slot / student_slot (cluster.yaml node types)
    why: str  # one line for the run header
    replicas: tuple[int, ...] = ()  # actors per teacher (0 each for sft); empty: one each

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_actor > 0

    def replicas_of(self, i: int) -> int:
        return self.replicas[i] if self.replicas else 1

    @property
    def teacher_actors(self) -> int:
        """Teacher actors in all (replicas included)."""
        return sum(self.replicas) if self.replicas else self.num_teachers

    def teacher_bundle(self, i: int, replica: int = 0) -> int:
        """The bundle index of replica ``replica`` of teacher ``i``."""
        if not 0 <= replica < self.replicas_of(i):
            raise IndexError(f"teacher {i} has {self.replicas_of(i)} replicas, not {replica + 1}")
        return sum(self.replicas_of(j) for j in range(i)) + replica

    @property
    def student_bundle(self) -> int:
        return self.teacher_actors

    @property
    def scheduler_bundle(self) -> int:
        return self.teacher_actors + 1

    def bundle(self, slot: str | None) -> dict[str, float]:
        """A teacher (``slot="teacher_slot"``), student (``"student_slot"``) or scheduler
        (``None``: CPU only) bundle."""
        b: dict[str, float] = {"CPU": self.cpu}
        if slot is None:
            return b
        if self.use_gpu:
            b["GPU"] = self.gpus_per_actor
        if self.use_slots:
            b[slot] = 1
        return b

    def bundles(self) -> list[dict[str, float]]:
        """Every teacher actor (:meth:`teacher_bundle`), then the student, then the scheduler (the
        launcher's bundle indices)."""
        teachers = [self.bundle("teacher_slot") for _ in range(self.teacher_actors)]
        return [*teachers, self.bundle("student_slot"), self.bundle(None)]

    def runs_that_fit(self, resources: Mapping[str, float]) -> int:
        """How many runs with these bundles the given resources hold at once."""
        fits = int(resources.get("CPU", 1.0) // (self.cpu * (self.teacher_actors + 2)) + 1e-9)
        if self.use_gpu:
            per_run = self.gpus_per_actor * (self.teacher_actors + 1)
            fits = min(fits, int(resources.get("GPU", 0) // per_run + 1e-9))
        return fits


def plan_placement(config: Config, resources: Mapping[str, float]) -> Placement:
    """The run's bundles on a cluster with ``resources`` (``ray.cluster_resources()``).

    Raises :class:`ClusterError` when the cluster has GPUs but fewer than the run asks for.
    """
    # distill.objective: sft trains on the reference chains alone: no teacher actor, no bundle.
    sft = config.distill.objective == "sft"
    replicas = tuple(0 if sft else t.replicas for t in config.teachers.ladder)
    n = sum(replicas)  # teacher actors
    gpa = config.cluster.gpus_per_actor
    gpus = float(resources.get("GPU", 0))
    per = "teacher replica" if n > len(replicas) else "teacher"
    if gpa == 0:
        use_gpu, why = False, "CPU bundles (cluster.gpus_per_actor is 0)"
    elif gpus == 0:
        use_gpu, why = False, "CPU bundles: the cluster has no GPUs"
    elif gpus >= gpa * (n + 1):
        use_gpu, why = True, f"GPU bundles: {gpa:g} GPU per {per} and for the student"
    else:
        raise ClusterError(_too_few_gpus(n, gpa, gpus, replicas))
    cpus = float(resources.get("CPU", 1))
    # One CPU per actor on GPU nodes, capped so that a small cluster can still place the run;
    # a CPU run's actors share what there is.
    share = cpus / (n + 2)
    cpu = round(min(1.0, share) if use_gpu else min(0.5, share / 2), 3)
    slots = resources.get("teacher_slot", 0) >= n and resources.get("student_slot", 0) >= 1
    if slots:
        why += "; teacher_slot / student_slot nodes"
    if sft:
        why += "; no teacher actors (distill.objective is sft)"
    return Placement(len(replicas), gpa if use_gpu else 0.0, cpu, slots, why, replicas)


def _too_few_gpus(n: int, gpa: float, gpus: float, replicas: tuple[int, ...]) -> str:
    need = gpa * (n + 1)
    fits = math.floor(gpus / (n + 1) * 100) / 100  # the largest share (2 decimals) that fits
    teachers = (
        f"{len(replicas)} teachers"
        if n == len(replicas)
        else f"{len(replicas)} teachers with {n} replicas in all (teachers.ladder[].replicas)"
    )
    fewer = "lower teachers.ladder[].replicas, " if n > len(replicas) else ""
    share = (
        f"set cluster.gpus_per_actor: {fits:g} (or less) to share the GPUs, e.g. 0.5 puts two "
        "actors on a GPU, "
        if fits > 0
        else ""
    )
    return (
        f"the run needs {need:g} GPUs ({teachers} + the student, cluster.gpus_per_actor="
        f"{gpa:g} each) but the Ray cluster has {gpus:g}; clpd does not fall back to CPUs on a "
        f"GPU cluster: {share}{fewer}set cluster.gpus_per_actor: 0 to run on CPUs, or add GPUs"
    )
