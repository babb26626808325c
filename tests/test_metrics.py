"""RunMetrics: values recorded in an actor reach the node's Prometheus endpoint; no-op without Ray."""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
import uuid

import pytest

from clpd_ray.errors import ClpdError
from clpd_ray.runtime.metrics import RunMetrics, metrics_export_urls, scrape

POLL_TIMEOUT_S = 40.0
POLL_EVERY_S = 2.0
# Ray evicts a gauge series ~2 export intervals (2 x 10 s) after its last export.
RAY_GAUGE_TTL_S = 20.0


def _recorder_actor(ray, run: str):
    """A stand-in actor that records what the student, scheduler and a teacher would.

    Defined in a function, not at module level: workers cannot import the test module, so Ray must
    pickle the class by value (cloudpickle does that for classes local to a function).
    """

    class Recorder:
        def __init__(self, run: str) -> None:
            self.metrics = RunMetrics(run)

        def record(self) -> bool:
            self.metrics.student_step(loss=1.25, tokens_per_s=512.0, lr=3e-4)
            self.metrics.student_step(loss=0.75, tokens_per_s=640.0, lr=2e-4)
            self.metrics.schedule(stage=0, teacher=0, teacher_name="small")
            self.metrics.schedule(stage=2, teacher=1, teacher_name="medium")
            self.metrics.teacher_latency("medium", seconds=0.02, tokens=100)
            self.metrics.teacher_latency("medium", seconds=0.3, tokens=50)
            return self.metrics.active

    return ray.remote(Recorder).options(num_cpus=0).remote(run)


def _expected(run: str) -> dict[str, float]:
    r = f'run="{run}"'
    rt = f'run="{run}",teacher="medium"'
    return {
        f"ray_clpd_student_loss{{{r}}}": 0.75,
        f"ray_clpd_tokens_per_s{{{r}}}": 640.0,
        f"ray_clpd_learning_rate{{{r}}}": 2e-4,
        f"ray_clpd_student_steps_total{{{r}}}": 2.0,
        f"ray_clpd_stage{{{r}}}": 2.0,
        f"ray_clpd_teacher{{{r}}}": 1.0,
        f"ray_clpd_teacher_active{{{rt}}}": 1.0,
        f"ray_clpd_teacher_latency_seconds_count{{{rt}}}": 2.0,
        f"ray_clpd_teacher_tokens_total{{{rt}}}": 150.0,
    }


def _scrape_all(urls: list[str]) -> dict[str, float]:
    values: dict[str, float] = {}
    for url in urls:
        values.update(scrape(url))
    return values


def _missing(values: dict[str, float], expected: dict[str, float]) -> list[str]:
    return [k for k, v in expected.items() if k not in values or values[k] != pytest.approx(v)]


def _poll(urls: list[str], expected: dict[str, float]) -> tuple[dict[str, float], float]:
    """Scrape every POLL_EVERY_S until `expected` is all there; return the values and the wait."""
    start = time.monotonic()
    while True:
        values = _scrape_all(urls)
        missing = _missing(values, expected)
        waited = time.monotonic() - start
        if not missing:
            return values, waited
        if waited > POLL_TIMEOUT_S:
            seen = {k: v for k, v in values.items() if k.split("{")[0] in str(expected)}
            pytest.fail(f"after {waited:.0f}s missing or wrong: {missing}; scraped: {seen}")
        time.sleep(POLL_EVERY_S)


def _bucket(values: dict[str, float], run: str, le: float) -> float | None:
    """Cumulative count of the `medium` latency histogram at bound `le` (label-format agnostic)."""
    head = "ray_clpd_teacher_latency_seconds_bucket{"
    for key, value in values.items():
        if key.startswith(head) and f'run="{run}"' in key and 'teacher="medium"' in key:
            bound = key.split('le="', 1)[1].split('"', 1)[0]
            if float(bound) == le:
                return value
    return None


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.waits  # ~30 s of sleep past Ray's gauge expiry
def test_actor_metrics_reach_prometheus_and_gauges_outlive_rays_ttl(ray_cluster):
    run = f"test-{uuid.uuid4().hex[:8]}"
    actor = _recorder_actor(ray_cluster, run)
    try:
        assert ray_cluster.get(actor.record.remote(), timeout=60) is True
        recorded = time.monotonic()
        urls = metrics_export_urls()
        assert urls and all(u.startswith("http://") and u.endswith("/metrics") for u in urls)

        values, waited = _poll(urls, _expected(run))
        print(f"metrics visible after {waited:.1f}s")

        # 0.02 s falls in le=0.025, 0.3 s in le=0.5; buckets are cumulative.
        assert _bucket(values, run, 0.01) == 0.0
        assert _bucket(values, run, 0.025) == 1.0
        assert _bucket(values, run, 0.5) == 2.0
        # Ray computes _sum from bucket midpoints: only bounds by bucket hold.
        total = values[f'ray_clpd_teacher_latency_seconds_sum{{run="{run}",teacher="medium"}}']
        assert 0.01 + 0.25 <= total <= 0.025 + 0.5

        # Without the keep-alive, a gauge set once leaves the endpoint ~20-30 s after it is set.
        time.sleep(max(0.0, recorded + RAY_GAUGE_TTL_S + 12.0 - time.monotonic()))
        values, _ = _poll(urls, _expected(run))
        # The previous teacher was zeroed and dropped from the keep-alive, so it has aged out.
        assert f'ray_clpd_teacher_active{{run="{run}",teacher="small"}}' not in values
    finally:
        ray_cluster.kill(actor)


def test_disabled_run_metrics_is_a_noop():
    m = RunMetrics("r1", enabled=False)
    m.student_step(1.0, 100.0, 1e-3)
    m.schedule(1, 0, "small")
    m.teacher_latency("small", 0.01, 0)
    assert m.active is False
    assert m._instruments is None
    assert m._stop is None  # no keep-alive thread


def test_run_metrics_without_ray_is_a_noop_and_does_not_start_ray():
    # A fresh interpreter: the session's Ray cluster may already be up in this one.
    code = (
        "import ray\n"
        "from clpd_ray.runtime.metrics import RunMetrics\n"
        "m = RunMetrics('r1')\n"
        "m.student_step(1.0, 100.0, 1e-3)\n"
        "m.schedule(1, 0, 'small')\n"
        "m.teacher_latency('small', 0.01, 5)\n"
        "assert not m.active and m._instruments is None\n"
        "assert not ray.is_initialized()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_run_metrics_pickles_without_process_state():
    m = RunMetrics("r1", keepalive_s=2.0)
    m._instruments = {"loss": object()}  # stands in for process-bound Ray handles
    clone = pickle.loads(pickle.dumps(m))
    assert (clone.run, clone.enabled, clone.keepalive_s) == ("r1", True, 2.0)
    assert clone._instruments is None and clone._gauges == {} and clone._stop is None


@pytest.mark.parametrize("bad", ["", None, 3])
def test_run_id_must_be_a_non_empty_string(bad):
    with pytest.raises(ClpdError, match="run id"):
        RunMetrics(bad)
