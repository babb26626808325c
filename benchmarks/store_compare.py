"""The target store in a real ablation: the same `clpd ablate` with the store off and on.

Runs, one after the other in fresh output directories and fresh processes::

    clpd ablate CONFIG --quick --arms ARMS --seeds N --set teachers.target_store=off
    clpd ablate CONFIG --quick --arms ARMS --seeds N        # default: one store for all runs

and prints each invocation's wall time and their ratio, the teacher target rows each computed,
the rows the store saved, and whether every arm/seed's final student is the same tensors in both.

    python benchmarks/store_compare.py        # configs/ablation.yaml, the 4 fixed arms, 2 seeds
    python benchmarks/store_compare.py --arms clpd --seeds 1 --keep runs/store-compare

Counting teacher rows (one row = one example's targets from one teacher):

- store on: every run's summary.json ``target_store`` counts per teacher; rows computed are
  ``misses`` (computed for a request) + ``ahead`` (computed by an idle teacher working ahead),
  summed over arms and seeds; ``hits`` are rows served from the store.
- store off: nothing is stored, so every row a step asks for is computed. The four fixed arms ask
  one teacher per step for the whole batch and read no probes, so a run computes
  ``train.total_steps x train.batch_size`` rows (read from each run's config.yaml). The script
  checks this against the store run: its hits + misses must be the same total (the same steps
  ask for the same rows).

Without a store a teacher computes a batch ``teachers.micro_batch`` rows per forward pass; with a
store one row per pass (so that a stored row never depends on its batch: docs/reliability.md).
The teacher ladder is built (trained, or read from the cache) before either timing starts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
ARMS = "standard_kd,data_only,teacher_only,clpd"
MODES = {"store off": ["--set", "teachers.target_store=off"], "shared store": []}


def _clpd() -> list[str]:
    exe = Path(sys.executable).with_name("clpd")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "clpd_ray.cli"]


def ablate(config: str, out: Path, arms: str, seeds: str, extra: list[str]) -> float:
    """One `clpd ablate` invocation; its wall time in seconds."""
    cmd = [*_clpd(), "ablate", config, "--quick", "--arms", arms, "--seeds", seeds]
    cmd += ["--out", str(out), *extra]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"clpd ablate exited {proc.returncode}")
    return wall


def runs(out: Path) -> dict[str, Path]:
    """``<arm>/seed-<s>`` -> run directory, for every finished run."""
    return {
        f"{d.parent.name}/{d.name}": d
        for d in sorted((out / "runs").glob("*/seed-*"))
        if (d / "summary.json").is_file()
    }


def counts(out: Path) -> dict[str, Any]:
    """Rows requested by the steps, rows computed, store hits, training wall and teacher busy
    time, summed over the ablation's runs."""
    c = {"requested": 0, "hits": 0, "misses": 0, "ahead": 0, "train_s": 0.0, "teacher_s": 0.0}
    c["passes_whole"] = 0  # forward passes when each batch is computed whole (no store)
    for d in runs(out).values():
        summary = json.loads((d / "summary.json").read_text())
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        steps, batch = int(cfg["train"]["total_steps"]), int(cfg["train"]["batch_size"])
        c["requested"] += steps * batch
        c["passes_whole"] += steps * -(-batch // int(cfg["teachers"]["micro_batch"]))
        for store in summary.get("target_store", {}).values():
            for k in ("hits", "misses", "ahead"):
                c[k] += int(store.get(k, 0))
        c["train_s"] += float(summary.get("wall_s", 0.0))
        c["teacher_s"] += sum(v for k, v in summary["busy_s"].items() if k.startswith("teacher-"))
    return c


def compare_students(a: Path, b: Path) -> dict[str, float | None]:
    """Per run: None when every tensor of the final student is equal, else the largest absolute
    difference over the tensors."""
    out: dict[str, float | None] = {}
    ra, rb = runs(a), runs(b)
    for name in sorted(ra.keys() | rb.keys()):
        if name not in ra or name not in rb:
            out[name] = float("nan")
            continue
        x = load_file(str(ra[name] / "student" / "model.safetensors"))
        y = load_file(str(rb[name] / "student" / "model.safetensors"))
        if x.keys() != y.keys():
            out[name] = float("nan")
            continue
        diff = max((x[k].float() - y[k].float()).abs().max().item() for k in x)
        equal = all(torch.equal(x[k], y[k]) for k in x)
        out[name] = None if equal else diff
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "ablation.yaml"))
    p.add_argument("--arms", default=ARMS)
    p.add_argument("--seeds", default="2")
    p.add_argument("--keep", help="write the two ablations under this directory (default: a temp)")
    p.add_argument(
        "--report",
        metavar="DIR",
        help="only print the counts and the weight comparison of the ablations a --keep DIR run "
        "left (no new runs; no wall times)",
    )
    args = p.parse_args()
    if args.report:
        root = Path(args.report)
        table(root, args, {}, {m: counts(root / m.replace(" ", "-")) for m in MODES})
        return

    from clpd_ray.cli import QUICK_OVERRIDES
    from clpd_ray.config import load_config
    from clpd_ray.workload import build_workload

    start = time.perf_counter()
    build_workload(load_config(args.config, QUICK_OVERRIDES), progress=False)
    print(f"teacher ladder ready (trained or cached) in {time.perf_counter() - start:.1f} s")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="store-compare-"))
    root.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} at the start")
    wall, c = {}, {}
    for mode, extra in MODES.items():
        out = root / mode.replace(" ", "-")
        wall[mode] = ablate(args.config, out, args.arms, args.seeds, extra)
        c[mode] = counts(out)
    table(root, args, wall, c)


def table(root: Path, args: Any, wall: dict[str, float], c: dict[str, dict[str, Any]]) -> None:
    off, on = c["store off"], c["shared store"]
    computed_off = off["requested"]  # no store: every requested row is computed
    computed_on = on["misses"] + on["ahead"]
    same = compare_students(root / "store-off", root / "shared-store")

    if wall:
        print(
            f"\nclpd ablate {Path(args.config).name} --quick --arms {args.arms} --seeds {args.seeds}"
        )
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end")
    else:
        print(f"counts of the ablations kept in {root} (--report: no runs, no wall times)")
    print(f"{'':<34}{'store off':>14}{'shared store':>14}")
    if wall:
        print(
            f"{'wall time, whole invocation (s)':<34}"
            f"{wall['store off']:>14.1f}{wall['shared store']:>14.1f}"
        )
    print(f"{'training wall, sum over runs (s)':<34}{off['train_s']:>14.1f}{on['train_s']:>14.1f}")
    print(
        f"{'teacher busy, sum over runs (s)':<34}{off['teacher_s']:>14.1f}{on['teacher_s']:>14.1f}"
    )
    print(f"{'target rows requested by steps':<34}{off['requested']:>14d}{on['requested']:>14d}")
    print(f"{'target rows computed':<34}{computed_off:>14d}{computed_on:>14d}")
    print(f"{'  of which worked ahead':<34}{0:>14d}{on['ahead']:>14d}")
    print(f"{'rows served from the store (hits)':<34}{0:>14d}{on['hits']:>14d}")
    passes = f"{'teacher forward passes':<34}{off['passes_whole']:>14d}{computed_on:>14d}"
    print(passes + "  (off: micro_batch rows per pass; store: 1 row per pass)")
    if wall:
        print(f"wall-time ratio shared store / off: {wall['shared store'] / wall['store off']:.3f}")
    saved = computed_off - computed_on
    print(f"teacher rows saved: {saved} of {computed_off} ({saved / max(1, computed_off):.1%})")
    check = on["hits"] + on["misses"]
    print(
        f"check: store run hits + misses = {check}, rows requested = {on['requested']} "
        f"({'equal' if check == on['requested'] else 'NOT equal'})"
    )
    unequal = {k: v for k, v in same.items() if v is not None}
    print(f"final students equal (every tensor) in {len(same) - len(unequal)} of {len(same)} runs")
    for name, diff in unequal.items():
        print(f"  {name}: differ, largest absolute difference {diff:.3g}")
    print(f"ablations kept in {root}")


if __name__ == "__main__":
    main()
