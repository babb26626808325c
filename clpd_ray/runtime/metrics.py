"""Run metrics: Prometheus instruments the actors record through, and helpers to find and read them.

Each actor (and the driver) holds one :class:`RunMetrics` and calls it at the points that matter::

    student   --student_step(loss, tokens_per_s, lr,  clpd_student_loss, clpd_tokens_per_s,
                  kd_loss=, ce_loss=, target_bytes=)-->  clpd_learning_rate, clpd_student_steps,
                                                         clpd_kd_loss, clpd_ce_loss, clpd_target_bytes
    scheduler --schedule(stage, teacher, name,           clpd_stage, clpd_teacher, clpd_teacher_active,
                         reason=)------------------->    clpd_decisions (on a change)
    student   --probe(results, teacher_names)-------->   clpd_probe_accuracy, clpd_probe_loss, clpd_probe_kl
    teacher   --teacher_latency(name, seconds, tokens)-> clpd_teacher_latency_seconds, clpd_teacher_tokens
    driver    --recoveries(count)-------------------->   clpd_recoveries

Names as exported. Ray prefixes every custom metric with ``ray_`` and Prometheus gives counters a
``_total`` suffix and histograms ``_bucket``/``_sum``/``_count`` series, so a scrape shows
``ray_clpd_student_loss``, ``ray_clpd_student_steps_total``, ``ray_clpd_teacher_tokens_total`` and
``ray_clpd_teacher_latency_seconds_bucket{le="..."}``. Ray also adds its own labels (``WorkerId``,
``NodeAddress``, ``SessionName``, ...); :func:`scrape` drops those.

Tags. Every instrument carries ``run`` (the run id given to the constructor), so several runs on one
cluster stay apart in PromQL (``ray_clpd_student_loss{run="..."}``); the teacher instruments also
carry ``teacher`` (the teacher's name). ``clpd_teacher`` is the ladder index with only ``run``, so
it stays one series; ``clpd_teacher_active{teacher=...}`` names the teacher: 1 for the current one,
0 for the previous one until Ray evicts that series (~20 s after the switch). ``clpd_decisions``
counts the decisions that changed the stage or the teacher, tagged ``stage``, ``teacher`` and
``reason`` (the policy's text, cut to 120 characters): a new series appears at each switch, which
is what the Grafana dashboard's annotations show. ``clpd_target_bytes`` counts the bytes of teacher
targets (top-k log-probs + ids) the student received, per ``teacher``; the probe gauges carry
``stage`` (and ``teacher`` for the KL).

Delay. Values reach the node's export endpoint (``http://<node>:<MetricsExportPort>/metrics``)
about 10 s after they are recorded (Ray's export interval), so poll rather than read once. The
endpoint answers without Ray's auth token: keep the port firewalled.

Keep-alive. Ray exports a gauge only in the export interval in which it was set, and the node
agent evicts a gauge series about 2 intervals (~20 s) after it was last exported. A stage set once
would vanish from the endpoint 20-30 s later, so each active ``RunMetrics`` runs a daemon thread
that re-sets its last gauge values every ``keepalive_s`` seconds (default 5); :meth:`RunMetrics.close`
stops it, and the series then age out. Counters and histograms are cumulative and never expire.
Ray computes a histogram's ``_sum`` from bucket midpoints, so ``_sum / _count`` is approximate; use
``histogram_quantile`` over the buckets.

Without Ray. The module does not import Ray at import time, and instruments are created on first
use only while ``ray.is_initialized()``; otherwise (or with ``enabled=False``) every method is a
no-op, which keeps the actor classes unit-testable in-process. See docs/observability.md.
"""

from __future__ import annotations

import sys
import threading
import urllib.request
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from clpd_ray.errors import ClpdError

__all__ = [
    "LATENCY_BOUNDARIES_S",
    "RunMetrics",
    "metrics_export_urls",
    "scrape",
]

# Teacher forward passes range from a few ms (tiny models, short batches) to seconds (large
# teachers, long sequences); roughly 1-2.5-5 steps per decade keep p50/p95 readable across both.
LATENCY_BOUNDARIES_S: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

_REASON_CHARS = 120  # a decision's reason as a label: one line, bounded

# Labels Ray adds to every exported sample; they identify the process, not the run.
_RAY_LABELS = frozenset({"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "JobId"})
_ADDITIVE_TYPES = frozenset({"counter", "histogram", "summary"})


class RunMetrics:
    """Records one run's training, scheduling and teacher metrics as Ray custom metrics.

    Cheap to construct and picklable (instruments and the keep-alive thread are rebuilt lazily in
    the receiving process). Every method is a no-op when ``enabled=False`` or when Ray is not
    initialised in this process.

    Args:
        run: the run id, the ``run`` tag of every series.
        enabled: ``False`` makes every method a no-op even under Ray.
        keepalive_s: how often the last gauge values are re-set so Ray does not evict them
            (it does ~20 s after the last set); ``0`` disables the thread.
    """

    def __init__(self, run: str, *, enabled: bool = True, keepalive_s: float = 5.0) -> None:
        if not isinstance(run, str) or not run:
            raise ClpdError(
                f"metrics run id must be a non-empty string, got {run!r}; "
                "pass the run's id (e.g. the run directory's name)"
            )
        self.run = run
        self.enabled = enabled
        self.keepalive_s = keepalive_s
        self._reset()

    def _reset(self) -> None:
        self._instruments: dict[str, Any] | None = None
        # Last value of every gauge series, re-set by the keep-alive thread: (instrument, tags) -> value.
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        # Held around every gauge set and the keep-alive's re-set so a stale value never lands last.
        self._lock = threading.Lock()
        self._stop: threading.Event | None = None
        self._active_teacher: str | None = None
        self._last_decision: tuple[int, str] | None = None  # (stage, teacher) last counted

    def __repr__(self) -> str:
        return f"RunMetrics(run={self.run!r}, enabled={self.enabled})"

    def __getstate__(self) -> dict[str, Any]:
        # Ray metric handles and the thread belong to one process; the receiver makes its own.
        return {"run": self.run, "enabled": self.enabled, "keepalive_s": self.keepalive_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.run = state["run"]
        self.enabled = state["enabled"]
        self.keepalive_s = state["keepalive_s"]
        self._reset()

    def close(self) -> None:
        """Stop re-setting gauges; their series leave the endpoint ~20 s later. Recording may resume."""
        if self._stop is not None:
            self._stop.set()
        with self._lock:
            self._gauges.clear()
            self._instruments = None
            self._stop = None

    @property
    def active(self) -> bool:
        """Whether recording reaches Ray (enabled and Ray initialised in this process)."""
        # A process that never imported Ray cannot have initialised it: skip the (slow) import.
        ray = sys.modules.get("ray")
        return self.enabled and ray is not None and ray.is_initialized()

    # -- recording -------------------------------------------------------------------------------

    def student_step(
        self,
        loss: float,
        tokens_per_s: float,
        lr: float,
        *,
        kd_loss: float | None = None,
        ce_loss: float | None = None,
        target_bytes: Mapping[str, int] | None = None,
        steps: int = 1,
    ) -> None:
        """``steps`` optimiser steps of the student (one call's): the latest loss (and its KD and
        CE parts), throughput, learning rate, and the bytes of teacher targets it received
        (``{teacher: bytes}``)."""
        m = self._get()
        if m is None:
            return
        tags = {"run": self.run}
        self._set_gauge(m, "loss", float(loss), tags)
        self._set_gauge(m, "tokens_per_s", float(tokens_per_s), tags)
        self._set_gauge(m, "lr", float(lr), tags)
        if kd_loss is not None:
            self._set_gauge(m, "kd_loss", float(kd_loss), tags)
        if ce_loss is not None:
            self._set_gauge(m, "ce_loss", float(ce_loss), tags)
        m["steps"].inc(float(steps), tags=tags)
        for teacher, nbytes in (target_bytes or {}).items():
            if nbytes > 0:  # Ray counters reject increments <= 0
                m["target_bytes"].inc(
                    float(nbytes), tags={"run": self.run, "teacher": str(teacher)}
                )

    def schedule(
        self, stage: int, teacher: int, teacher_name: str, reason: str | None = None
    ) -> None:
        """The scheduler's current curriculum stage and teacher (ladder index and name);
        ``reason``: the decision's reason, counted in ``clpd_decisions`` when stage or teacher
        changed."""
        m = self._get()
        if m is None:
            return
        tags = {"run": self.run}
        self._set_gauge(m, "stage", float(stage), tags)
        self._set_gauge(m, "teacher", float(teacher), tags)
        name = str(teacher_name)
        if (int(stage), name) != self._last_decision:
            self._last_decision = (int(stage), name)
            why = " ".join(str(reason or "").split())[:_REASON_CHARS]
            m["decisions"].inc(
                1.0,
                tags={"run": self.run, "stage": str(int(stage)), "teacher": name, "reason": why},
            )
        previous = self._active_teacher
        if name != previous:
            if previous is not None:
                # Zero the previous teacher once and stop refreshing it: it reads 0 until Ray
                # evicts it, so at any time exactly one series of the state set reads 1.
                old = {"run": self.run, "teacher": previous}
                self._set_gauge(m, "teacher_active", 0.0, old, keep=False)
            self._active_teacher = name
        self._set_gauge(m, "teacher_active", 1.0, {"run": self.run, "teacher": name})

    def teacher_latency(self, teacher: str, seconds: float, tokens: int) -> None:
        """One teacher call: wall time in seconds and the number of tokens it scored."""
        m = self._get()
        if m is None:
            return
        tags = {"run": self.run, "teacher": str(teacher)}
        m["latency"].observe(float(seconds), tags=tags)
        if tokens > 0:  # Ray counters reject increments <= 0
            m["tokens"].inc(float(tokens), tags=tags)

    def probe(self, results: Sequence[Any], teacher_names: Sequence[str]) -> None:
        """The student measured on each stage's probe set: ``results`` are ProbeResults (``stage``,
        ``loss``, ``accuracy``, ``kl_to_teacher`` per teacher, in ``teacher_names`` order)."""
        m = self._get()
        if m is None:
            return
        for r in results:
            tags = {"run": self.run, "stage": str(int(r.stage))}
            self._set_gauge(m, "probe_accuracy", float(r.accuracy), tags)
            self._set_gauge(m, "probe_loss", float(r.loss), tags)
            for name, kl in zip(teacher_names, r.kl_to_teacher, strict=False):
                self._set_gauge(m, "probe_kl", float(kl), {**tags, "teacher": str(name)})

    def recoveries(self, count: int) -> None:
        """How many times the run has replayed from a checkpoint after a lost actor (the driver
        sets it, 0 at the start, so the series exists before the first failure)."""
        m = self._get()
        if m is None:
            return
        self._set_gauge(m, "recoveries", float(count), {"run": self.run})

    # -- internals -------------------------------------------------------------------------------

    def _get(self) -> dict[str, Any] | None:
        """The instruments, created on first use; None when recording is a no-op."""
        if not self.active:
            return None
        if self._instruments is None:
            self._instruments = _make_instruments()
            if self.keepalive_s > 0:
                self._stop = threading.Event()
                threading.Thread(
                    target=_keepalive,
                    args=(weakref.ref(self), self._stop, self.keepalive_s),
                    name=f"clpd-metrics-keepalive-{self.run}",
                    daemon=True,
                ).start()
        return self._instruments

    def _set_gauge(
        self, m: dict[str, Any], key: str, value: float, tags: dict[str, str], *, keep: bool = True
    ) -> None:
        series = (key, tuple(sorted(tags.items())))
        with self._lock:
            m[key].set(value, tags=tags)
            if keep:
                self._gauges[series] = value
            else:
                self._gauges.pop(series, None)

    def _republish(self) -> None:
        with self._lock:
            m = self._instruments
            if m is None or not self.active:
                return
            for (key, tags), value in self._gauges.items():
                m[key].set(value, tags=dict(tags))


def _keepalive(
    ref: weakref.ReferenceType[RunMetrics], stop: threading.Event, period: float
) -> None:
    """Re-set the owner's gauges every `period` s until stopped or the owner is garbage-collected."""
    while not stop.wait(period):
        owner = ref()
        if owner is None:
            return
        owner._republish()
        del owner  # hold no strong reference while waiting


def _make_instruments() -> dict[str, Any]:
    from ray.util.metrics import Counter, Gauge, Histogram

    run = ("run",)
    run_teacher = ("run", "teacher")
    return {
        "loss": Gauge("clpd_student_loss", "Student training loss at the last step.", run),
        "tokens_per_s": Gauge("clpd_tokens_per_s", "Student training throughput (tokens/s).", run),
        "lr": Gauge("clpd_learning_rate", "Student learning rate at the last step.", run),
        "steps": Counter("clpd_student_steps", "Student optimiser steps taken.", run),
        "stage": Gauge("clpd_stage", "Current curriculum stage (0 = easiest).", run),
        "teacher": Gauge("clpd_teacher", "Current teacher's index in the ladder.", run),
        "teacher_active": Gauge(
            "clpd_teacher_active", "1 for the current teacher, 0 for earlier ones.", run_teacher
        ),
        "latency": Histogram(
            "clpd_teacher_latency_seconds",
            "Wall time of one teacher call (seconds).",
            boundaries=list(LATENCY_BOUNDARIES_S),
            tag_keys=run_teacher,
        ),
        "tokens": Counter("clpd_teacher_tokens", "Tokens scored by each teacher.", run_teacher),
        "kd_loss": Gauge("clpd_kd_loss", "KD part of the student loss at the last step.", run),
        "ce_loss": Gauge("clpd_ce_loss", "Cross-entropy part of the student loss.", run),
        "target_bytes": Counter(
            "clpd_target_bytes", "Bytes of teacher targets the student received.", run_teacher
        ),
        "decisions": Counter(
            "clpd_decisions",
            "Scheduler decisions that changed the stage or the teacher.",
            ("run", "stage", "teacher", "reason"),
        ),
        "probe_accuracy": Gauge(
            "clpd_probe_accuracy", "Student accuracy on a stage's probe set.", ("run", "stage")
        ),
        "probe_loss": Gauge(
            "clpd_probe_loss", "Student token NLL on a stage's probe set.", ("run", "stage")
        ),
        "probe_kl": Gauge(
            "clpd_probe_kl",
            "KL(teacher || student) on a stage's probe set.",
            ("run", "stage", "teacher"),
        ),
        "recoveries": Gauge(
            "clpd_recoveries", "Replays from a checkpoint after a lost actor.", run
        ),
    }


def metrics_export_urls() -> list[str]:
    """``http://<ip>:<MetricsExportPort>/metrics`` for every alive node of the connected cluster."""
    import ray

    if not ray.is_initialized():
        raise ClpdError(
            "metrics_export_urls() needs a Ray connection; call it after ray.init(...) "
            "(the launcher does this before printing where metrics are)"
        )
    urls = []
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if not node.get("Alive") or not port:
            continue
        host = node["NodeManagerAddress"]
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        urls.append(f"http://{host}:{port}/metrics")
    return urls


def scrape(url: str, *, prefix: str | None = "ray_clpd_", timeout: float = 5.0) -> dict[str, float]:
    """Read one metrics endpoint into ``{'name{label="v",...}': value}``.

    Only samples whose name starts with ``prefix`` are kept (``None`` keeps all). Ray's
    per-process labels and OpenTelemetry scope labels are dropped from the key, so a key reads
    e.g. ``ray_clpd_stage{run="r1"}``; samples that then collide (the same series from several
    workers) are summed for counters and histograms, and the last one wins for gauges.
    """
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode("utf-8")
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        additive = family.type in _ADDITIVE_TYPES
        for sample in family.samples:
            if prefix is not None and not sample.name.startswith(prefix):
                continue
            key = _sample_key(sample.name, sample.labels)
            value = float(sample.value)
            if additive and key in out:
                out[key] += value
            else:
                out[key] = value
    return out


def _sample_key(name: str, labels: dict[str, str]) -> str:
    kept = sorted(
        (k, v) for k, v in labels.items() if k not in _RAY_LABELS and not k.startswith("otel_")
    )
    if not kept:
        return name
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in kept)
    return f"{name}{{{body}}}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
