"""No Ray process outlives the ``clpd`` that started a local Ray, however it exits.

A clean exit, an error or a signal ends with ``ray.shutdown()`` (:func:`stopping_local_ray`, around
the CLI's commands).
A driver killed with SIGKILL runs no code: Linux stops the raylet and the GCS with it
(PR_SET_PDEATHSIG, set by Ray), but the raylet's dashboard and runtime-env agents notice only
later and then spend about a minute trying to report to the dead GCS before they exit (measured
on Ray 2.60). So a local Ray gets a watchdog, a small process of its own::

    driver ──ray.init (local)──▶ raylet, gcs_server, dashboard, ... (session dir S)
       └──pipe (write end)──▶ watchdog (python -I cleanup.py S PID, in its own session: a signal
                              to the driver's process group does not reach it)
    driver exits (any way) ──▶ pipe EOF ──▶ watchdog SIGKILLs every process of this user that
                              holds a file open under S (logs: every Ray process of the session
                              has them), until none is left (at most WATCHDOG_WINDOW_S), and exits

Only this process's own local cluster is watched: never one joined with ``--address``.

A SIGTERM sent to the driver's whole process group (``kill -TERM -PGID``, Slurm's ``scancel``,
``timeout``, a shell's job control) would also reach the raylet and the GCS, which ``ray.init``
starts in that group; they died at once and the driver with them (exit 1, no checkpoint, no
``clpd:`` line). So the local Ray is started with SIGTERM blocked
(:func:`shielding_ray_from_group_sigterm`, around ``ray.init`` in ``connect.py``)::

    driver: block SIGTERM ──ray.init──▶ raylet, gcs_server, agents, workers: SIGTERM blocked
            (inherited over fork and exec; Ray itself blocks only SIGINT in them), so a group
            SIGTERM stays pending there and does nothing
    driver: unblock SIGTERM, clpd's handler kept ──▶ the driver alone acts on a group SIGTERM:
            a stop at the next step boundary with a checkpoint (stopping.py), then
    ray.shutdown() ──▶ SIGKILL (not SIGTERM: Ray would wait 1 s for each process before it)
            the processes ray.init started ──▶ SIGKILL what is left of the session (the
            raylet's agents and workers) ──▶ exit: nothing of this Ray runs any more

Ray's dashboard head runs with no signal blocked (measured: an empty SigBlk) and exits on a
group SIGTERM, with its module processes; the run does not need it.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = [
    "WATCHDOG_WINDOW_S",
    "session_processes",
    "shielding_ray_from_group_sigterm",
    "stopping_local_ray",
    "watch_local_ray",
]

WATCHDOG_WINDOW_S = 15.0
_watchdogs: dict[str, int] = {}  # session dir -> the write end of its watchdog's pipe
_shielded: set[str] = set()  # session dirs of local Rays started with SIGTERM blocked
_stopping = [0]  # how many stopping_local_ray blocks are open: clpd itself will stop Ray


def _local_node() -> Any:
    """Ray's node object when this process started the local cluster with ``ray.init``."""
    if "ray" not in sys.modules:
        return None
    import ray

    node = ray._private.worker._global_node
    if node is None or not getattr(node, "ray_init_cluster", False):
        return None
    return node


def watch_local_ray() -> None:
    """Start the watchdog of the local Ray this process started (once per Ray session; nothing
    when Ray was joined, or off Linux)."""
    node = _local_node()
    if node is None or not sys.platform.startswith("linux"):
        return
    session = _session(node)
    if session in _watchdogs:
        return
    # A raw pipe: its write end is an int nothing closes, so the kernel closes it when this
    # process is gone (not earlier, as a file object's finaliser would at interpreter exit).
    read_end, write_end = os.pipe()
    try:
        subprocess.Popen(
            [sys.executable, "-I", str(Path(__file__).resolve()), session, str(os.getpid())],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        os.close(read_end)
    _watchdogs[session] = write_end


def _session(node: Any) -> str:
    return os.path.realpath(node.get_session_dir_path())


@contextlib.contextmanager
def shielding_ray_from_group_sigterm() -> Iterator[None]:
    """Start a local Ray (``ray.init``) inside this block: the processes it starts inherit a
    blocked SIGTERM, so a SIGTERM to the whole process group reaches the driver alone. Only
    inside :func:`stopping_local_ray` (``clpd``'s commands), which then stops them with SIGKILL;
    elsewhere (a program that calls ``run_distillation``) Ray starts as usual.

    In the main thread, with a Python SIGTERM handler in place (clpd's, ``stopping.py``), that
    handler stays: ``ray.init`` would install its own, which ends the driver with
    ``sys.exit(15)`` halfway through starting Ray (leaving the raylet's agents behind) or, once
    it has started, with exit 1. A SIGTERM that comes while Ray starts is kept until
    ``ray.init`` returns and then handed to that handler (so ``clpd`` stops with its message and
    shuts Ray down); a second one goes to the handler at once.
    """
    if not _stopping[0] or not hasattr(signal, "pthread_sigmask"):  # not POSIX: no groups
        yield
        return
    handler = None
    if threading.current_thread() is threading.main_thread():
        handler = signal.getsignal(signal.SIGTERM)
    was_blocked = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    deferred: list[int] = []
    try:
        if callable(handler):
            with _deferring_sigterm(handler, deferred):
                yield
        else:
            yield
        node = _local_node()
        if node is not None and not was_blocked:
            _shielded.add(_session(node))
    finally:
        if not was_blocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        if deferred:
            signal.raise_signal(signal.SIGTERM)  # the handler runs now, in this thread


@contextlib.contextmanager
def _deferring_sigterm(handler: Callable[..., Any], deferred: list[int]) -> Iterator[None]:
    """While Ray starts: the first SIGTERM is noted in ``deferred``, a second goes to
    ``handler``; Ray's own SIGTERM handlers are not installed (``handler`` is put back after)."""
    import ray._private.utils as ray_utils

    def defer(signum: int, frame: FrameType | None) -> None:
        if deferred:
            handler(signum, frame)
            return
        deferred.append(signum)
        with contextlib.suppress(OSError):
            os.write(
                2,
                b"\nclpd: SIGTERM received: stopping once the local Ray has started (at once on "
                b"a second signal)\n",
            )

    install = getattr(ray_utils, "set_sigterm_handler", None)
    signal.signal(signal.SIGTERM, defer)
    if install is not None:
        ray_utils.set_sigterm_handler = lambda _handler: None
    try:
        yield
    finally:
        if install is not None:
            ray_utils.set_sigterm_handler = install
        signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def stopping_local_ray() -> Iterator[None]:
    """On leaving the block, however: ``ray.shutdown()`` if a local Ray was started inside it
    (that stops the raylet, the GCS and the rest, and waits for them), then SIGKILL whatever
    process of its session is left (the raylet's agents and workers). Nothing for a cluster
    joined with ``--address`` (it keeps running) or one that was up before the block."""
    before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    _stopping[0] += 1
    try:
        yield
    finally:
        _stopping[0] -= 1
        if not before and _local_node() is not None:
            _shutdown_ray()


def _shutdown_ray() -> None:
    """``ray.shutdown()``, not cut short by a late SIGINT/SIGTERM (clpd is exiting anyway; a
    SIGKILL still leaves the rest to the watchdog)."""
    import ray

    node = _local_node()
    session = _session(node) if node is not None else None
    if session in _shielded:
        _shielded.discard(session)
        _kill_at_once(node)
    main = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGINT, signal.SIGTERM) if main else ()
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        ray.shutdown(wait_for_processes=True)
        if session is not None:
            _end_session(session)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _end_session(session_dir: str, within_s: float = 3.0) -> None:
    """SIGKILL what is left of this process's own Ray session after ``ray.shutdown()`` (the
    raylet's agents and workers, which it does not wait for), until none is left."""
    deadline = time.monotonic() + within_s
    while pids := session_processes(session_dir):
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)


def _kill_at_once(node: Any) -> None:
    """Make ``ray.shutdown()`` SIGKILL the processes of ``node`` (after it has disconnected the
    driver, as always) instead of sending SIGTERM first: they block SIGTERM
    (:func:`shielding_ray_from_group_sigterm`), so Ray would wait 1 s for each before the
    SIGKILL (about 3 s more per exit, measured on Ray 2.60)."""
    kill_all = node.kill_all_processes
    try:
        signature = inspect.signature(kill_all)
    except (TypeError, ValueError):
        return
    if "allow_graceful" not in signature.parameters:  # another Ray: keep its own shutdown
        return

    def kill_all_at_once(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.arguments["allow_graceful"] = False
        return kill_all(*bound.args, **bound.kwargs)

    node.kill_all_processes = kill_all_at_once


def session_processes(session_dir: str, *, exclude: int | None = None) -> list[int]:
    """Pids of this user's processes holding a file open under ``session_dir``."""
    prefix = os.path.realpath(session_dir).rstrip("/") + "/"
    uid, found = os.getuid(), []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in (os.getpid(), exclude):
            continue
        with contextlib.suppress(OSError):
            if entry.stat().st_uid != uid:
                continue
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path).startswith(prefix):
                        found.append(int(entry.name))
                        break
    return found


def _watch(session_dir: str, driver: int) -> None:
    """The watchdog: wait for the driver's exit, then kill what is left of its Ray session."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    sys.stdin.buffer.read()  # returns at EOF: the driver has exited
    time.sleep(0.5)  # a clean exit has stopped Ray already; let its last processes go
    deadline, quiet = time.monotonic() + WATCHDOG_WINDOW_S, 0
    while time.monotonic() < deadline and quiet < 3:
        pids = session_processes(session_dir, exclude=driver)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        quiet = 0 if pids else quiet + 1
        time.sleep(0.3)


if __name__ == "__main__":
    _watch(sys.argv[1], int(sys.argv[2]))
