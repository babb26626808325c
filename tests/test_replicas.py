"""Teacher replicas (``teachers.ladder[].replicas``): the pool's load balancing and the bundles
(no Ray), and on Ray a replica dead for good replaced under its name. (A run whose replicated
teacher loses a replica to SIGKILL mid-run, ending with the student of the run with one replica:
test_faults.py's killed-actors test.)"""

from __future__ import annotations

import pytest
from conftest import TINY_LADDER

from clpd_ray.config import config_from_dict
from clpd_ray.errors import ClusterError, ConfigError
from clpd_ray.runtime.actors.launcher import Launcher
from clpd_ray.runtime.placement import plan_placement
from clpd_ray.runtime.teacher_pool import TeacherPool, merge_stats

# --------------------------------------------------------------------- the pool (no Ray)


class _Ref:
    def __init__(self, replica: int, method: str, args: tuple, options: dict):
        self.replica, self.method, self.args, self.options = replica, method, args, options


class _FakeMethod:
    def __init__(self, replica: int, name: str, options: dict | None = None):
        self.replica, self.name, self.opts = replica, name, options or {}

    def options(self, **options):
        return _FakeMethod(self.replica, self.name, {**self.opts, **options})

    def remote(self, *args):
        n = self.opts.get("num_returns", 1)
        refs = [_Ref(self.replica, self.name, args, self.opts) for _ in range(n)]
        return refs if n > 1 else refs[0]


class _FakeHandle:
    def __init__(self, replica: int):
        self.replica = replica

    def __getattr__(self, name):
        return _FakeMethod(self.replica, name)


def _pool(n: int):
    finished: set[int] = set()

    def done(refs):
        return [r for r in refs if id(r) in finished]

    pool = TeacherPool("teacher-t-x", [_FakeHandle(r) for r in range(n)], done=done)
    return pool, finished


def test_idle_replicas_take_requests_in_turn():
    pool, _ = _pool(3)
    refs = [pool.targets.remote(f"batch-{j}") for j in range(6)]
    assert [r.replica for r in refs] == [0, 1, 2, 0, 1, 2]
    assert [r.args for r in refs] == [(f"batch-{j}",) for j in range(6)]
    assert pool.sent == [2, 2, 2] and pool.load() == [2, 2, 2]


def test_the_least_loaded_replica_gets_the_next_request():
    pool, finished = _pool(2)
    a, b, c = (pool.targets.remote(j) for j in range(3))  # 0, 1, 0: replica 0 holds two
    assert (a.replica, b.replica, c.replica) == (0, 1, 0)
    assert pool.targets.remote(3).replica == 1  # 2 vs 1 outstanding
    finished.update({id(a), id(c)})  # replica 0 answered both: now 0 vs 2
    assert pool.load() == [0, 2]
    assert [pool.precompute.remote(j).replica for j in range(2)] == [0, 0]
    assert pool.load() == [2, 2]
    left = pool.outstanding()
    assert len(left) == 4 and id(b) in {id(r) for r in left}
    assert not {id(r) for r in left} & finished


def test_options_reach_the_replica_and_multi_return_calls_count_once():
    pool, _ = _pool(2)
    generated, counts = pool.generate.options(num_returns=2).remote("batch", "settings")
    assert generated.options == {"num_returns": 2} and generated.args == ("batch", "settings")
    assert generated.replica == counts.replica == 0
    assert pool.load() == [1, 0]
    assert pool.evaluate.remote("examples").replica == 1


def test_a_replaced_replica_starts_with_nothing_outstanding():
    pool, _ = _pool(2)
    for j in range(4):
        pool.targets.remote(j)
    pool.replace(1, _FakeHandle(7))
    assert pool.load() == [2, 0]
    assert pool.targets.remote("next").replica == 7


def test_the_pool_is_not_mistaken_for_a_picklable_handle():
    pool, _ = _pool(1)
    with pytest.raises(AttributeError):
        pool._private  # noqa: B018  (only the actor's methods are forwarded)
    assert pool.__ray_call__.remote(len).method == "__ray_call__"


def test_stats_are_summed_over_replicas():
    one = {"name": "t1", "busy_s": 1.5, "bytes_sent": 10, "tokens_sent": 4, "parameters": 99}
    two = {**one, "busy_s": 0.5, "bytes_sent": 6, "tokens_sent": 2}
    stores = [{"hits": 3, "misses": 2, "ahead": 0}, {"hits": 1, "misses": 4, "ahead": 5}]
    merged = merge_stats([{**one, "target_store": stores[0]}, {**two, "target_store": stores[1]}])
    assert merged["busy_s"] == 2.0 and merged["bytes_sent"] == 16 and merged["tokens_sent"] == 6
    assert merged["target_store"] == {"ahead": 5, "hits": 4, "misses": 6}
    assert merged["parameters"] == 99 and merged["name"] == "t1"
    assert merged["replicas"] == 2 and merged["replica_busy_s"] == [1.5, 0.5]
    assert merge_stats([one]) == one  # one replica: its own stats, unchanged


# --------------------------------------------------------------------- config and bundles


def _ladder(replicas: list[int]) -> list[dict]:
    """The first len(replicas) rungs of the tiny ladder, with these replica counts."""
    return [
        {**t, "replicas": r} for t, r in zip(TINY_LADDER[: len(replicas)], replicas, strict=True)
    ]


def test_replicas_default_to_one_and_must_be_positive(tiny_config):
    assert [t.replicas for t in tiny_config().teachers.ladder] == [1, 1, 1]
    raw = tiny_config().to_dict()
    raw["teachers"]["ladder"][2]["replicas"] = 0
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, "test")
    assert "replicas" in str(err.value)


def test_replicas_do_not_change_the_trained_teacher(tiny_config):
    from clpd_ray.distill.ladder import _spec_key

    one, two = (tiny_config(teachers={"ladder": _ladder([1, 1, r])}) for r in (1, 2))
    assert _spec_key(one.teachers.ladder[2]) == _spec_key(two.teachers.ladder[2])


def test_each_replica_gets_a_bundle_of_its_own(tiny_config):
    config = tiny_config("cluster.gpus_per_actor=1", teachers={"ladder": _ladder([1, 1, 2])})
    p = plan_placement(config, {"CPU": 16, "GPU": 5})
    assert p.teacher_actors == 4 and p.replicas == (1, 1, 2)
    assert p.bundles() == [{"CPU": 1.0, "GPU": 1.0}] * 5 + [{"CPU": 1.0}]
    assert [p.teacher_bundle(2, r) for r in (0, 1)] == [2, 3]
    assert (p.student_bundle, p.scheduler_bundle) == (4, 5)
    assert "per teacher replica" in p.why
    assert p.runs_that_fit({"CPU": 16, "GPU": 10}) == 2
    with pytest.raises(IndexError):
        p.teacher_bundle(1, 1)
    with pytest.raises(ClusterError) as err:  # 4 teacher actors + the student need 5 GPUs
        plan_placement(config, {"CPU": 16, "GPU": 4})
    assert "needs 5 GPUs" in str(err.value) and "teachers.ladder[].replicas" in str(err.value)


def test_replica_names_are_readable_and_unique(tiny_config):
    config = tiny_config(teachers={"ladder": _ladder([1, 3, 1])})
    launcher = Launcher(
        config, ["a", "b", "c"], "tok", run_id="abc", placement=plan_placement(config, {"CPU": 4})
    )
    assert launcher.teacher_names(1) == ["teacher-t1-abc", "teacher-t1-r1-abc", "teacher-t1-r2-abc"]
    assert launcher.teacher_names(0) == ["teacher-t0-abc"]


# --------------------------------------------------------------------- on Ray


@pytest.mark.ray
@pytest.mark.slow
def test_a_replica_dead_for_good_is_replaced_and_release_stops_all(ray_cluster, tiny_config):
    """A replica killed for good (no restart left) is replaced under its name while the other
    keeps serving; releasing the teacher stops both replicas once their requests are answered."""
    import time

    import ray

    from clpd_ray.runtime.recovery import wait_for_restarts
    from clpd_ray.workload import build_workload

    config = tiny_config(teachers={"ladder": _ladder([2, 1, 1]), "resident": "needed"})
    workload = build_workload(config, progress=False)
    launcher = Launcher(
        config, [str(e.path) for e in workload.ladder], str(workload.tokenizer_dir), run_id="rep"
    )
    try:
        launcher.start("clpd", None)
        pool = launcher.teacher(0)
        assert ray.get(pool.ping.remote(), timeout=120) == ["t0", "t0"]  # both answer
        places = {p.name for p in launcher.locate(timeout_s=120)}
        assert {"teacher-t0-rep", "teacher-t0-r1-rep"} <= places
        keep, lost = pool.replicas
        ray.kill(lost, no_restart=True)  # dead for good, as when its restarts ran out
        wait_for_restarts(launcher)  # the pool's ping fails: the lost replica is replaced
        assert launcher.teacher(0) is pool and pool.replicas[0] is keep
        assert pool.replicas[1] is not lost
        assert ray.get(pool.ping.remote(), timeout=120) == ["t0", "t0"]
        assert ray.get_actor("teacher-t0-r1-rep", namespace="clpd") is not None

        busy = [pool.__ray_call__.remote(lambda self: (time.sleep(1.0), self.name)[1])]
        busy.append(pool.__ray_call__.remote(lambda self: (time.sleep(1.0), self.name)[1]))
        assert pool.load() == [1, 1]  # one on each replica
        launcher.release_teacher(0)  # no refs given: the pool's own outstanding ones count
        assert launcher.reap() == 1
        assert ray.get(busy, timeout=60) == ["t0", "t0"]
        assert launcher.reap() == 0
        deadline = time.monotonic() + 30
        alive = list(pool.replicas)
        while alive and time.monotonic() < deadline:
            for h in list(alive):
                try:
                    ray.get(h.ping.remote(), timeout=10)
                except ray.exceptions.RayActorError:
                    alive.remove(h)
            time.sleep(0.2)
        assert not alive, "released replicas still answer"
    finally:
        launcher.shutdown()
