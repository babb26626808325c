"""clpd status: a finished, running and interrupted run read from the run directory alone."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from checkpoint_files import write_checkpoint

from clpd_ray.cli import main
from clpd_ray.config import load_config
from clpd_ray.runtime import storage
from clpd_ray.runtime.lock import LOCK_FILE, run_lock
from clpd_ray.runtime.rundir import RunDir
from clpd_ray.runtime.status import format_status, read_status, watch
from clpd_ray.runtime.tracking import Reporter

T0 = 1_700_000_000.0


def _row(step: int) -> dict:
    return {"step": step, "stage": step // 40, "teacher": f"t{step // 40}", "loss": 1.0 / step,
            "kd_loss": 0.5 / step, "ce_loss": 0.5 / step, "lr": 1e-3, "tokens_per_s": 5000.0,
            "student_busy_s": 1.5}  # fmt: skip


def _run(uri: str, upto: int) -> RunDir:
    """A run directory of 100 steps with metrics rows every 10 steps up to ``upto`` (2 s per
    step, stamped as the Reporter does), a decision at step 40 and a checkpoint at step 20."""
    run_dir = RunDir.create(uri, load_config(None, ["train.total_steps=100"]))
    _log(run_dir, range(10, upto + 1, 10))
    Reporter(run_dir).decision(
        {"step": 40, "stage": 1, "teacher": "t1", "policy": "clpd", "reason": "loss plateaued"}
    )
    write_checkpoint(uri, 20)
    return run_dir


def _log(run_dir: RunDir, steps: range) -> None:
    for step in steps:
        Reporter(run_dir, clock=lambda s=step: T0 + 2.0 * s).metrics(_row(step))


def _finish(run_dir: RunDir) -> None:
    storage.write_text(storage.join(run_dir.student_dir(), "config.json"), "{}")
    summary = {"steps": 100, "wall_s": 250.0, "train_wall_s": 200.0, "recoveries": 1,
               "student": {"accuracy": 0.625}, "busy_s": {"student": 150.0, "teacher-t0": 50.0}}  # fmt: skip
    run_dir.summary(summary)


def test_an_interrupted_run_says_so_and_prints_the_resume_command(tmp_path: Path) -> None:
    uri = str(tmp_path / "run")
    _run(uri, 50)
    st = read_status(uri, now=T0 + 500)
    assert (st.state, st.step, st.total) == ("interrupted", 50, 100)
    assert st.checkpoint is not None and st.checkpoint[0] == 20
    assert st.s_per_step == pytest.approx(2.0) and st.eta_s is None  # nothing is running
    text = format_status(st)
    assert "interrupted: no process holds the run directory" in text
    assert text.endswith(f"continue with: clpd run --resume {uri}")
    assert "stage 1, teacher t1; decided at step 40: loss plateaued" in text
    assert "step-0000020" in text


def test_a_running_run_advances_between_two_reads(tmp_path: Path) -> None:
    uri = str(tmp_path / "run")
    run_dir = _run(uri, 30)
    with run_lock(uri):
        first = read_status(uri, now=T0 + 61)
        _log(run_dir, range(40, 61, 10))
        second = read_status(uri, now=T0 + 121)
    assert (first.state, second.state) == ("running", "running")
    assert (first.step, second.step) == (30, 60)
    assert second.eta_s == pytest.approx(40 * 2.0)  # 40 steps left at 2 s/step
    assert second.busy == {"student": pytest.approx(0.075)}  # 1.5 s busy per 20 s window
    text = format_status(second)
    assert "60 / 100 (60%)  ETA 1m20s at 2 s/step" in text
    assert "running, last row 1s ago" in text
    assert read_status(uri).state == "interrupted"  # the lock went with the process's block


def test_a_lock_left_by_a_dead_process_is_an_interrupted_run(tmp_path: Path) -> None:
    uri = str(tmp_path / "run")
    _run(uri, 20)
    with run_lock(uri):
        holder = json.loads(Path(uri, LOCK_FILE).read_text())
    holder["pid"] = 2**22 + 12345  # above any pid_max: no such process
    Path(uri, LOCK_FILE).write_text(json.dumps(holder))  # as a SIGKILLed driver leaves it
    st = read_status(uri)
    assert st.state == "interrupted" and "has exited" in st.why


def test_a_finished_run_shows_its_result_and_actor_shares(tmp_path: Path) -> None:
    uri = str(tmp_path / "run")
    run_dir = _run(uri, 100)
    _finish(run_dir)
    st = read_status(uri)
    assert (st.state, st.step, st.recoveries) == ("finished", 100, 1)
    assert st.busy == {"student": 0.75, "teacher-t0": 0.25}
    text = format_status(st)
    assert "student accuracy 0.625" in text and "--resume" not in text
    assert "busy        student 75%, teacher-t0 25%" in text


def test_watch_refreshes_until_the_run_finishes(tmp_path: Path) -> None:
    uri = str(tmp_path / "run")
    run_dir = _run(uri, 50)
    out = io.StringIO()
    with run_lock(uri):
        steps = iter([range(60, 81, 10), range(90, 101, 10)])

        def sleep(seconds: float) -> None:
            assert seconds == 0.5
            more = next(steps, None)
            if more is None:
                _finish(run_dir)
            else:
                _log(run_dir, more)

        final = watch(uri, 0.5, out=out, clear=False, sleep=sleep)
    assert final.state == "finished"
    printed = [line for line in out.getvalue().splitlines() if line.startswith("step ")]
    assert [p.split()[1] for p in printed] == ["50", "80", "100", "100"]


def test_status_of_an_s3_run(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/run"
    _run(uri, 30)
    with run_lock(uri, settle_s=0):
        assert read_status(uri).state == "running"
    stale = {"host": "elsewhere", "pid": 1, "heartbeat": time.time() - 3600, "space": "x"}
    storage.write_text(storage.join(uri, LOCK_FILE), json.dumps(stale))
    st = read_status(uri)
    assert (st.state, st.step) == ("interrupted", 30)
    assert "last heartbeat was 3600 s ago" in st.why


def test_the_cli_prints_the_status_and_refuses_a_non_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = str(tmp_path / "run")
    _run(uri, 50)
    assert main(["status", uri]) == 0
    assert "50 / 100" in capsys.readouterr().out
    assert main(["status", str(tmp_path)]) == 2
    assert "not a run directory (no config.yaml)" in capsys.readouterr().err
    assert main(["status", uri, "--watch", "0"]) == 2
