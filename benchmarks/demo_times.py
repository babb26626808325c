"""Whole-process wall time of ``clpd demo``, and its longest silence, by cache state.

Modes: ``cold`` (full demo, empty teacher cache), ``warm`` (full demo, cached teachers),
``quick`` (``--quick``, its smoke-test ladder cached) and ``quick-cold`` (``--quick`` on an
empty teacher cache: its smoke-test ladder, teachers capped at 400 steps, is trained first).
Each mode runs ``--repeat`` times (default 3) as a fresh process; the median is printed. Cold
runs get an empty cache directory each ($CLPD_CACHE); warm and quick runs share one cache that
first, untimed runs fill (the full ladder for warm, the smoke-test one for quick).

The child's stdout and stderr are read as they stream, merged, as a log file would get them
(a pipe, not a terminal: the phase heartbeats and progress bars a log gets). The output is cut at
both '\\r' (progress bars redraw with it) and '\\n'; the longest silence is the longest time
without a non-empty piece, counting from the start and up to the exit. Each run prints it with
the text that ended it.

    python benchmarks/demo_times.py                  # cold, warm and quick, 3 runs each
    python benchmarks/demo_times.py --modes quick-cold --repeat 3
    python benchmarks/demo_times.py --modes quick warm --repeat 1 --keep-logs /tmp/demo-logs
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MODES = ["cold", "warm", "quick", "quick-cold"]


@dataclass(frozen=True)
class DemoRun:
    seconds: float
    silence_s: float  # the longest time without output
    silence_at_s: float  # when that silence ended (seconds from the start)
    silence_ended_by: str  # the output that ended it ("<exit>" if the process did)
    log: str  # the merged output, each piece prefixed by its time


def run_demo(cache: Path, out: Path, quick: bool) -> DemoRun:
    env = {**os.environ, "CLPD_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "clpd_ray.cli", "demo", "--out", str(out)] + (
        ["--quick"] if quick else []
    )
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    last = 0.0
    longest = (0.0, 0.0, "")
    lines: list[str] = []
    pending = b""
    while True:
        chunk = os.read(fd, 65536)
        now = time.perf_counter() - start
        if not chunk:
            break
        pending += chunk
        # Complete pieces only: the text up to the last '\r' or '\n'; the rest waits.
        cut = max(pending.rfind(b"\r"), pending.rfind(b"\n"))
        if cut < 0:
            continue
        text, pending = pending[: cut + 1].decode(errors="replace"), pending[cut + 1 :]
        pieces = [p for p in re.split(r"[\r\n]", text) if p.strip()]
        if not pieces:
            continue
        if now - last > longest[0]:
            longest = (now - last, now, pieces[0].strip()[:100])
        last = now
        lines += [f"{now:7.1f} {p}" for p in pieces]
    code = proc.wait()
    elapsed = time.perf_counter() - start
    if pending.strip():
        lines.append(f"{elapsed:7.1f} {pending.decode(errors='replace')}")
    if elapsed - last > longest[0]:
        longest = (elapsed - last, elapsed, "<exit>")
    log = "\n".join(lines)
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed ({code}):\n{log[-3000:]}")
    return DemoRun(elapsed, longest[0], longest[1], longest[2], log)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=["cold", "warm", "quick"], choices=MODES)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--keep-logs", type=Path, help="write each run's timed output here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shared = root / "cache-warm"
        runs: dict[str, list[DemoRun]] = {}
        for mode in ("warm", "quick"):  # --quick trains its own, smaller ladder
            if mode in args.modes:
                print(f"filling the cache for {mode} (untimed)...", flush=True)
                run_demo(shared, root / f"fill-{mode}", quick=mode == "quick")
        for mode in args.modes:
            for i in range(args.repeat):
                cold = mode in ("cold", "quick-cold")
                cache = root / f"cache-{mode}-{i}" if cold else shared
                r = run_demo(cache, root / f"{mode}-{i}", quick=mode.startswith("quick"))
                runs.setdefault(mode, []).append(r)
                if args.keep_logs is not None:
                    args.keep_logs.mkdir(parents=True, exist_ok=True)
                    (args.keep_logs / f"{mode}-{i + 1}.log").write_text(r.log + "\n")
                print(
                    f"{mode} run {i + 1}: {r.seconds:.1f} s; longest silence {r.silence_s:.1f} s "
                    f"(ended at {r.silence_at_s:.1f} s by: {r.silence_ended_by})",
                    flush=True,
                )
    print(f"\n{'mode':<11}{'median s':>10}{'max silence s':>15}   runs (s)")
    for mode, rs in runs.items():
        times = ", ".join(f"{r.seconds:.1f}" for r in rs)
        median = statistics.median(r.seconds for r in rs)
        print(f"{mode:<11}{median:>10.1f}{max(r.silence_s for r in rs):>15.1f}   {times}")


if __name__ == "__main__":
    main()
