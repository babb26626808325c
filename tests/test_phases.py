"""Start-up phase lines (runtime/phases.py): announced when they take a while, kept alive, and
closed with their time; a quick one stays silent."""

from __future__ import annotations

import io
import logging
import re
import time

import pytest

from clpd_ray.runtime import phases
from clpd_ray.runtime.phases import phase


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def fast(monkeypatch):
    """Shown after 0.1 s, heartbeats every 0.2 s for 12 beats (2.4 s), then every 5 s."""
    monkeypatch.setattr(phases, "_SHOW_AFTER_S", 0.1)
    monkeypatch.setattr(phases, "_EVERY_S", 0.2)
    monkeypatch.setattr(phases, "_LATER_EVERY_S", 5.0)


def test_a_log_gets_start_heartbeat_and_done_lines(fast):
    out = io.StringIO()
    with phase("starting actors", stream=out):
        time.sleep(3.0)  # shown at 0.1 s; beats at 0.3, 0.5, ... up to ~2.5 s; next at ~7.5 s
    lines = out.getvalue().splitlines()
    assert lines[0] == "clpd: starting actors ..."
    beats = lines[1:-1]
    assert 10 <= len(beats) <= 13, lines  # a loaded machine may slip one
    assert all(re.fullmatch(r"clpd: still starting actors \(\d s\)", b) for b in beats), beats
    assert re.fullmatch(r"clpd: starting actors: done in 3\.\d s", lines[-1]), lines


def test_a_quick_phase_prints_nothing():
    out = io.StringIO()
    with phase("fingerprinting the models", stream=out):
        pass
    assert out.getvalue() == ""
    with pytest.raises(KeyError), phase("checking", stream=out):
        raise KeyError("a check that fails at once leaves only its error")
    assert out.getvalue() == ""


def test_a_terminal_gets_a_spinner_on_one_line(fast):
    out = _Tty()
    with phase("loading data", stream=out):
        time.sleep(0.8)
    text = out.getvalue()
    assert re.match(r"clpd: loading data \.\.\.\r\x1b\[2Kclpd: loading data [|/\\-] 0 s", text)
    assert text.count("\n") == 1
    assert re.search(r"\r\x1b\[2Kclpd: loading data: done in 0\.\d s\n$", text), text


def test_no_heartbeat_prints_at_once_and_leaves_the_console_to_other_bars():
    out = _Tty()
    with phase("training teachers", heartbeat=False, stream=out):
        assert out.getvalue() == "clpd: training teachers ...\n"
        time.sleep(1.1)
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"clpd: training teachers: done in 1\.\d s", lines[1])
    assert len(lines) == 2


def test_a_slow_phase_that_fails_says_it_stopped(fast, caplog):
    out = io.StringIO()
    with pytest.raises(KeyError), phase("starting Ray", stream=out):
        time.sleep(0.15)
        raise KeyError("x")
    lines = out.getvalue().splitlines()
    assert lines[0] == "clpd: starting Ray ..."
    assert re.fullmatch(r"clpd: starting Ray: stopped after 0\.\d s", lines[-1]), lines
    with caplog.at_level(logging.INFO, logger="clpd_ray.runtime.run"), phase("quiet", False):
        pass
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "clpd: quiet ..." and messages[1].startswith("clpd: quiet: done in ")
