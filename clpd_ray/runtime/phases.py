"""Start-up phase lines: what a run is doing before its progress bar, so the console is never
silent for long (loading data, training teachers, starting Ray, starting actors, ...).

    with phase("starting the actors and loading their models", progress):
        ...

A phase still running after 1 s prints ``clpd: starting the actors and loading their models ...``
to stderr, and ``clpd: starting the actors ...: done in 7.4 s`` when it ends; a quicker one prints
nothing (so a check that fails at once leaves only its error line). While it lasts, a heartbeat
keeps the console alive: on a terminal a spinner with the elapsed seconds on the phase's own line;
in a log (not a terminal) a ``clpd: still ... (N s)`` line every 4 s for the first minute, then
every 30 s. ``heartbeat=False`` for a phase that draws bars of its own (teacher training): its line
is printed at once, before them, and nothing else until its end. With ``progress`` off (an
ablation's parallel runs) the lines go to the log at INFO instead, with no heartbeat.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

__all__ = ["phase"]

_log = logging.getLogger("clpd_ray.runtime.run")
_SPINNER = "|/-\\"
_SHOW_AFTER_S = 1.0  # a phase shorter than this prints nothing
_EVERY_S = 4.0  # heartbeats in a log: this often for the first minute (under 5 s of quiet),
_LATER_EVERY_S = 30.0  # then this often


@contextmanager
def phase(
    what: str, progress: bool = True, *, heartbeat: bool = True, stream: TextIO | None = None
) -> Iterator[None]:
    """Announce ``what`` if it takes a while, keep the console alive, and say when it is done."""
    start = time.perf_counter()
    if not progress:
        _log.info("clpd: %s ...", what)
        yield
        _log.info("clpd: %s: done in %.1f s", what, time.perf_counter() - start)
        return
    out = stream if stream is not None else sys.stderr
    spinner = heartbeat and bool(getattr(out, "isatty", lambda: False)())
    lock = threading.Lock()
    stop = threading.Event()
    shown = threading.Event()  # the phase's first line is out
    if not heartbeat:  # before the phase's own bars start
        _write(out, lock, f"clpd: {what} ...")
        shown.set()
    thread = None
    if heartbeat:
        thread = threading.Thread(
            target=_watch,
            args=(out, lock, stop, shown, what, start, spinner),
            name="clpd-phase",
            daemon=True,
        )
        thread.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        stop.set()
        if thread is not None:
            thread.join(timeout=1.0)
        took = time.perf_counter() - start
        if shown.is_set() and (took >= _SHOW_AFTER_S or spinner or not ok):
            end = f"done in {took:.1f} s" if ok else f"stopped after {took:.1f} s"
            prefix = "\r\x1b[2K" if spinner else ""  # the spinner's line becomes the summary
            _write(out, lock, f"{prefix}clpd: {what}: {end}")


def _write(out: TextIO, lock: threading.Lock, text: str, *, newline: bool = True) -> None:
    with lock:
        out.write(text + ("\n" if newline else ""))
        out.flush()


def _watch(
    out: TextIO,
    lock: threading.Lock,
    stop: threading.Event,
    shown: threading.Event,
    what: str,
    start: float,
    spinner: bool,
) -> None:
    if stop.wait(_SHOW_AFTER_S):
        return  # a quick phase: nothing to say
    with lock:
        if stop.is_set():
            return
        out.write(f"clpd: {what} ..." + ("" if spinner else "\n"))
        out.flush()
        shown.set()
    if spinner:
        i = 0
        while not stop.wait(0.25):
            i += 1
            took = time.perf_counter() - start
            line = f"\r\x1b[2Kclpd: {what} {_SPINNER[i % 4]} {int(took)} s"
            with lock:
                if stop.is_set():
                    return
                out.write(line)
                out.flush()
        return
    gap = _EVERY_S
    while not stop.wait(gap):
        took = time.perf_counter() - start
        with lock:
            if stop.is_set():
                return
            out.write(f"clpd: still {what} ({int(took)} s)\n")
            out.flush()
        gap = _EVERY_S if took < 12 * _EVERY_S else _LATER_EVERY_S
