"""Placement: the GPU/CPU rule (pure, no Ray), and GPU placement with logical GPUs on Ray: each
teacher and the student get a distinct GPU, under names unique to the run."""

from __future__ import annotations

import pytest
import ray
from conftest import TINY_LADDER

from clpd_ray.errors import ClusterError
from clpd_ray.runtime.actors.launcher import Launcher
from clpd_ray.runtime.header import format_header
from clpd_ray.runtime.placement import plan_placement
from clpd_ray.workload import build_workload

# --------------------------------------------------------------------- the rule (no Ray)


def test_gpu_bundles_when_the_cluster_has_a_gpu_per_actor(tiny_config):
    p = plan_placement(tiny_config("cluster.gpus_per_actor=1"), {"CPU": 16, "GPU": 4})
    assert p.use_gpu and "GPU bundles" in p.why
    assert p.bundles() == [{"CPU": 1.0, "GPU": 1.0}] * 4 + [{"CPU": 1.0}]
    assert p.runs_that_fit({"CPU": 16, "GPU": 8}) == 2


def test_cpu_bundles_when_asked_or_when_the_cluster_has_no_gpu(tiny_config):
    asked = plan_placement(tiny_config("cluster.gpus_per_actor=0"), {"CPU": 2, "GPU": 3})
    assert not asked.use_gpu and "gpus_per_actor is 0" in asked.why
    none = plan_placement(tiny_config("cluster.gpus_per_actor=1"), {"CPU": 2})
    assert not none.use_gpu and "the cluster has no GPUs" in none.why
    # 2 CPUs over 5 actors: 0.2 each, so two runs fit.
    assert none.bundles() == [{"CPU": 0.2}] * 5
    assert none.runs_that_fit({"CPU": 2}) == 2


def test_too_few_gpus_is_an_error_not_a_silent_cpu_run(tiny_config):
    # 3 teachers + student at 1 GPU each need 4; the cluster has 3.
    with pytest.raises(ClusterError) as err:
        plan_placement(tiny_config("cluster.gpus_per_actor=1"), {"CPU": 8, "GPU": 3})
    msg = str(err.value)
    assert "needs 4 GPUs" in msg and "has 3" in msg
    assert "cluster.gpus_per_actor: 0.75" in msg  # the largest share that fits
    assert "0.5" in msg and "cluster.gpus_per_actor: 0 to run on CPUs" in msg
    # Shares that fit are accepted.
    half = plan_placement(tiny_config("cluster.gpus_per_actor=0.5"), {"CPU": 8, "GPU": 3})
    assert half.use_gpu and half.bundle("teacher_slot")["GPU"] == 0.5


def test_slot_resources_join_the_bundles(tiny_config):
    res = {"CPU": 8, "GPU": 4, "teacher_slot": 3, "student_slot": 1}
    p = plan_placement(tiny_config("cluster.gpus_per_actor=1"), res)
    assert p.bundles()[0] == {"CPU": 1.0, "GPU": 1.0, "teacher_slot": 1}
    assert p.bundles()[3] == {"CPU": 1.0, "GPU": 1.0, "student_slot": 1}
    assert p.bundles()[4] == {"CPU": 1.0}  # the scheduler goes anywhere


def test_an_sft_run_places_no_teacher(tiny_config):
    """distill.objective: sft trains without a teacher: its GPUs are not held for one."""
    p = plan_placement(
        tiny_config("cluster.gpus_per_actor=1", "distill.objective=sft"), {"CPU": 4, "GPU": 1}
    )
    assert p.teacher_actors == 0 and "no teacher actors" in p.why
    assert p.bundles() == [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0}]  # student, scheduler
    assert (p.student_bundle, p.scheduler_bundle) == (0, 1)


# --------------------------------------------------------------------- on Ray


@pytest.mark.ray
def test_each_teacher_and_the_student_own_a_distinct_gpu(ray_cluster, tiny_config):
    # The session cluster declares 3 logical GPUs: 2 teachers + the student fit one each.
    config = tiny_config(
        teachers={"ladder": TINY_LADDER[:2]},
        curriculum={"num_stages": 2},
        cluster={"gpus_per_actor": 1},
    )
    workload = build_workload(config, progress=False)
    launcher = Launcher(
        config,
        [str(e.path) for e in workload.ladder],
        str(workload.tokenizer_dir),
        run_id="placement",
    )
    assert launcher.use_gpu
    try:
        actors = launcher.start("clpd", None)
        teacher_gpus = ray.get([t.gpu_ids.remote() for t in actors.teachers])
        student_gpus = ray.get(actors.student.gpu_ids.remote())
        owned = [*teacher_gpus, student_gpus]
        assert all(len(g) == 1 for g in owned), owned
        assert len({g[0] for g in owned}) == 3, owned
        # Named in the clpd namespace, as the dashboard shows them, unique to the run.
        named = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
        expected = {"teacher-t0", "teacher-t1", "student", "scheduler"}
        assert {f"{n}-placement" for n in expected} <= named
        assert launcher.pg_name == "clpd-placement"
        assert "TeacherService(t0" in repr(
            ray.get(actors.teachers[0].__ray_call__.remote(lambda self: repr(self)))
        )
        # The header's view: the same GPUs, the device each actor computes on.
        places = {p.name: p for p in launcher.locate()}
        assert places["student-placement"].gpu_ids == tuple(student_gpus)
        assert places["scheduler-placement"].gpu_ids == ()
        assert {p.device for p in places.values()} <= {"cpu", "cuda:0"}
        text = format_header(
            run_id="placement",
            run_dir="/tmp/r",
            address=None,
            dashboard=None,
            placement=launcher.placement,
            places=list(places.values()),
        )
        assert "GPU bundles" in text and "teacher-t1-placement" in text
        assert f"GPU {student_gpus[0]}" in text
    finally:
        launcher.shutdown()
