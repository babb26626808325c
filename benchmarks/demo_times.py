"""Whole-process wall time of ``clpd demo``: cold teacher cache, warm cache, and ``--quick``.

Each mode runs ``--repeat`` times (default 3) as a fresh process; the median is printed.
Cold runs get an empty cache directory each ($CLPD_CACHE); warm and quick runs share one cache
that a first, untimed run fills.

    python benchmarks/demo_times.py              # all three modes, 3 runs each
    python benchmarks/demo_times.py --modes quick warm --repeat 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_demo(cache: Path, out: Path, quick: bool) -> float:
    env = {**os.environ, "CLPD_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "clpd_ray.cli", "demo", "--out", str(out)] + (
        ["--quick"] if quick else []
    )
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--modes", nargs="+", default=["cold", "warm", "quick"], choices=["cold", "warm", "quick"]
    )
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shared = root / "cache-warm"
        times: dict[str, list[float]] = {}
        if {"warm", "quick"} & set(args.modes):
            print("filling the warm cache (untimed)...", flush=True)
            run_demo(shared, root / "fill", quick=False)
        for mode in args.modes:
            for i in range(args.repeat):
                cache = root / f"cache-cold-{i}" if mode == "cold" else shared
                t = run_demo(cache, root / f"{mode}-{i}", quick=mode == "quick")
                times.setdefault(mode, []).append(t)
                print(f"{mode} run {i + 1}: {t:.1f} s", flush=True)
    print(f"\n{'mode':<8}{'median s':>10}   runs")
    for mode, ts in times.items():
        print(f"{mode:<8}{statistics.median(ts):>10.1f}   {', '.join(f'{t:.1f}' for t in ts)}")


if __name__ == "__main__":
    main()
