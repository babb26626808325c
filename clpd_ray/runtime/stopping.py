"""Stopping a run on SIGINT or SIGTERM: at a step boundary, with a checkpoint, and a resume hint.

SIGTERM is what Kubernetes, Slurm and ``ray job stop`` send; SIGINT is Ctrl-C. Both are handled
the same way (no Ray import here: the CLI installs the handlers before Ray starts)::

    clpd run ──▶ handling_stop_signals()   a signal while data, teachers, actors get ready
                                             ──▶ Interrupted at once (one while a local Ray
                                             starts: once ray.init has returned, cleanup.py)
      _execute ──▶ handling_stop_signals(armed=True)   (again: ray.init of a joined cluster
                                                       replaces SIGTERM's handler)
        1st signal ──▶ stop requested: the executor stops at the next step boundary, commits a
                       checkpoint there and raises RunStopped
        2nd signal, or CLPD_STOP_GRACE_S later ──▶ Interrupted at once (the last committed
                       checkpoint stays intact)
    cli ──▶ one line: clpd: stopped by SIGTERM at step N; continue with: clpd run --resume DIR
            exit 128 + signal number: 130 for SIGINT, 143 for SIGTERM

Handlers are installed only from the main thread (Python allows no other); elsewhere (an
ablation's run threads) the defaults stay.

A SIGTERM to the whole process group (``kill -TERM -PGID``, Slurm's ``scancel``) is handled the
same way: the local Ray that clpd starts blocks SIGTERM in its processes (cleanup.py), so only
the driver acts on it, and it stops Ray itself on its way out.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

__all__ = [
    "STOP_SIGNALS",
    "Interrupted",
    "RunStopped",
    "exit_code",
    "handling_stop_signals",
    "stop_requested",
]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _grace_s() -> float:
    """Seconds from a stop request to a stop at once (``CLPD_STOP_GRACE_S``, default 25): below
    the 30 s Kubernetes (terminationGracePeriodSeconds) and Slurm (KillWait) wait by default
    before SIGKILL."""
    try:
        return float(os.environ.get("CLPD_STOP_GRACE_S", "25"))
    except ValueError:
        return 25.0


def exit_code(sig: signal.Signals) -> int:
    """The shell convention for a process stopped by ``sig``: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(sig)


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by a stop signal that cannot wait for a step boundary."""

    def __init__(self, sig: signal.Signals) -> None:
        super().__init__(sig.name)
        self.signal = sig


class RunStopped(Exception):
    """A run stopped by a signal; ``step``: where ``clpd run --resume run_dir`` continues
    (the step of its newest checkpoint, 0 if it has none)."""

    def __init__(
        self, sig: signal.Signals, step: int, run_dir: str, *, at_boundary: bool = True
    ) -> None:
        self.signal = sig
        self.step = step
        self.run_dir = run_dir
        self.at_boundary = at_boundary
        super().__init__(self.message())

    @property
    def exit_code(self) -> int:
        return exit_code(self.signal)

    def message(self) -> str:
        resume = f"continue with: clpd run --resume {self.run_dir}"
        if self.at_boundary:
            return f"stopped by {self.signal.name} at step {self.step}; {resume}"
        where = f"its last checkpoint is step {self.step}" if self.step else "it has no checkpoint"
        return f"stopped by {self.signal.name} at once; {where}; {resume}"


@dataclass
class _State:
    depth: int = 0
    armed: bool = False
    requested: signal.Signals | None = None
    saved: dict[signal.Signals, Any] = field(default_factory=dict)
    timer: threading.Timer | None = None


_state = _State()


def stop_requested() -> signal.Signals | None:
    """The signal that asked the run to stop at the next step boundary, if any."""
    return _state.requested


def _say(text: str) -> None:
    # os.write, not print: a handler may run while the progress bar is writing to stderr.
    with contextlib.suppress(OSError):
        os.write(2, f"\nclpd: {text}\n".encode())


def _handle(signum: int, frame: FrameType | None) -> None:
    sig = signal.Signals(signum)
    if _state.armed and _state.requested is None:
        _state.requested = sig
        grace = _grace_s()
        _say(
            f"{sig.name} received: stopping at the next step boundary with a checkpoint (at "
            f"once after {grace:g} s, or on a second signal)"
        )
        _state.timer = threading.Timer(grace, _thread.interrupt_main, args=(int(sig),))
        _state.timer.daemon = True
        _state.timer.start()
        return
    raise Interrupted(sig)


def _install() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handle)


@contextlib.contextmanager
def handling_stop_signals(*, armed: bool = False) -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` inside this block; with ``armed`` (the
    training loop, which polls :func:`stop_requested`), the first one only requests a stop.
    Nested blocks re-install the handlers (``ray.init`` replaces SIGTERM's); the outermost one
    puts back what was there before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outer_armed = _state.armed
    if _state.depth == 0:
        _state.saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        _state.requested = None
    _state.depth += 1
    _state.armed = armed
    _install()
    try:
        yield
    finally:
        _state.depth -= 1
        _state.armed = outer_armed
        if armed and _state.timer is not None:
            _state.timer.cancel()
            _state.timer = None
        if _state.depth == 0:
            _state.requested = None
            for sig, handler in _state.saved.items():
                signal.signal(sig, _restorable(handler))
        else:
            _install()


def _restorable(handler: Any) -> Callable[..., Any] | int:
    """``signal.getsignal`` gives None for a handler not set from Python: put the default back."""
    return signal.SIG_DFL if handler is None else handler
