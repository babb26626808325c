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
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["WATCHDOG_WINDOW_S", "session_processes", "stopping_local_ray", "watch_local_ray"]

WATCHDOG_WINDOW_S = 15.0
_watchdogs: dict[str, int] = {}  # session dir -> the write end of its watchdog's pipe


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
    session = os.path.realpath(node.get_session_dir_path())
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


@contextlib.contextmanager
def stopping_local_ray() -> Iterator[None]:
    """On leaving the block, however: ``ray.shutdown()`` if a local Ray was started inside it
    (that stops the raylet, the GCS and the rest, and waits for them). Nothing for a cluster
    joined with ``--address`` (it keeps running) or one that was up before the block."""
    before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    try:
        yield
    finally:
        if not before and _local_node() is not None:
            _shutdown_ray()


def _shutdown_ray() -> None:
    """``ray.shutdown()``, not cut short by a late SIGINT/SIGTERM (clpd is exiting anyway; a
    SIGKILL still leaves the rest to the watchdog)."""
    import ray

    if threading.current_thread() is not threading.main_thread():
        ray.shutdown(wait_for_processes=True)
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        ray.shutdown(wait_for_processes=True)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


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
