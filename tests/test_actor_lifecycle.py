"""Actor lifecycle: a released teacher finishes its queued requests, an ``__init__`` that raises is
reported once (name, input, cause) instead of restarting forever, reprs survive half-built actors,
and weights load strictly (tied weights included)."""

from __future__ import annotations

import time

import pytest
import torch

from clpd_ray.data.tokenizer import build_char_tokenizer
from clpd_ray.distill.models import make_model
from clpd_ray.distill.state import load_state_strict
from clpd_ray.errors import ActorInitError, ModelLoadError
from clpd_ray.runtime.actors.scheduler import SchedulerService
from clpd_ray.runtime.actors.student import StudentTrainer, _untie
from clpd_ray.runtime.actors.teacher import TeacherService

# --------------------------------------------------------------------- fast, no Ray


@pytest.mark.parametrize("cls", [TeacherService, StudentTrainer, SchedulerService])
def test_repr_of_a_half_built_actor_does_not_raise(cls):
    # Ray calls repr on the instance when __init__ raised; an AttributeError there crashed the
    # worker, and Ray restarted it forever.
    text = repr(object.__new__(cls))
    assert text.startswith(cls.__name__) and "?" in text


def _tiny_student(tiny_config, seed: int):
    return make_model(tiny_config().student, build_char_tokenizer(), seed=seed)


def test_strict_load_restores_a_checkpoint_with_tied_weights(tiny_config):
    a, b = _tiny_student(tiny_config, 0), _tiny_student(tiny_config, 1)
    full = {k: v.detach().clone() for k, v in a.state_dict().items()}
    stored = _untie(dict(a.state_dict()))  # as checkpoints store it: tied weights once
    assert len(stored) < len(full)  # the tiny GPT-2 ties lm_head to the embeddings
    load_state_strict(b, stored, what="checkpoint x")
    for k, v in b.state_dict().items():
        torch.testing.assert_close(v, full[k])


def test_strict_load_names_missing_unexpected_and_misshaped_keys(tiny_config):
    model = _tiny_student(tiny_config, 0)
    state = dict(model.state_dict())
    missing = next(k for k in state if k.endswith("ln_f.weight"))
    with pytest.raises(
        ModelLoadError, match=rf"checkpoint x does not match .*missing 1: {missing}"
    ):
        load_state_strict(
            model, {k: v for k, v in state.items() if k != missing}, what="checkpoint x"
        )
    with pytest.raises(ModelLoadError, match=r"unexpected 1: extra\.weight"):
        load_state_strict(model, {**state, "extra.weight": torch.zeros(1)}, what="checkpoint x")
    with pytest.raises(ModelLoadError, match=rf"shape 1: {missing} \(3,\)"):
        load_state_strict(model, {**state, missing: torch.zeros(3)}, what="checkpoint x")


_UNPICKLE = """
import sys
from ray import cloudpickle
shipped = cloudpickle.loads(sys.stdin.buffer.read())
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print(*(f.__name__ for f in shipped), heavy)
"""


def test_the_scheduler_actor_starts_without_importing_a_model_stack():
    """Ray ships the wrapped actor class by value and the launcher's location query
    (``__ray_call__``) by reference: unpickling them, as the scheduler's process does, must not
    drag in torch or transformers through the launcher (about 5 CPU-seconds per start)."""
    import subprocess
    import sys

    from ray import cloudpickle

    from clpd_ray.runtime.actors.device import actor_location
    from clpd_ray.runtime.actors.init_errors import reporting_init_errors

    wrapped = reporting_init_errors(SchedulerService, "scheduler-x", "policy clpd")
    out = subprocess.run(
        [sys.executable, "-c", _UNPICKLE],
        input=cloudpickle.dumps((wrapped, actor_location)),
        capture_output=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().split() == ["SchedulerService", "actor_location", "[]"]


# --------------------------------------------------------------------- on Ray


def _launcher(tiny_config, run_id: str, teacher_dirs=None):
    from clpd_ray.runtime.actors.launcher import Launcher
    from clpd_ray.workload import build_workload

    config = tiny_config(teachers={"resident": "needed"})
    workload = build_workload(config, progress=False)
    dirs = teacher_dirs or [str(e.path) for e in workload.ladder]
    return Launcher(config, dirs, str(workload.tokenizer_dir), run_id=run_id)


def _stops(handle, timeout_s: float = 30.0) -> bool:
    """True once the actor answers no more (ray.kill takes effect asynchronously)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(handle.ping.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.ray
def test_a_released_teacher_finishes_its_queued_requests_first(ray_cluster, tiny_config):
    import ray

    launcher = _launcher(tiny_config, "release")
    try:
        actors = launcher.start("clpd", None)
        t = launcher.teacher(0)
        # A slow request, and three queued behind it (a teacher runs one request at a time).
        slow = t.__ray_call__.remote(lambda self: (time.sleep(1.5), self.name)[1])
        queued = [t.ping.remote() for _ in range(3)]
        launcher.release_teacher(0, pending=[slow, *queued])
        assert actors.teachers[0] is None
        assert launcher.reap() == 1  # returned at once: the teacher is still answering
        assert ray.get([slow, *queued], timeout=60) == ["t0"] * 4
        assert launcher.reap() == 0  # all answered: now it is stopped
        assert _stops(t)

        # Released while busy, then needed again: the same live actor comes back.
        t1 = launcher.teacher(1)
        busy = t1.__ray_call__.remote(lambda self: (time.sleep(1.0), self.name)[1])
        launcher.release_teacher(1, pending=[busy])
        assert launcher.teacher(1) is t1
        assert ray.get(busy, timeout=60) == "t1"
        assert launcher.reap() == 0
        assert ray.get(t1.ping.remote(), timeout=30) == "t1"
    finally:
        launcher.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_a_teacher_that_cannot_load_stops_the_run_with_its_name_path_and_cause(
    ray_cluster, tiny_config, tmp_path
):
    import ray

    missing = str(tmp_path / "no-such-model")
    launcher = _launcher(tiny_config, "badload", teacher_dirs=[missing] * 3)
    try:
        launcher.start("clpd", None)
        teacher = launcher.teacher(0)
        with pytest.raises(ActorInitError) as err:
            launcher.locate(timeout_s=120)
        msg = str(err.value)
        assert msg.startswith(f"teacher-t0-badload (model {missing}) failed to start: "), msg
        # Ray keeps the error's text in the actor's death: the executor's unwrap reads it there,
        # and is_recoverable says no (an __init__ failure): no restart loop.
        with pytest.raises(ray.exceptions.ActorDiedError) as died:
            ray.get(teacher.ping.remote(), timeout=60)
        assert died.value.actor_init_failed
        assert "clpd_ray.errors.ActorInitError: teacher-t0-badload" in str(died.value)
    finally:
        launcher.shutdown()
