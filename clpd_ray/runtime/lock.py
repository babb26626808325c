"""The run directory's lock: one ``clpd run`` (or ``--resume``) at a time uses a run directory.

A second run on the same directory stops at once (exit 2) naming the holder: its host, pid and
start time. The lock is the file ``<run>/.clpd.lock`` holding that description:

- a local (or shared-filesystem) directory: ``fcntl.flock`` on the file. The kernel releases it
  when the holding process dies, however it dies, so a SIGKILLed driver never leaves the
  directory locked. The file is removed on a clean release; one left by a killed process is
  simply locked again.
- ``s3://``: an object with a heartbeat time, rewritten every ``HEARTBEAT_S`` seconds by a
  background thread. S3 has no lock primitive, so the holder is whoever's object is there; an
  object whose heartbeat is older than ``STALE_S`` seconds belongs to a dead process and is
  taken over, at once if the holder ran on this machine (same host, boot and pid namespace) and
  its pid is gone (a driver killed and resumed on the same machine does not wait). Two starts
  within the same second can both write the object: each reads it back after ``SETTLE_S`` and
  only the one whose object survived goes on.

Use it as a context manager around everything that writes the run directory::

    with run_lock(uri):
        ...  # verify, rewind, execute
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clpd_ray.errors import RunDirError, StorageError
from clpd_ray.runtime import storage

__all__ = [
    "HEARTBEAT_S",
    "LOCK_FILE",
    "SETTLE_S",
    "STALE_S",
    "pid_alive",
    "process_space",
    "run_lock",
]

_log = logging.getLogger(__name__)

LOCK_FILE = ".clpd.lock"
HEARTBEAT_S = 30.0  # S3: how often the holder rewrites its lock object
STALE_S = 120.0  # S3: a lock object not rewritten for this long belongs to a dead process
SETTLE_S = 1.0  # S3: wait before reading the lock object back (two starts in the same second)


def _holder() -> dict[str, Any]:
    now = time.time()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": _iso(now),
        "heartbeat": now,
        "token": uuid.uuid4().hex,
        "space": process_space(),
    }


def process_space() -> str | None:
    """This machine's boot and pid namespace: a pid means the same process only within one."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # another user's process, or a pid we cannot read: assume it lives
    return True


def _stale(holder: dict[str, Any], stale_s: float) -> bool:
    """Whether the S3 lock ``holder`` belongs to a dead process."""
    try:
        age = time.time() - float(holder.get("heartbeat", 0))
    except (TypeError, ValueError):
        return True
    if age >= stale_s:
        return True
    here = process_space()
    return here is not None and holder.get("space") == here and not pid_alive(holder.get("pid"))


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _busy(uri: str, holder: dict[str, Any] | None, note: str = "") -> RunDirError:
    who = (
        f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
        if holder
        else "another process (it has not written its name yet)"
    )
    return RunDirError(
        f"run directory {uri} is in use by {who}; wait for that run to end (or stop it), then "
        f"run again{note}. Two runs writing one directory would interleave their files"
    )


def _parse(text: str) -> dict[str, Any] | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------------- local: flock


@contextlib.contextmanager
def _local_lock(uri: str) -> Iterator[None]:
    made = not Path(uri).exists()
    storage.make_dir(uri)
    path = Path(uri, LOCK_FILE)
    try:
        fd = _flock(uri, path)
    except BaseException:
        if made:
            _remove_empty(Path(uri))
        raise
    try:
        holder = json.dumps(_holder()).encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder, 0)
        except OSError as err:
            raise storage.storage_error("write", str(path), err) from None
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding the lock: the next one creates a new file
        os.close(fd)
        if made:
            _remove_empty(Path(uri))  # a run that failed before writing anything leaves nothing


def _remove_empty(directory: Path) -> None:
    with contextlib.suppress(OSError):
        directory.rmdir()  # fails (and is left) unless empty


def _flock(uri: str, path: Path) -> int:
    """An open descriptor of ``path`` holding its exclusive flock; raises if another holds it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise storage.storage_error("create the lock file", str(path), err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            raise _busy(uri, _parse(text)) from None
        # The holder before us may have removed the file between our open and our flock: then
        # we hold a lock on a file nobody else sees. Lock the file that is there instead.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


# ---------------------------------------------------------------------- S3: heartbeat object


@contextlib.contextmanager
def _s3_lock(uri: str, *, stale_s: float, heartbeat_s: float, settle_s: float) -> Iterator[None]:
    where = storage.join(uri, LOCK_FILE)
    current = _read_s3(where)
    if current is not None and not _stale(current, stale_s):
        raise _busy(
            uri,
            current,
            f" (if that process is gone, its lock {where} expires {stale_s:.0f} s after its last "
            "heartbeat)",
        )
    me = _holder()
    storage.write_text(where, json.dumps(me))
    time.sleep(settle_s)
    current = _read_s3(where)
    if current is None or current.get("token") != me["token"]:
        raise _busy(uri, current)
    stop = threading.Event()
    beat = threading.Thread(
        target=_heartbeat, args=(where, me, stop, heartbeat_s), name="clpd-lock", daemon=True
    )
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join(timeout=10)
        with contextlib.suppress(StorageError):
            current = _read_s3(where)
            if current is not None and current.get("token") == me["token"]:
                storage.delete_file(where)


def _read_s3(where: str) -> dict[str, Any] | None:
    if not storage.is_file(where):
        return None
    try:
        return _parse(storage.read_text(where))
    except StorageError:
        return None  # deleted between the check and the read


def _heartbeat(where: str, me: dict[str, Any], stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        try:
            current = _read_s3(where)
        except StorageError:
            continue  # storage unreachable for now: a missed beat
        if current is not None and current.get("token") != me["token"]:
            _log.warning(
                "clpd: warning: the lock %s was taken over by pid %s on host %s (this run's "
                "heartbeat was late by more than the stale limit); two runs may now write the "
                "run directory",
                where,
                current.get("pid"),
                current.get("host"),
            )
            return
        me["heartbeat"] = time.time()
        with contextlib.suppress(StorageError):  # a missed beat; the next one may get through
            storage.write_text(where, json.dumps(me))


# ---------------------------------------------------------------------- entry point


@contextlib.contextmanager
def run_lock(
    uri: str,
    *,
    stale_s: float = STALE_S,
    heartbeat_s: float = HEARTBEAT_S,
    settle_s: float = SETTLE_S,
) -> Iterator[None]:
    """Hold the lock of run directory ``uri`` (created if absent) for the ``with`` block;
    raises :class:`RunDirError` naming the holder if another process has it. Released when the
    block ends, however it ends (and, locally, by the kernel if the process is killed)."""
    if storage.is_s3(uri):
        with _s3_lock(uri, stale_s=stale_s, heartbeat_s=heartbeat_s, settle_s=settle_s):
            yield
    else:
        with _local_lock(uri):
            yield
