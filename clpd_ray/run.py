"""Run one distillation end to end: workload, checks, actors, controller, evaluation, summary.

``run_distillation`` is the Python entry point behind ``clpd run`` and ``clpd demo``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import ray

from clpd_ray.actors.launcher import NAMESPACE, Launcher
from clpd_ray.config import Config
from clpd_ray.controller import Controller, unwrap
from clpd_ray.policies import SchedulerPolicy, resolve_policy
from clpd_ray.rundir import RunDir
from clpd_ray.tokenizer import load_tokenizer
from clpd_ray.vocab import check_same_vocab
from clpd_ray.workload import Workload, build_workload

__all__ = ["ensure_ray", "run_distillation"]


def ensure_ray(config: Config, address: str | None = None) -> None:
    """Join ``address`` (``auto``: the running cluster), else start a local Ray with auth on."""
    if ray.is_initialized():
        return
    address = address or config.cluster.address
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    else:
        ray.init(
            num_cpus=config.cluster.num_cpus,
            namespace=NAMESPACE,
            dashboard_host=config.cluster.dashboard_host,
            include_dashboard=None,
            log_to_driver=False,
            configure_logging=False,
        )


def resolve_run_policy(config: Config, policy: Any = None) -> SchedulerPolicy:
    """The run's policy, resolved and bound on the driver so a bad one fails before any actor starts."""
    spec = policy if policy is not None else config.scheduler.policy
    kwargs = config.scheduler.kwargs if policy is None or isinstance(policy, (str, type)) else None
    p = resolve_policy(spec, kwargs)
    p.bind(
        num_stages=config.curriculum.num_stages,
        num_teachers=len(config.teachers.ladder),
        total_steps=config.train.total_steps,
    )
    return p


def _ship_by_value(policy: SchedulerPolicy) -> None:
    """A user's policy module need not be importable on the workers: pickle it by value."""
    module = sys.modules.get(type(policy).__module__)
    if module is not None and not module.__name__.startswith("clpd_ray"):
        if module.__name__ == "__main__":
            return  # cloudpickle already ships __main__ classes by value
        ray.cloudpickle.register_pickle_by_value(module)


def check_tokenizers(config: Config, workload: Workload) -> None:
    if config.distill.objective != "token":
        return
    for entry in workload.ladder:
        check_same_vocab(
            workload.tokenizer, load_tokenizer(entry.path), teacher_name=f"teacher {entry.name}"
        )


def run_distillation(
    config: Config,
    out_dir: str | Path,
    *,
    policy: Any = None,
    address: str | None = None,
    progress: bool = True,
    workload: Workload | None = None,
    name_suffix: str = "",
) -> dict:
    """Distil the configured student; returns (and writes) the run summary."""
    start = time.perf_counter()
    resolved = resolve_run_policy(config, policy)
    run_dir = RunDir.create(out_dir, config)
    workload = workload or build_workload(config, progress=progress)
    check_tokenizers(config, workload)
    ensure_ray(config, address)
    run_id = uuid.uuid4().hex[:8]
    launcher = Launcher(
        config,
        [str(e.path) for e in workload.ladder],
        str(workload.tokenizer_dir),
        run_id=run_id,
        name_suffix=name_suffix,
    )
    _ship_by_value(resolved)
    try:
        actors = launcher.start(resolved, None)
        controller = Controller(config, workload, run_dir, launcher, resolved, progress=progress)
        stats = controller.run()
        result = unwrap(actors.student.evaluate.remote(workload.eval, workload.max_new_tokens))
        unwrap(actors.student.save_pretrained.remote(str(run_dir.path / "student")))
        student_stats = unwrap(actors.student.stats.remote())
        busy = {"student": student_stats["busy_s"]}
        for i, name in enumerate(controller.names):
            h = launcher.actors.teachers[i] if launcher.actors else None
            if h is not None:
                busy[f"teacher-{name}"] = unwrap(h.stats.remote())["busy_s"]
        busy["scheduler"] = unwrap(actors.scheduler.stats.remote())["busy_s"]
    finally:
        launcher.shutdown()
    teachers = {}
    for e in workload.ladder:
        acc = e.accuracy or {}
        teachers[e.name] = {
            "accuracy": acc.get("accuracy"),
            "accuracy_by_difficulty": acc.get("by_difficulty"),
            "parameters": e.parameters,
        }
    summary = {
        "run_id": run_id,
        "policy": resolved.name,
        "steps": stats.steps,
        "wall_s": round(time.perf_counter() - start, 2),
        "train_wall_s": round(stats.wall_s, 2),
        "student": {
            "accuracy": result["accuracy"],
            "accuracy_by_difficulty": result["by_difficulty"],
            "n": result["n"],
            "parameters": student_stats["parameters"],
        },
        "teachers": teachers,
        "stages": controller.summary_stages(),
        "busy_s": {k: round(v, 3) for k, v in busy.items()},
    }
    summary = json.loads(json.dumps(summary))  # the dict callers get equals summary.json
    run_dir.summary(summary)
    return summary
