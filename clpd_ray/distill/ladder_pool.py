"""Training the ladder's missing teachers at once, one worker process each.

Tiny teachers are bound by per-operation overhead more than arithmetic, so a process gains
little beyond a few threads, and on a machine with many cores one process per two cores should
train a ladder sooner than one process with every core (a reasoned default: measured only on
2 cores, where two one-thread workers lost to one two-thread process, 194-211 s vs 176 s for a
cold ``clpd demo --quick``, which is why fewer than 4 CPUs train in the driver). ``ensure_ladder`` uses this when more than one teacher
is missing, the machine has at least four CPUs and the work is worth the workers' start-up (``MIN_PARALLEL_STEPS``; a worker imports torch and transformers, seconds)::

    driver (ensure_ladder)                          spawned workers (cores / workers threads each)
      submit the jobs, costliest first  ───────────▶  train_teacher(...) ─▶ <cache>/<name>-<key>/
      one bar: the steps of all, each one's state ◀── shared step counters (RawArray)
      "teacher X: ... accuracy" as each ends      ◀── its LadderEntry, or its exception

Workers are started with 'spawn' (no forked copy of the driver's threads, Ray or CUDA state)
and hide the GPUs: teachers train on the CPU here as they do in the driver (``train_teacher``
never moves them), and no worker makes a CUDA context on a GPU machine. A worker's exception is
raised again in the driver as the same exception (its traceback as ``__cause__``) and the other
workers are ended at once; a worker ends itself when the driver dies.

The weights can differ in the last bits from those one process with more threads makes (the
thread count changes the order of float sums); for a given machine they are the same run to run.
``CLPD_LADDER_WORKERS=1`` trains every teacher in the driver, one after the other.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from clpd_ray.config import TeacherSpec
from clpd_ray.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from clpd_ray.data.example import Example
    from clpd_ray.distill.ladder import LadderEntry

__all__ = ["TeacherJob", "cpu_count", "train_in_processes", "worker_count"]

WORKERS_ENV = "CLPD_LADDER_WORKERS"
# Steps that must leave the longest teacher's process before workers pay for their start-up
# (~4 s of imports each; a demo teacher step takes ~25 ms, so ~300 steps is ~8 s of work).
MIN_PARALLEL_STEPS = 300
THREADS_PER_WORKER = 2  # the default split: cores // 2 workers (worker_count)
_QUEUED = -1  # a job's step counter before its worker has picked it up
_REFRESH_S = 1.0  # the bar is redrawn at least this often, so the console never goes quiet


@dataclass(frozen=True)
class TeacherJob:
    """One missing teacher: what ``train_teacher`` needs beyond the settings all jobs share."""

    spec: TeacherSpec
    tokenizer: PreTrainedTokenizerBase
    out_dir: Path
    max_length: int | None

    @property
    def cost(self) -> int:
        """A rough relative training cost (steps x layers x width), to start the longest first."""
        return self.spec.train_steps * self.spec.n_layer * self.spec.n_embd


def cpu_count() -> int:
    """CPUs this process may run on (its affinity, e.g. a container's share), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def worker_count(steps: Sequence[int], requested: int | None = None) -> int:
    """Processes to train the missing teachers (their ``train_steps``) with: ``requested``, else
    $CLPD_LADDER_WORKERS, else one per two CPUs when the work moved off the longest teacher is worth
    a worker's start-up (several seconds of imports); never more than the teachers. 1 means: in
    this process, one after the other."""
    missing = len(steps)
    if requested is None:
        raw = os.environ.get(WORKERS_ENV, "").strip()
        if raw:
            try:
                requested = int(raw)
            except ValueError:
                requested = 0
            if requested < 1:
                raise ConfigError(
                    f"{WORKERS_ENV}={raw!r}: give a whole number of processes, at least 1 "
                    "(1 trains the teachers in this process, one after the other)"
                )
    if requested is None and sum(steps) - max(steps, default=0) < MIN_PARALLEL_STEPS:
        return 1  # tiny ladders (tests, smoke configs): quicker here than a worker's imports
    # Two threads per worker at least: one tiny teacher trains 1.5-1.7x faster on two threads
    # than on one (measured on 2 cores, t-large 54 -> 32 ms/step), so two one-thread workers on
    # two cores lose to one process (cold `clpd demo --quick`: 194 / 211 s vs 176 s).
    limit = cpu_count() // THREADS_PER_WORKER if requested is None else requested
    return max(1, min(missing, limit))


# In a worker: the shared step counters (one per job) and nothing else of the driver's.
_STEPS: Any = None


def _init_worker(steps: Any, threads: int, parent: int) -> None:
    global _STEPS
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch looks: no CUDA context in a worker
    import torch

    torch.set_num_threads(threads)
    _STEPS = steps
    threading.Thread(
        target=_exit_with, args=(parent,), name="clpd-ladder-parent", daemon=True
    ).start()


def _exit_with(parent: int) -> None:
    """End this worker when the driver is gone (killed: nobody would read its teacher)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _train(
    slot: int,
    job: TeacherJob,
    train: Sequence[Example],
    held_out: Sequence[Example],
    common: dict[str, Any],
) -> LadderEntry:
    from clpd_ray.distill.ladder import train_teacher

    steps = _STEPS
    steps[slot] = 0

    def on_step(done: int) -> None:
        steps[slot] = done

    return train_teacher(
        job.spec,
        job.tokenizer,
        list(train),
        list(held_out),
        out_dir=job.out_dir,
        max_length=job.max_length,
        progress=False,
        on_step=on_step,
        **common,
    )


def _state(job: TeacherJob, done: int, finished: bool, starting: bool) -> str:
    name, total = job.spec.name, job.spec.train_steps
    if finished:
        return f"{name} done"
    if done == _QUEUED:  # its worker is still importing torch, or busy with another teacher
        return f"{name} {'starting' if starting else 'queued'}"
    if done >= total:
        return f"{name} scoring"
    return f"{name} {done}/{total}"


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and end the workers now (a running teacher is abandoned:
    its half-written ``.tmp`` directory is cleared by the next attempt)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    # A join can return with the process still alive (seen with a worker still starting up);
    # what does not end on SIGTERM within the window gets SIGKILL.
    deadline = time.monotonic() + 10
    for p in procs:
        while p.is_alive() and time.monotonic() < deadline:
            p.join(timeout=0.2)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def train_in_processes(
    jobs: Sequence[TeacherJob],
    workers: int,
    *,
    train: Sequence[Example],
    held_out: Sequence[Example],
    progress: bool,
    announce: Any,
    **common: Any,
) -> list[LadderEntry]:
    """Train ``jobs`` in ``workers`` spawned processes; their entries, in the order of ``jobs``.

    ``common`` are the ``train_teacher`` keyword arguments all jobs share; ``announce(name,
    accuracy)`` makes the line printed as each teacher ends."""
    ctx = mp.get_context("spawn")
    steps = ctx.RawArray("q", len(jobs))
    for i in range(len(jobs)):
        steps[i] = _QUEUED
    threads = max(1, cpu_count() // workers)
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i].cost)  # the longest first
    results: dict[int, LadderEntry] = {}
    bar = tqdm(
        total=sum(j.spec.train_steps for j in jobs),
        desc=f"train {len(jobs)} teachers in {workers} processes",
        unit="step",
        disable=not progress,
        leave=False,
        mininterval=_REFRESH_S,  # a log gets a line a second, not one per update
    )
    pool = ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(steps, threads, os.getpid())
    )
    finished = False
    try:
        futures: dict[Future, int] = {
            pool.submit(_train, i, jobs[i], train, held_out, common): i for i in order
        }
        pending = set(futures)
        starting = set(order[:workers])  # the first jobs each worker takes
        drawn = 0.0  # when this loop last redrew the bar (bar.update draws too)
        while pending:
            done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            for f in done:
                i = futures[f]
                try:
                    entry = f.result()  # a worker's exception is raised here, as it was there
                except BrokenProcessPool as err:
                    names = ", ".join(
                        jobs[k].spec.name for k in futures.values() if k not in results
                    )
                    raise RuntimeError(
                        f"a teacher-training worker process ended abruptly (killed, or out of "
                        f"memory?) while training {names}; {WORKERS_ENV}=1 trains the teachers "
                        "in this process instead"
                    ) from err
                results[i] = entry
                if progress and entry.accuracy:
                    tqdm.write(announce(entry.name, entry.accuracy))
                    sys.stdout.flush()  # at once in a log too (tqdm.write does not flush)
            if progress:
                total = sum(
                    j.spec.train_steps if k in results else max(0, steps[k])
                    for k, j in enumerate(jobs)
                )
                bar.update(total - bar.n)
                bar.set_postfix_str(
                    ", ".join(
                        _state(jobs[k], steps[k], k in results, k in starting) for k in order
                    ),
                    refresh=False,
                )
                # Redrawn at least every _REFRESH_S even when no step was made (workers
                # starting, teachers being scored): the console never goes quiet for long.
                now = time.time()
                if done or now - max(drawn, bar.last_print_t) >= _REFRESH_S:
                    bar.refresh()
                    drawn = now
        finished = True
    finally:
        bar.close()
        if finished:
            pool.shutdown(wait=True)
        else:
            _stop(pool)
    return [results[i] for i in range(len(jobs))]
