"""SIGTERM and SIGINT stop a run at a step boundary with a checkpoint; no Ray process outlives clpd.

The fast tests check the pieces in-process (the handlers, the CLI's line and exit code, the
watchdog); the slow ones send real signals to a ``clpd run`` subprocess and resume it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ONE_RUNG
from test_faults import (
    NODE_RUN,
    _clean_env,
    _jsonl,
    _kill_session,
    _student,
    assert_same_run,
    node_run,
)

from clpd_ray.runtime import cleanup
from clpd_ray.runtime.stopping import (
    Interrupted,
    RunStopped,
    handling_stop_signals,
    stop_requested,
)

CLI = [sys.executable, "-m", "clpd_ray.cli", "run"]


# ---------------------------------------------------------------------------- fast pieces


def test_a_signal_in_training_requests_a_stop_and_a_second_one_stops_at_once():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with handling_stop_signals(), handling_stop_signals(armed=True):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # the handler runs in the main thread, between bytecodes
        assert stop_requested() is signal.SIGTERM
        with pytest.raises(Interrupted) as second:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
        assert second.value.signal is signal.SIGINT
    assert stop_requested() is None
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_stop_that_takes_longer_than_the_grace_period_happens_at_once(monkeypatch):
    monkeypatch.setenv("CLPD_STOP_GRACE_S", "0.3")
    with pytest.raises(Interrupted) as err, handling_stop_signals(armed=True):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert stop_requested() is signal.SIGTERM
        for _ in range(50):  # no step boundary comes: the timer interrupts the main thread
            time.sleep(0.1)
    assert err.value.signal is signal.SIGTERM


def test_a_signal_outside_training_stops_at_once():
    with pytest.raises(Interrupted) as err, handling_stop_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
    assert err.value.signal is signal.SIGTERM


def test_the_cli_prints_one_line_naming_resume_and_exits_128_plus_the_signal(monkeypatch, capsys):
    from clpd_ray import cli

    def stopped(sig: signal.Signals, at_boundary: bool):
        def cmd_run(args, config_path):
            raise RunStopped(sig, 40, "/runs/a", at_boundary=at_boundary)

        return cmd_run

    monkeypatch.setattr(cli, "cmd_run", stopped(signal.SIGTERM, True))
    assert cli.main(["run", "c.yaml"]) == 143
    assert capsys.readouterr().err == (
        "clpd: stopped by SIGTERM at step 40; continue with: clpd run --resume /runs/a\n"
    )
    monkeypatch.setattr(cli, "cmd_run", stopped(signal.SIGINT, False))
    assert cli.main(["run", "--resume", "/runs/a"]) == 130
    assert capsys.readouterr().err == (
        "clpd: stopped by SIGINT at once; its last checkpoint is step 40; continue with: "
        "clpd run --resume /runs/a\n"
    )


def test_the_watchdog_kills_what_holds_the_session_open_once_the_driver_is_gone(tmp_path):
    """The watchdog of cleanup.py, on a stand-in session directory: a process with a log file
    open there outlives its driver (the pipe's writer) by at most a few seconds."""
    session = tmp_path / "session_x"
    (session / "logs").mkdir(parents=True)
    log = (session / "logs" / "agent.out").open("w")
    agent = subprocess.Popen(["sleep", "300"], stdout=log, start_new_session=True)
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    read_end, write_end = os.pipe()
    watchdog = subprocess.Popen(
        [sys.executable, "-I", cleanup.__file__, str(session), str(os.getpid())],
        stdin=read_end,
        start_new_session=True,
    )
    os.close(read_end)
    log.close()
    try:
        assert cleanup.session_processes(str(session)) == [agent.pid]
        time.sleep(1.0)
        assert agent.poll() is None, "killed while the driver lives"
        os.close(write_end)  # the driver exits
        agent.wait(timeout=10)
        watchdog.wait(timeout=cleanup.WATCHDOG_WINDOW_S + 10)
        assert bystander.poll() is None
    finally:
        for p in (agent, bystander, watchdog):
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()


def _blocks_sigterm(pid: int) -> bool:
    status = (Path("/proc") / str(pid) / "status").read_text()
    mask = int(next(x for x in status.splitlines() if x.startswith("SigBlk:")).split()[1], 16)
    return bool(mask & (1 << (signal.SIGTERM - 1)))


@pytest.fixture
def signal_taker():
    """A thread that takes process signals while the main thread blocks SIGTERM (in clpd, the
    phase heartbeat thread that runs while a local Ray starts)."""
    idle = threading.Event()
    taker = threading.Thread(target=idle.wait, daemon=True)
    taker.start()
    yield
    idle.set()
    taker.join()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_processes_of_a_local_ray_block_sigterm_and_one_meanwhile_waits_for_ray_to_start(
    signal_taker,
):
    import ray._private.utils as ray_utils

    install = ray_utils.set_sigterm_handler
    waited, child = False, None
    try:
        with (
            pytest.raises(Interrupted) as err,
            cleanup.stopping_local_ray(),  # as clpd's commands run: clpd will stop Ray
            handling_stop_signals(),
            cleanup.shielding_ray_from_group_sigterm(),
        ):
            child = subprocess.Popen(["sleep", "60"])  # as ray.init starts the raylet
            ray_utils.set_sigterm_handler(lambda *_: None)  # as ray.init does: not now
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)  # Ray is still starting: the stop waits for it
            waited = True
        assert waited and err.value.signal is signal.SIGTERM
        assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, set())
        assert ray_utils.set_sigterm_handler is install
        assert _blocks_sigterm(child.pid)
        child.terminate()  # what a SIGTERM to the process group does to it: nothing
        time.sleep(0.3)
        assert child.poll() is None
    finally:
        if child is not None:
            child.kill()
            child.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_outside_clpds_commands_a_local_ray_starts_with_sigterm_as_usual():
    """A program that calls run_distillation stops Ray its own way: nothing is blocked."""
    with cleanup.shielding_ray_from_group_sigterm():
        child = subprocess.Popen(["sleep", "60"])
    try:
        assert not _blocks_sigterm(child.pid)
    finally:
        child.kill()
        child.wait()


def test_a_second_sigterm_while_a_local_ray_starts_stops_at_once(signal_taker):
    first_waited = False
    with (
        pytest.raises(Interrupted),
        cleanup.stopping_local_ray(),
        handling_stop_signals(),
        cleanup.shielding_ray_from_group_sigterm(),
    ):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        first_waited = True
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        pytest.fail("a second SIGTERM did not stop at once")
    assert first_waited


# ---------------------------------------------------------------------------- end to end


def _descendants(root: int) -> dict[int, str]:
    """pid -> name of every process below ``root`` (from /proc: ppid links)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        for child, ppid in parent.items():
            if ppid == pid and child not in found:
                with contextlib.suppress(OSError):
                    found[child] = (Path("/proc") / str(child) / "comm").read_text().strip()
                    todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _ray_processes(proc: subprocess.Popen) -> dict[int, str]:
    """The Ray processes a ``clpd run`` child started (raylet, gcs_server, their workers ...)."""
    deadline = time.monotonic() + 30
    while True:
        found = _descendants(proc.pid)
        if {"raylet", "gcs_server"} <= set(found.values()):
            return found
        assert time.monotonic() < deadline, f"no raylet/gcs_server below {proc.pid}: {found}"
        time.sleep(0.2)


def assert_gone_soon(pids: dict[int, str], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while (left := {p: n for p, n in pids.items() if _alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"still running {within_s:g} s after clpd exited: {left}"


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_clean_env(),
        cwd=cwd,
        start_new_session=True,
    )


def _wait_logged(proc: subprocess.Popen, out: Path, step: int) -> None:
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and any(r["step"] >= step for r in _jsonl(metrics))):
        if proc.poll() is not None:
            pytest.fail(f"clpd exited {proc.returncode} early: {proc.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, f"step {step} not logged within 240 s"
        time.sleep(0.05)


def _session_dir(ray_procs: dict[int, str]) -> str:
    """The Ray session directory of these processes (the raylet's --session_dir argument)."""
    for pid, name in ray_procs.items():
        if name == "raylet":
            args = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
            for arg in args:
                if arg.startswith(b"--session_dir="):
                    return arg.split(b"=", 1)[1].decode()
    raise AssertionError(f"no raylet with --session_dir among {ray_procs}")


def _assert_clean_stop(code: int, err: str, sig: signal.Signals, out: Path) -> int:
    """Exit 128+sig, the one line naming --resume last, no traceback or Ray crash dump, and a
    committed checkpoint at the step the line names; returns that step."""
    assert code == 128 + sig, err[-3000:]
    last = err.strip().splitlines()[-1]
    prefix = f"clpd: stopped by {sig.name} at step "
    assert last.startswith(prefix) and last.endswith(f"; continue with: clpd run --resume {out}")
    for crash in ("Traceback", "*** SIG", "core_worker.cc", "Aborted", "stack trace"):
        assert crash not in err, err[-3000:]
    step = int(last[len(prefix) :].split(";")[0])
    ckpt = out / "checkpoints" / f"step-{step:07d}"
    assert (ckpt / "manifest.json").is_file(), sorted(os.listdir(out / "checkpoints"))
    assert not (out / "summary.json").exists()
    return step


@pytest.mark.ray
@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_stops_at_a_step_and_leaves_no_ray_process(
    ray_cluster, tiny_config, uninterrupted, tmp_path
):
    """``kill -TERM -PGID`` (Slurm's scancel, ``timeout``, job control) reaches the raylet and
    the GCS of the local Ray too: they ignore it (SIGTERM blocked), the driver stops at a step
    boundary with a checkpoint and then ends them itself; the resume gives the uninterrupted
    run's student, decisions and metrics. (A SIGTERM to the driver alone takes the same path
    in the driver: ``ray job stop`` in test_job_submit.py; SIGINT's handling is the fast tests'.)
    Every step is a checkpoint step here, so the stop lands on one: its checkpoint is committed
    once, with the policy's state (the planner has not planned the step it stops at)."""
    # The driver and node faults' run (30 steps; its uninterrupted run, with a checkpoint every
    # 5, is the reference: checkpoints do not change what is trained).
    config = tiny_config(*NODE_RUN, **ONE_RUNG)
    reference = uninterrupted(config)
    cfg, out = tmp_path / "cfg.yaml", tmp_path / "run"
    raw = config.to_dict()
    raw["train"]["checkpoint_every"] = 1
    cfg.write_text(yaml.safe_dump(raw))
    proc = _start([str(cfg), "--out", str(out)], tmp_path)  # its own process group
    try:
        _wait_logged(proc, out, 15)
        ray_procs = _ray_processes(proc)
        session = _session_dir(ray_procs)
        ray_procs.update({p: "in the session" for p in cleanup.session_processes(session)})
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - sent
        left = sorted(p for p in ray_procs if _alive(p))
        # Checked before _kill_session below, which would end them anyway.
        assert_gone_soon(ray_procs, within_s=5.0)
        assert cleanup.session_processes(session) == []
    finally:
        _kill_session(proc)
    print(
        f"group SIGTERM -> clpd exited {proc.returncode} after {took:.1f} s; "
        f"alive then, of the {len(ray_procs)} processes below it or in its Ray session: "
        f"{[ray_procs[p] for p in left]}"
    )
    step = _assert_clean_stop(proc.returncode, err, signal.SIGTERM, out)
    assert 15 <= step < 30

    _resume_to_the_same_student(out, step, reference)
    assert _jsonl(out / "decisions.jsonl") == _jsonl(reference / "decisions.jsonl")
    keys = ("step", "stage", "teacher", "loss", "kd_loss", "ce_loss", "lr")
    rows = [
        [{k: m[k] for k in keys} for m in _jsonl(d / "metrics.jsonl")] for d in (out, reference)
    ]
    assert rows[0] == rows[1]


def _resume_to_the_same_student(out: Path, step: int, reference: Path) -> None:
    """``clpd run --resume out`` (the CLI in this process, on the session's cluster: the
    stopped run's own local Ray is gone) exits 0, continues at ``step`` and ends with the
    student of the uninterrupted ``reference`` run, tensor for tensor."""
    from clpd_ray.cli import main

    assert main(["run", "--resume", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == step
    a, b = _student(out), _student(reference)
    assert [k for k in b if not torch.equal(a[k], b[k])] == []


@pytest.mark.ray
@pytest.mark.slow
def test_a_sigkilled_driver_leaves_no_ray_process_and_resumes_from_s3_to_the_same_student(
    ray_cluster, tiny_config, uninterrupted, tmp_path, s3_bucket, monkeypatch, capsys
):
    """`clpd run --out s3://...` (a subprocess with its own local Ray) SIGKILLed at a random
    step, the driver alone, as by the OOM killer: its watchdog ends the local Ray within
    seconds (the raylet's agents would otherwise linger for about a minute), and `clpd run
    --resume s3://...` finishes the run with the uninterrupted run's student. The run directory
    lives only in the bucket (moto's S3 server): the documented layout is there, and nothing is
    written to the driver's working directory."""
    from clpd_ray.cli import main
    from clpd_ray.runtime import storage

    cfg, reference, cwd = node_run(tiny_config, uninterrupted, tmp_path)
    out = f"{s3_bucket}/runs/a"
    # A random logged step (metrics rows and checkpoints come every 5 steps): the kill lands
    # within a step or two of it, before the checkpoint of that step is committed or after.
    kill_at = random.Random().choice([5, 10, 15, 20])
    print(f"killing the driver once step {kill_at} is logged")
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(
        [*CLI, str(cfg), "--out", out],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_clean_env(),
        cwd=cwd,
        start_new_session=True,  # its own process group: _kill_session can end all of it
    )
    try:
        deadline = time.monotonic() + 240
        metrics = storage.join(out, "metrics.jsonl")
        while not (storage.exists(metrics) and f'"step": {kill_at},' in storage.read_text(metrics)):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"step {kill_at} not logged within 240 s"
            time.sleep(0.05)
        ray_procs = _ray_processes(proc)
        session = _session_dir(ray_procs)
        ray_procs.update({p: "in the session" for p in cleanup.session_processes(session)})
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        assert not storage.exists(storage.join(out, "summary.json")), "finished before the kill"

        # The resume (the CLI in this process, on the session's cluster, from the same empty
        # working directory) while the watchdog ends the killed run's local Ray.
        monkeypatch.chdir(cwd)
        assert main(["run", "--resume", out]) == 0
        assert_gone_soon(
            ray_procs, within_s=max(0.0, killed + cleanup.WATCHDOG_WINDOW_S - time.monotonic())
        )
        assert cleanup.session_processes(session) == []
    finally:
        _kill_session(proc)
        log.close()
    assert "Traceback" not in "".join(capsys.readouterr())
    assert list(cwd.iterdir()) == [], "a local run directory was created"
    local = storage.download_dir(out, tmp_path / "downloaded")
    summary = json.loads((local / "summary.json").read_text())
    # From the last checkpoint committed before the kill (none before step 5: from the start).
    assert kill_at - 5 <= summary["resumed_from_step"] <= kill_at + 5
    assert_same_run(local, reference)

    # The documented layout (README "Run directory"), in the bucket.
    files = storage.file_sizes(out)
    top = {name.split("/")[0] for name in files}
    assert top == {"config.yaml", "metrics.jsonl", "decisions.jsonl", "summary.json"} | {
        "run.json",  # the config it started with and its models' fingerprints
        "resumes.jsonl",  # the resume after the kill (the lock object is gone: released)
        "student",
        "models",
        "checkpoints",
        "eval",  # predictions.jsonl of the final evaluation
    }
    assert "student/model.safetensors" in files
    assert {n.split("/")[1] for n in files if n.startswith("models/")} == {"t0", "tokenizer"}
    ckpts = sorted({n.split("/")[1] for n in files if n.startswith("checkpoints/")})
    assert ckpts == ["step-0000020", "step-0000025"]  # train.keep_checkpoints=2
    assert all(f"checkpoints/{c}/manifest.json" in files for c in ckpts)

    # Resuming a finished run changes nothing (and starts nothing).
    before = {n: storage.read_bytes(storage.join(out, n)) for n in files}
    assert main(["run", "--resume", out]) == 0
    assert {n: storage.read_bytes(storage.join(out, n)) for n in storage.file_sizes(out)} == before
