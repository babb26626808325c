"""GPU placement with logical GPUs: each teacher and the student get a distinct GPU."""

from __future__ import annotations

import pytest
import ray
from conftest import TINY_LADDER

from clpd_ray.runtime.actors.launcher import Launcher
from clpd_ray.workload import build_workload

pytestmark = pytest.mark.ray


def test_each_teacher_and_the_student_own_a_distinct_gpu(ray_cluster, tiny_config):
    # The session cluster declares 3 logical GPUs: 2 teachers + the student fit one each.

    config = tiny_config(teachers={"ladder": TINY_LADDER[:2]}, curriculum={"num_stages": 2})
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
        # Named in the clpd namespace, as the dashboard shows them.
        named = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
        assert {"teacher-t0", "teacher-t1", "student", "scheduler"} <= named
        assert "TeacherService(t0" in repr(
            ray.get(actors.teachers[0].__ray_call__.remote(lambda self: repr(self)))
        )
    finally:
        launcher.shutdown()
