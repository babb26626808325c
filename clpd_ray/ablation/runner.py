"""Ablations: every arm x seed on the same data, teacher ladder and step budget; resumable.

Arms (policies) are in :mod:`clpd_ray.ablation.arms`. Every run of seed ``s`` has ``seed=s`` in its
config, which fixes the student's initialisation and the sampler for all arms alike; the data and
the teacher ladder come from the base config and are built once (:func:`build_workload`) and
shared, so all runs see the same examples and the same teachers. Runs go concurrently on Ray, each
on its own driver thread (``run_distillation`` blocks) with its own actor names::

    driver: plan arms x seeds ──▶ skip runs with summary.json ──▶ build_workload(base)
            thread 1: run_distillation(arm A, seed 0) ─┐  (actors <name>-<tag>-A-s0)
            thread 2: run_distillation(arm B, seed 0) ─┼─▶ results.jsonl (a row per run)
            ...  (at most --parallel at once)         ─┘   └─▶ summary.json, report.md, figures/

Output directory::

    <out>/ablation.json   the base config, the ladder, every arm's spec, and every (arm, seed)
                          asked for so far
          results.jsonl   a row per finished run (arm, seed, accuracy, accuracy_by_difficulty,
                          floor, full_chain, learning curve when train.eval_every is set, ...)
          summary.json, report.md, figures/*.png  (clpd_ray.ablation.report; `clpd report <out>` redoes them)
          runs/<arm>/seed-<s>/                      run directories (clpd_ray.runtime.rundir)
          targets/                                  teacher target store shared by every run
                                                    (unless teachers.target_store is set)

Resuming: a run whose directory holds summary.json is finished and not redone; a directory
without one is a run that was cut short and is deleted and redone. Each invocation runs the arms
and seeds it is given, and may add some (``--seeds 5`` after ``--seeds 3``, a new arm); the
results and report cover every finished run asked for so far. ``results.jsonl`` is rebuilt from
the finished run directories, so it never holds a run twice. An arm is known by its name (its
label): asking for a name again with another spec is refused.

Learning curves: with ``train.eval_every`` set, every run writes a held-out evaluation every N
steps to its ``eval.jsonl``; its results row carries them as ``curve`` ([[step, accuracy], ...],
ending with the final evaluation), which the report plots per arm with a band over seeds.
"""

from __future__ import annotations

import copy
import json
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from clpd_ray.ablation.arms import Arm, describe_seeds, parse_arm, run_config
from clpd_ray.ablation.results import MANIFEST, RESULTS, read_jsonl, read_results
from clpd_ray.config import Config
from clpd_ray.data.task import HELD_OUT_SPLIT
from clpd_ray.errors import ClpdError
from clpd_ray.runtime.rundir import write_json_atomic

__all__ = [
    "MANIFEST",
    "RESULTS",
    "PlannedRun",
    "learning_curve",
    "plan_runs",
    "read_results",
    "run_ablation",
]


@dataclass(frozen=True)
class PlannedRun:
    arm: Arm
    seed: int
    rel: str  # run directory relative to the ablation directory

    def path(self, out: Path) -> Path:
        return out / self.rel


def plan_runs(arms: Sequence[Arm], seeds: Sequence[int]) -> list[PlannedRun]:
    """Seed-major order, so a cut-short ablation has whole seeds (complete pairs) done first."""
    return [PlannedRun(a, s, f"runs/{a.slug}/seed-{s}") for s in seeds for a in arms]


def _with_earlier(
    plan: list[PlannedRun],
    earlier: Sequence[tuple[str, int]],
    config: Config,
    specs: dict[str, str] | None = None,
) -> list[PlannedRun]:
    """This invocation's runs together with those asked for before, seed-major, arms in the
    order they were first asked for. ``specs``: arm name -> spec of the arms asked for before
    (ablation.json ``arms``; a name missing there is its own spec)."""
    specs = specs or {}
    now = {r.arm.name: r.arm for r in plan}
    for name, arm in now.items():
        if name in specs and specs[name] != arm.source:
            raise ClpdError(
                f"arm {name!r} was {specs[name]!r} in this ablation before, now {arm.source!r}; "
                f"give the new arm another label (LABEL=spec), or use a new --out"
            )
    names = list(dict.fromkeys([*(a for a, _ in earlier), *now]))
    old = [n for n in names if n not in now]
    arms = {**{a.name: a for a in _reparse(old, specs, config)}, **now}
    pairs = {*earlier, *((r.arm.name, r.seed) for r in plan)}
    rank = {n: i for i, n in enumerate(names)}
    return [
        run
        for a, s in sorted(pairs, key=lambda p: (p[1], rank[p[0]]))
        for run in plan_runs([arms[a]], [s])
    ]


def _reparse(names: list[str], specs: dict[str, str], config: Config) -> list[Arm]:
    arms = []
    for name in names:
        arm = parse_arm(specs.get(name, name), config)
        arms.append(replace(arm, name=name) if arm.name != name else arm)
    return arms


def learning_curve(run_dir: Path, summary: dict[str, Any]) -> list[list[float]]:
    """[[step, accuracy], ...] of a finished run: its ``eval.jsonl`` rows (``train.eval_every``)
    then the final evaluation at ``summary["steps"]``; [] when the run has no eval.jsonl rows."""
    path = run_dir / "eval.jsonl"
    rows = read_jsonl(path) if path.is_file() else []
    points = {int(r["step"]): float(r["accuracy"]) for r in rows}
    if not points:
        return []
    points[int(summary["steps"])] = float(summary["student"]["accuracy"])
    return [[s, points[s]] for s in sorted(points)]


# Beside accuracy in summary.json's "student", copied to results rows when present.
_EXTRA = ("floor", "floor_answer", "full_chain", "full_chain_by_difficulty")


def _row(run: PlannedRun, summary: dict[str, Any], out: Path | None = None) -> dict[str, Any]:
    student = summary["student"]
    curve = learning_curve(run.path(out), summary) if out is not None else []
    return {
        "arm": run.arm.name,
        "seed": run.seed,
        "policy": summary["policy"],
        "teacher": run.arm.teacher,
        "accuracy": student["accuracy"],
        "accuracy_by_difficulty": student["accuracy_by_difficulty"],
        "n_eval": student["n"],
        "steps": summary["steps"],
        "wall_s": summary["wall_s"],
        "train_wall_s": summary["train_wall_s"],
        "run_dir": run.rel,
        "run_id": summary["run_id"],
        **{k: student[k] for k in _EXTRA if k in student},
        **({"curve": curve} if curve else {}),
    }


def _check_manifest(out: Path, config: Config) -> tuple[list[tuple[str, int]], dict[str, str]]:
    """The (arm, seed) runs asked for before in ``out`` and the arms' specs; refuses a directory
    made for another config, or one that is not an ablation directory."""
    manifest = out / MANIFEST
    if manifest.is_file():
        before = json.loads(manifest.read_text())
        # Where the runs execute (cluster.*) does not change what they compute.
        diff = _diff({**before["config"], "cluster": None}, {**config.to_dict(), "cluster": None})
        if diff:
            raise ClpdError(
                f"--out {out} holds an ablation of a different config (differs at "
                f"{', '.join(diff[:8])}); finished runs would not be comparable: use the same "
                f"config, --quick and --set as before, or a new --out"
            )
        made = before.get("eval_split") or "a clpd that let evaluation problems into training"
        if made != _eval_split(config):
            raise ClpdError(
                f"--out {out} holds runs evaluated on another held-out set (drawn by {made}, now "
                f"{_eval_split(config)}); their accuracies would not compare: use a new --out"
            )
        specs = {str(k): str(v) for k, v in before.get("arms", {}).items()}
        return [(str(a), int(s)) for a, s in before["runs"]], specs
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ClpdError(
            f"--out {out} exists and is not an ablation directory (no {MANIFEST}); choose a new "
            f"directory"
        )
    return [], {}


def _eval_split(config: Config) -> str:
    """How the evaluation set is drawn: the embedded task's draw (data/task.py), or the file's."""
    return HELD_OUT_SPLIT if config.data.path is None else "data files"


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        ]
    return [] if a == b else [prefix.rstrip(".")]


def _resume(
    out: Path, known: list[PlannedRun], plan: list[PlannedRun]
) -> tuple[list[dict[str, Any]], list[PlannedRun]]:
    """Rows of the finished runs, and the runs of ``plan`` still to do (partial directories
    removed; those of runs not asked for now are left alone)."""
    rows, todo = [], []
    root = (out / "runs").resolve()
    asked = {(r.arm.name, r.seed) for r in plan}
    for run in known:
        path = run.path(out)
        if (path / "summary.json").is_file():
            rows.append(_row(run, json.loads((path / "summary.json").read_text()), out))
            continue
        if (run.arm.name, run.seed) not in asked:
            continue
        if path.exists():
            assert root in path.resolve().parents  # only ever delete inside <out>/runs
            shutil.rmtree(path)
        todo.append(run)
    return rows, todo


def _write_results(out: Path, rows: list[dict[str, Any]]) -> None:
    tmp = out / f".{RESULTS}.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out / RESULTS)


def run_ablation(
    config: Config,
    out: str | Path,
    arms: Sequence[Arm],
    seeds: Sequence[int],
    *,
    parallel: int | None = None,
    address: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or finish) the ablation in ``out``, then write its report; returns summary.json."""
    from clpd_ray.ablation.report import write_report
    from clpd_ray.runtime.capacity import default_parallel, runs_that_fit
    from clpd_ray.runtime.run import ensure_ray, resolve_run_policy
    from clpd_ray.workload import build_workload

    if not seeds:
        raise ClpdError("an ablation needs at least one seed; pass --seeds N with N >= 1")
    if len(set(seeds)) != len(seeds):
        raise ClpdError(f"seeds {list(seeds)} name a seed more than once; list each once")
    if parallel is not None and parallel < 1:
        raise ClpdError(f"--parallel {parallel}: it must be >= 1")
    out = Path(out)
    earlier, specs = _check_manifest(out, config)
    for arm in arms:  # a policy that cannot run this config fails now, before any actor starts
        try:
            resolve_run_policy(run_config(config, arm, seeds[0]))
        except ClpdError as bad:
            raise ClpdError(f"arm {arm.source!r}: {bad}") from None
    plan = plan_runs(arms, seeds)
    known = _with_earlier(plan, earlier, config, specs)
    out.mkdir(parents=True, exist_ok=True)
    arm_specs = {**specs, **{a.name: a.source for a in arms}}
    write_json_atomic(
        out / MANIFEST,
        {
            "config": config.to_dict(),
            "ladder": [t.name for t in config.teachers.ladder],
            "data_seed": config.seed,
            "eval_split": _eval_split(config),
            "arms": {r.arm.name: arm_specs.get(r.arm.name, r.arm.name) for r in known},
            "runs": [[r.arm.name, r.seed] for r in known],
        },
    )
    rows, todo = _resume(out, known, plan)
    _write_results(out, rows)
    head = (
        f"ablation: {len(arms)} arms x {len(seeds)} seeds ({describe_seeds(seeds)}) = "
        f"{len(plan)} runs; "
        f"{len(plan) - len(todo)} done before"
    )
    finished = {(r["arm"], r["seed"]): r for r in rows}
    errors: list[tuple[PlannedRun, BaseException]] = []
    if not todo:
        log(f"{head}, 0 to run -> {out}")
    else:
        workload = build_workload(config)  # once: all runs share the data and the teacher ladder
        ensure_ray(config, address)
        fits = runs_that_fit(config)
        if parallel is not None and parallel > max(1, fits):
            log(
                f"warning: --parallel {parallel} but the cluster places {fits} run(s) at a time; "
                f"the others wait for resources (and fail if none free up within 120 s)"
            )
        parallel = min(parallel or default_parallel(config), len(todo))
        log(f"{head}, {len(todo)} to run, {parallel} at a time -> {out}")
        tag = uuid.uuid4().hex[:6]  # actor names differ between runs and between ablations

        def one(run: PlannedRun) -> dict[str, Any]:
            from clpd_ray.runtime.run import run_distillation

            # A tokenizer per run: Rust tokenizers are not meant to be shared between threads.
            wl = replace(workload, tokenizer=copy.deepcopy(workload.tokenizer))
            run_cfg = run_config(config, run.arm, run.seed)
            if run_cfg.teachers.target_store is None:  # one target store for every arm and seed
                store = str((out / "targets").resolve())
                run_cfg = run_cfg.model_copy(
                    update={"teachers": run_cfg.teachers.model_copy(update={"target_store": store})}
                )
            return run_distillation(
                run_cfg,
                run.path(out),
                address=address,
                progress=False,
                workload=wl,
                name_suffix=f"-{tag}-{run.arm.slug}-s{run.seed}",
            )

        done = len(plan) - len(todo)
        errors = _run_threads(todo, one, parallel, out, finished, (done, len(plan)), log)
    rows = [finished[(r.arm.name, r.seed)] for r in known if (r.arm.name, r.seed) in finished]
    _write_results(out, rows)
    if not errors:
        return write_report(out)
    if rows:
        write_report(out)  # what is finished so far
    run, err = errors[0]
    log(f"{len(errors)} run(s) failed; finished runs are kept: rerun the command to resume")
    if isinstance(err, ClpdError):
        raise ClpdError(f"run {run.arm.name} seed {run.seed}: {err}") from err
    raise err


def _run_threads(
    todo: list[PlannedRun],
    one: Callable[[PlannedRun], dict[str, Any]],
    parallel: int,
    out: Path,
    finished: dict[tuple[str, int], dict[str, Any]],
    count: tuple[int, int],
    log: Callable[[str], None],
) -> list[tuple[PlannedRun, BaseException]]:
    """Run ``todo`` on at most ``parallel`` daemon threads; after a failure start no new run.

    Each finished run goes into ``finished`` and results.jsonl, with a progress line counting
    from ``count`` = (runs of this invocation done before, runs of this invocation).

    Daemon threads, so that an interrupted driver exits at once: Ray then stops the runs' actors,
    and their directories (without summary.json) are redone on resume.
    """
    pending: queue.SimpleQueue[PlannedRun] = queue.SimpleQueue()
    for run in todo:
        pending.put(run)
    done: queue.SimpleQueue[tuple[PlannedRun, dict[str, Any] | None, BaseException | None]]
    done = queue.SimpleQueue()
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            try:
                run = pending.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((run, one(run), None))
            except BaseException as err:
                stop.set()  # here, not on the main thread: this worker takes no next run
                done.put((run, None, err))

    threads = [
        threading.Thread(target=worker, name=f"clpd-ablate-{i}", daemon=True)
        for i in range(min(parallel, len(todo)))
    ]
    for t in threads:
        t.start()
    errors: list[tuple[PlannedRun, BaseException]] = []
    n_done, total = count
    start = time.perf_counter()
    try:
        while any(t.is_alive() for t in threads) or not done.empty():
            try:
                run, summary, err = done.get(timeout=0.5)
            except queue.Empty:
                continue
            if err is not None or summary is None:
                stop.set()
                errors.append((run, err or RuntimeError("run returned nothing")))
                log(f"[failed] {run.arm.name} seed {run.seed}: {type(err).__name__}: {err}")
                continue
            row = _row(run, summary, out)
            finished[(run.arm.name, run.seed)] = row
            # Appended as runs finish (so progress is on disk); rewritten in order at the end.
            with open(out / RESULTS, "a") as f:
                f.write(json.dumps(row) + "\n")
            n_done += 1
            elapsed = time.perf_counter() - start
            log(
                f"[{n_done}/{total}] {run.arm.name:<22} seed {run.seed}: accuracy "
                f"{row['accuracy']:.3f}  ({row['wall_s']:.1f} s; {elapsed:.0f} s elapsed)"
            )
    except KeyboardInterrupt:
        stop.set()
        log("interrupted: runs in flight are abandoned and redone on resume")
        raise
    return errors
