"""Chaos soak: SIGKILL a random actor every ~N steps of a long run, then check the final student
equals an uninterrupted run's, tensor for tensor.

    python benchmarks/chaos.py CONFIG --out DIR [--every 100] [--seed 0] [--driver-kill 0.5]
                               [--set KEY=VALUE ...] [--clean DIR]

It runs ``clpd run CONFIG --out DIR/chaos`` and watches its ``metrics.jsonl``; each time the run
has logged ~N more steps than at the last kill (N x a seeded factor in [0.5, 1.5]), it SIGKILLs
one actor process: the kinds (teacher, student, scheduler) come in seeded shuffled rounds, so
each gets a third of the kills; a teacher kill takes the teacher of the latest decision (it has
requests in flight). With ``--driver-kill F`` it also SIGKILLs the driver alone once the run has
logged F x total_steps, checks that the Ray processes it started are gone within seconds, and
continues with ``clpd run --resume DIR/chaos``. Then it runs the same config uninterrupted
(``DIR/clean``, or reuses ``--clean``) and compares ``student/model.safetensors`` with
``torch.equal`` on every tensor. Prints the kills by kind, recoveries, wall times and the
verdict; exit 0 only when the weights are equal.

Recovery limits: the student and the scheduler restart at most ``CLPD_STATEFUL_MAX_RESTARTS``
times per driver (default 3), a teacher instance ``CLPD_TEACHER_MAX_RESTARTS`` times (default
3) and a driver replays at most ``CLPD_MAX_RECOVERIES`` times (default 10); the soak sets all
three above the kills it plans. Actors are found as the driver's
Ray worker processes, by the ``:actor_name:`` line Ray writes at the top of each worker's log.
Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from clpd_ray.config import load_config

KINDS = ("teacher", "student", "scheduler")
_CLASSES = {
    "TeacherService": "teacher",
    "StudentTrainer": "student",
    "SchedulerService": "scheduler",
}
_ACTOR_LINE = re.compile(r"^:actor_name:(\w+)\(([^,)]*)", re.M)


# ---------------------------------------------------------------------- processes (from /proc)


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(d.name))
    return kids


def descendants(root: int) -> list[int]:
    kids, found, todo = _children(), [], [root]
    while todo:
        for child in kids.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass(frozen=True)
class Actor:
    pid: int
    kind: str  # teacher, student, scheduler
    name: str  # the teacher's ladder name; the kind for the others


def actors(driver: int) -> list[Actor]:
    """The run's live actor processes: Ray workers below the driver, named by their log."""
    found = []
    for pid in descendants(driver):
        with contextlib.suppress(OSError):
            log = os.readlink(f"/proc/{pid}/fd/1")
            if "/logs/worker-" not in log or not alive(pid):
                continue
            lines = _ACTOR_LINE.findall(Path(log).read_text(errors="replace"))
            if lines and lines[-1][0] in _CLASSES:
                cls, arg = lines[-1]
                kind = _CLASSES[cls]
                found.append(Actor(pid, kind, arg.strip() if kind == "teacher" else kind))
    return found


# ---------------------------------------------------------------------- the run's files


def _rows(path: Path) -> list[dict]:
    rows = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


def logged_step(run: Path) -> int:
    rows = _rows(run / "metrics.jsonl")
    return max((int(r["step"]) for r in rows), default=0)


def teacher_in_use(run: Path) -> str | None:
    rows = _rows(run / "decisions.jsonl")
    return str(rows[-1]["teacher"]) if rows else None


def same_student(a: Path, b: Path) -> tuple[bool, list[str]]:
    x = load_file(str(a / "student" / "model.safetensors"))
    y = load_file(str(b / "student" / "model.safetensors"))
    differ = sorted(
        k for k in x.keys() | y.keys() if k not in x or k not in y or not torch.equal(x[k], y[k])
    )
    return not differ, differ


# ---------------------------------------------------------------------- the soak


@dataclass
class Soak:
    run: Path
    every: int
    rng: random.Random
    log: Path
    kills: Counter[str] = field(default_factory=Counter)
    events: list[str] = field(default_factory=list)
    drivers: int = 0
    round: list[str] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f} s] {text}"
        self.events.append(line)
        print(line, flush=True)

    def start(self, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        self.drivers += 1
        with self.log.open("ab") as f:
            f.write(f"\n==== driver {self.drivers}: clpd run {' '.join(args)}\n".encode())
        return subprocess.Popen(
            [sys.executable, "-m", "clpd_ray.cli", "run", *args],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def next_gap(self) -> int:
        return max(1, round(self.every * self.rng.uniform(0.5, 1.5)))

    def next_kind(self) -> str:
        if not self.round:
            self.round = list(KINDS)
            self.rng.shuffle(self.round)
        return self.round.pop()

    def kill_actor(self, driver: int, kind: str, step: int) -> bool:
        live = [a for a in actors(driver) if a.kind == kind]
        if kind == "teacher":
            used = teacher_in_use(self.run)
            live = [a for a in live if a.name == used] or live
        if not live:
            return False
        target = self.rng.choice(live)
        with contextlib.suppress(ProcessLookupError):
            os.kill(target.pid, signal.SIGKILL)
        self.kills[kind] += 1
        self.say(f"step {step}: SIGKILL {target.name} (pid {target.pid})")
        return True

    def kill_driver(self, proc: subprocess.Popen[bytes], step: int) -> float:
        """SIGKILL the driver alone; seconds until every process it had started is gone."""
        below = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        t = time.monotonic()
        while any(alive(p) for p in below) and time.monotonic() - t < 60:
            time.sleep(0.2)
        gone = time.monotonic() - t
        left = [p for p in below if alive(p)]
        self.kills["driver"] += 1
        self.say(
            f"step {step}: SIGKILL the driver (pid {proc.pid}); its {len(below)} processes "
            f"gone after {gone:.1f} s" + (f", still running: {left}" if left else "")
        )
        return gone


def run_chaos(
    config: Path, sets: list[str], out: Path, every: int, seed: int, driver_kill: float | None
) -> tuple[Soak, int, float]:
    total = load_config(config, sets).train.total_steps
    run = out / "chaos"
    soak = Soak(run=run, every=every, rng=random.Random(seed), log=out / "chaos.log")
    planned = total // max(1, every) + 10
    env = {
        **os.environ,
        "CLPD_STATEFUL_MAX_RESTARTS": str(planned),
        "CLPD_MAX_RECOVERIES": str(planned),
        "CLPD_TEACHER_MAX_RESTARTS": str(planned),
    }
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own
    set_args = [a for s in sets for a in ("--set", s)]
    proc = soak.start([str(config), "--out", str(run), *set_args], env)
    soak.say(f"clpd run {config} --out {run} (pid {proc.pid}); a kill every ~{every} steps")
    last_kill, gap = 0, soak.next_gap()
    kill_driver_at = None if driver_kill is None else int(driver_kill * total)
    resume_due = False
    while proc.poll() is None or resume_due:
        if proc.poll() is not None:  # the driver was killed: continue the run
            proc, resume_due = soak.start(["--resume", str(run)], env), False
            soak.say(f"clpd run --resume {run} (pid {proc.pid})")
            continue
        step = logged_step(run)
        if kill_driver_at is not None and step >= kill_driver_at:
            soak.kill_driver(proc, step)
            kill_driver_at, resume_due = None, True
            continue
        if step >= last_kill + gap and soak.kill_actor(proc.pid, soak.next_kind(), step):
            last_kill, gap = step, soak.next_gap()
        time.sleep(0.2)
    wall = time.monotonic() - soak.t0
    return soak, proc.returncode, wall


def _recoveries(log: Path) -> int:
    return len(re.findall(r"clpd: an actor failed", log.read_text(errors="replace")))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config")
    p.add_argument("--out", required=True, help="a new directory: chaos/, clean/ and logs")
    p.add_argument("--every", type=int, default=100, help="steps between actor kills (about)")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill steps and targets")
    p.add_argument(
        "--driver-kill",
        type=float,
        metavar="F",
        help="also SIGKILL the driver once F x total_steps are logged, then --resume",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--clean", help="an uninterrupted run of the same config to compare with")
    a = p.parse_args(argv)
    config = Path(a.config).resolve()
    if a.clean and not (Path(a.clean) / "student" / "model.safetensors").is_file():
        p.error(f"--clean {a.clean}: not a finished run (no student/model.safetensors)")
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=False)

    soak, code, chaos_wall = run_chaos(config, a.set, out, a.every, a.seed, a.driver_kill)
    if code != 0:
        print(f"FAIL: the chaos run exited {code}; see {soak.log}")
        return 1
    clean_wall = 0.0
    if a.clean:
        clean = Path(a.clean).resolve()
    else:
        clean = out / "clean"
        t = time.monotonic()
        with (out / "clean.log").open("wb") as log:
            args = [str(config), "--out", str(clean), *[x for s in a.set for x in ("--set", s)]]
            done = subprocess.run(
                [sys.executable, "-m", "clpd_ray.cli", "run", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
            )
        clean_wall = time.monotonic() - t
        if done.returncode != 0:
            print(f"FAIL: the clean run exited {done.returncode}; see {out / 'clean.log'}")
            return 1
    equal, differ = same_student(soak.run, clean)
    summary = json.loads((soak.run / "summary.json").read_text())
    actor_kills = sum(soak.kills[k] for k in KINDS)
    figures = {
        "steps": summary["steps"],
        "kills": {k: soak.kills[k] for k in (*KINDS, "driver")},
        "actor_kills": actor_kills,
        "recoveries": _recoveries(soak.log),
        "drivers": soak.drivers,
        "resumed_from_step": summary.get("resumed_from_step"),
        "chaos_wall_s": round(chaos_wall, 1),
        "clean_wall_s": round(clean_wall, 1) if not a.clean else None,
        "weights_equal": equal,
    }
    (out / "chaos.json").write_text(json.dumps({**figures, "events": soak.events}, indent=2))
    print(json.dumps(figures, indent=2))
    verdict = "PASS" if equal else f"FAIL: tensors differ from the clean run: {differ}"
    print(f"{verdict} ({actor_kills} actor kills, {soak.kills['driver']} driver kills)")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
