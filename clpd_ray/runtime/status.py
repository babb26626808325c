"""``clpd status RUN_DIR``: a run's state read from its run directory alone (no Ray).

Everything comes from the files of the run directory (README, "Run directory"), local or
``s3://``: the step and loss from ``metrics.jsonl``, the stage, teacher and reason from
``decisions.jsonl``, the last committed checkpoint, ``resumes.jsonl``, ``summary.json`` and the
lock ``.clpd.lock``. The state is one of:

- ``finished``: ``summary.json`` and the student are written;
- ``running``: a process holds the lock (its pid is checked when it runs on this machine; an
  ``s3://`` lock must have a recent heartbeat);
- ``interrupted``: neither; ``clpd run --resume RUN_DIR`` continues it.

The ETA and busy shares need the ``time`` (unix seconds) that :class:`~clpd_ray.runtime.tracking.
Reporter` stamps on each metrics row; rows without it show no ETA.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

from clpd_ray.errors import RunDirError, StorageError
from clpd_ray.runtime import storage
from clpd_ray.runtime.lock import LOCK_FILE, STALE_S, pid_alive, process_space
from clpd_ray.runtime.rundir import RunDir

__all__ = ["RunStatus", "format_status", "read_status", "watch"]

State = Literal["finished", "running", "interrupted"]
_STEP_DIR = re.compile(r"step-(\d+)$")
_RATE_ROWS = 20  # the ETA uses the rate over the last this many metrics rows


@dataclass(frozen=True)
class RunStatus:
    """What ``clpd status`` prints (see :func:`format_status`)."""

    uri: str
    state: State
    why: str  # how the state was told (the lock's holder, or its absence)
    policy: str
    step: int  # the last logged step (metrics.jsonl)
    total: int
    metrics: dict[str, Any] | None = None  # the last metrics row
    decision: dict[str, Any] | None = None  # the last decisions.jsonl row
    evaluation: dict[str, Any] | None = None  # the last eval.jsonl row
    s_per_step: float | None = None  # over the last rows of this session
    busy: dict[str, float] = field(default_factory=dict)  # actor -> share of wall time busy
    recoveries: int | None = None  # None: not recorded in the rows
    resumes: int = 0
    checkpoint: tuple[int, str] | None = None  # (step, location) of the newest committed one
    summary: dict[str, Any] | None = None
    last_row_age_s: float | None = None

    @property
    def eta_s(self) -> float | None:
        if self.state != "running" or self.s_per_step is None:
            return None
        return max(0, self.total - self.step) * self.s_per_step


# ---------------------------------------------------------------------- reading


def _rows(uri: str, name: str) -> list[dict[str, Any]]:
    """The whole rows of a jsonl file of the run (a line torn mid-write is skipped)."""
    where = storage.join(uri, name)
    if not storage.is_file(where):
        return []
    rows = []
    for line in storage.read_text(where).splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _lock_holder(uri: str) -> dict[str, Any] | None:
    """The lock's holder (host, pid, started, heartbeat, space), ``{}`` while it is being
    written, None when no lock file is there."""
    where = storage.join(uri, LOCK_FILE)
    try:
        if not storage.is_file(where):
            return None
        text = storage.read_text(where)
    except StorageError:  # released between the check and the read
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _state(uri: str, holder: dict[str, Any] | None, now: float) -> tuple[State, str]:
    if holder is None:
        return "interrupted", "no process holds the run directory"
    if not holder:
        return "running", "a process is taking the lock"
    who = f"pid {holder.get('pid')} on host {holder.get('host')}"
    since = f", started {holder['started']}" if holder.get("started") else ""
    if storage.is_s3(uri):
        try:
            age = now - float(holder.get("heartbeat", 0))
        except (TypeError, ValueError):
            age = float("inf")
        if age >= STALE_S:
            return "interrupted", f"{who} held it; its lock's last heartbeat was {age:.0f} s ago"
    here = process_space()
    if here is not None and holder.get("space") == here:
        if not pid_alive(holder.get("pid")):
            return "interrupted", f"{who} held it and has exited"
        return "running", f"{who}{since}"
    if storage.is_s3(uri):
        return "running", f"{who}{since} (heartbeat current)"
    return "running", f"{who}{since} (another machine: not checked)"


def _session_rows(rows: list[dict[str, Any]], resumes: list[dict[str, Any]]) -> list[dict]:
    """The metrics rows this session wrote (after the last resume's step), with a ``time``."""
    after = int(resumes[-1].get("from_step", 0)) if resumes else 0
    return [r for r in rows if r.get("step", 0) > after and isinstance(r.get("time"), (int, float))]


def _rate(rows: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """(seconds per step, student busy share) over the last rows of ``rows``."""
    recent = rows[-_RATE_ROWS:]
    if len(recent) < 2:
        return None, None
    first, last = recent[0], recent[-1]
    wall = float(last["time"]) - float(first["time"])
    steps = int(last["step"]) - int(first["step"])
    if wall <= 0 or steps <= 0:
        return None, None
    busy = sum(float(r.get("student_busy_s", 0.0)) for r in recent[1:])
    return wall / steps, min(1.0, busy / wall)


def _checkpoint(run: RunDir) -> tuple[int, str] | None:
    where = run.latest_checkpoint()
    if where is None:
        return None
    m = _STEP_DIR.search(where.rstrip("/"))
    return (int(m.group(1)), where) if m else None


def read_status(uri: str | Path, *, now: float | None = None) -> RunStatus:
    """The state of the run at ``uri`` (a local path or ``s3://`` URI), from its files."""
    where = storage.resolve(uri)
    now = time.time() if now is None else now
    if not storage.is_file(storage.join(where, "config.yaml")):
        raise RunDirError(
            f"clpd status {where}: not a run directory (no config.yaml); pass the --out "
            "location of a `clpd run`"
        )
    run = RunDir.open(where)
    config = run.config
    assert config is not None  # RunDir.open read it
    metrics = _rows(where, "metrics.jsonl")
    decisions = _rows(where, "decisions.jsonl")
    evaluations = _rows(where, "eval.jsonl")
    resumes = _rows(where, "resumes.jsonl")
    summary = run.finished_summary()
    if summary is not None:
        state: State = "finished"
        why = f"summary.json written; {summary.get('steps')} steps"
    else:
        state, why = _state(where, _lock_holder(where), now)
    last = metrics[-1] if metrics else None
    s_per_step, student_busy = _rate(_session_rows(metrics, resumes))
    busy = {"student": student_busy} if student_busy is not None else {}
    if summary is not None and summary.get("busy_s") and summary.get("train_wall_s"):
        wall = float(summary["train_wall_s"])
        busy = {k: min(1.0, float(v) / wall) for k, v in summary["busy_s"].items()}
    recoveries = summary.get("recoveries") if summary else (last or {}).get("recoveries")
    stamped = last.get("time") if last else None
    return RunStatus(
        uri=where,
        state=state,
        why=why,
        policy=config.scheduler.policy,
        step=int(summary["steps"]) if summary else int(last["step"]) if last else 0,
        total=config.train.total_steps,
        metrics=last,
        decision=decisions[-1] if decisions else None,
        evaluation=evaluations[-1] if evaluations else None,
        s_per_step=s_per_step,
        busy=busy,
        recoveries=recoveries,
        resumes=len(resumes),
        checkpoint=_checkpoint(run),
        summary=summary,
        last_row_age_s=now - float(stamped) if isinstance(stamped, (int, float)) else None,
    )


# ---------------------------------------------------------------------- printing


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_status(st: RunStatus) -> str:
    """The lines ``clpd status`` prints, one labelled fact per line."""
    lines = [("run", f"{st.uri}  (policy {st.policy})")]
    state: str = st.state
    if st.state == "running" and st.last_row_age_s is not None:
        state += f", last row {_duration(st.last_row_age_s)} ago"
    lines.append(("state", f"{state}: {st.why}"))
    progress = f"{st.step} / {st.total} ({100 * st.step / max(st.total, 1):.0f}%)"
    if st.eta_s is not None and st.s_per_step is not None:
        progress += f"  ETA {_duration(st.eta_s)} at {st.s_per_step:.3g} s/step"
    elif st.state == "running":
        progress += "  ETA unknown (needs two timed metrics rows)"
    lines.append(("step", progress))
    m = st.metrics
    if m is not None:
        stage = f"stage {m.get('stage')}, teacher {m.get('teacher')}"
        if st.decision is not None:
            d = st.decision
            stage += f"; decided at step {d.get('step')}: {d.get('reason', '')}"
        lines.append(("stage", stage))
        lines.append(
            (
                "loss",
                f"{m['loss']:.4f} (kd {m.get('kd_loss', float('nan')):.4f}, ce "
                f"{m.get('ce_loss', float('nan')):.4f}) at step {m['step']}; lr {m.get('lr', 0):.3g}",
            )
        )
        lines.append(("tokens/s", f"{m.get('tokens_per_s', 0):,.0f}"))
    elif st.decision is not None:
        d = st.decision
        lines.append(("stage", f"stage {d.get('stage')}, teacher {d.get('teacher')}"))
    if st.busy:
        lines.append(("busy", ", ".join(f"{k} {100 * v:.0f}%" for k, v in st.busy.items())))
    if st.evaluation is not None:
        e = st.evaluation
        lines.append(("eval", f"accuracy {e.get('accuracy', 0):.3f} at step {e.get('step')}"))
    rec = "not recorded" if st.recoveries is None else str(st.recoveries)
    lines.append(("recoveries", f"{rec}; resumes {st.resumes}"))
    ck = "none committed yet" if st.checkpoint is None else f"step {st.checkpoint[0]}"
    if st.checkpoint is not None:
        ck += f"  {st.checkpoint[1]}"
    lines.append(("checkpoint", ck))
    if st.summary is not None:
        acc = st.summary.get("student", {}).get("accuracy")
        wall = st.summary.get("wall_s")
        lines.append(("result", f"student accuracy {acc:.3f}; {_duration(float(wall or 0))} wall"))
    width = max(len(k) for k, _ in lines) + 2
    text = "\n".join(f"{k:<{width}}{v}" for k, v in lines)
    if st.state == "interrupted":
        text += f"\ncontinue with: clpd run --resume {st.uri}"
    return text


def watch(
    uri: str | Path,
    every_s: float,
    *,
    out: TextIO = sys.stdout,
    clear: bool | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> RunStatus:
    """Print the status every ``every_s`` seconds until the run is no longer running; returns
    the last status. ``clear``: redraw in place (default: when ``out`` is a terminal)."""
    clear = out.isatty() if clear is None else clear
    while True:
        st = read_status(uri)
        stamp = time.strftime("%H:%M:%S")
        out.write(("\033[H\033[2J" if clear else "") + f"{format_status(st)}\n({stamp})\n")
        out.flush()
        if st.state != "running":
            return st
        sleep(every_s)
        if not clear:
            out.write("\n")
