"""Run one distillation end to end: workload, checks, actors, controller, evaluation, summary.

``run_distillation`` is the Python entry point behind ``clpd run`` and ``clpd demo``;
``resume_distillation`` is the one behind ``clpd run --resume DIR``. Every input is checked before
anything is written or started, so a mistake leaves no half-made run directory behind::

    config ─▶ policy ─▶ --out is new ─▶ data + teacher ladder ─▶ model paths, tokenizers
           ─▶ run directory ─▶ Ray + actors ─▶ controller (replays after failures) ─▶ summary.json
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from clpd_ray.config import Config, load_config
from clpd_ray.data.tokenizer import load_tokenizer
from clpd_ray.data.vocab import check_same_vocab
from clpd_ray.errors import ModelLoadError
from clpd_ray.policies import SchedulerPolicy, resolve_policy
from clpd_ray.runtime.actors.launcher import NAMESPACE, Launcher
from clpd_ray.runtime.controller import Controller
from clpd_ray.runtime.rundir import RunDir
from clpd_ray.workload import Workload, build_workload

__all__ = [
    "check_models",
    "ensure_ray",
    "local_init_kwargs",
    "resume_distillation",
    "run_distillation",
]

_log = logging.getLogger(__name__)


def local_init_kwargs(config: Config) -> dict[str, Any]:
    """``ray.init`` arguments for a local cluster.

    Token authentication stays as Ray sets it (on for a local ``ray.init``): nothing here turns
    it off. The dashboard listens on ``cluster.dashboard_host``, 127.0.0.1 unless the user asks
    for another address.
    """
    return {
        "num_cpus": config.cluster.num_cpus,
        "namespace": NAMESPACE,
        "dashboard_host": config.cluster.dashboard_host,
        "include_dashboard": None,
        "log_to_driver": False,
        "configure_logging": False,
    }


def ensure_ray(config: Config, address: str | None = None) -> None:
    """Join ``address`` (``auto``: the running cluster), else start a local Ray with auth on."""
    if ray.is_initialized():
        return
    address = address or config.cluster.address
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        _log.warning(
            "RAY_AUTH_MODE=disabled is set in the environment: Ray's token authentication is "
            "off, so anyone who can reach the dashboard port can run code; unset it"
        )
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    else:
        ray.init(**local_init_kwargs(config))


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


def _check_model(key: str, path: str | Path) -> None:
    """Cheap driver-side check that ``path`` loads: its config, and the headers of its weights."""
    from safetensors import safe_open
    from transformers import AutoConfig

    fix = (
        "give a directory written by save_pretrained (config.json + model.safetensors) or a hub "
        "id available offline"
    )
    local = Path(path).expanduser()
    if local.exists() or local.is_absolute() or str(path).startswith((".", "~")):
        if not local.exists():
            raise ModelLoadError(f"{key}: {path} does not exist; {fix}")
        if not (local / "config.json").is_file():
            raise ModelLoadError(
                f"{key}: {path} has no config.json, so it is not a saved model; {fix}"
            )
    try:
        AutoConfig.from_pretrained(str(path))
    except Exception as err:  # transformers raises OSError, ValueError, ... by case
        why = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ModelLoadError(
            f"{key}: cannot load a model from {path} ({type(err).__name__}: {why}); {fix}"
        ) from None
    if not local.is_dir():
        return  # a hub id: transformers checks the rest when the actor loads it
    shards = sorted(local.glob("*.safetensors"))
    for f in shards:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as err:
            raise ModelLoadError(
                f"{key}: {f} is not a readable safetensors file ({type(err).__name__}: {err}); "
                f"save the model again, or {fix}"
            ) from None
    if not shards and not any(
        (local / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")
    ):
        raise ModelLoadError(f"{key}: {path} has a config.json but no weights; {fix}")


def check_models(config: Config) -> None:
    """Every model path in the config loads (teachers trained by clpd are trusted)."""
    for spec in config.teachers.ladder:
        if spec.path:
            _check_model(f"teachers.ladder[{spec.name}].path", spec.path)
    if config.student.path:
        _check_model("student.path", config.student.path)


def run_distillation(
    config: Config,
    out_dir: str | Path,
    *,
    policy: Any = None,
    address: str | None = None,
    progress: bool = True,
    workload: Workload | None = None,
    name_suffix: str = "",
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Distil the configured student into the new directory ``out_dir``; returns (and writes)
    the run summary. ``on_step(done)`` is a test hook run on the driver after each step."""
    start = time.perf_counter()
    resolved = resolve_run_policy(config, policy)
    RunDir.check_new(out_dir)  # before the (slow) workload: a taken --out fails at once
    check_models(config)
    workload = workload or build_workload(config, progress=progress)
    check_tokenizers(config, workload)
    run_dir = RunDir.create(out_dir, config)
    return _execute(
        config,
        run_dir,
        resolved,
        workload,
        start=start,
        address=address,
        progress=progress,
        name_suffix=name_suffix,
        on_step=on_step,
    )


def resume_distillation(
    out_dir: str | Path,
    *,
    address: str | None = None,
    progress: bool = True,
    workload: Workload | None = None,
    name_suffix: str = "",
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Continue the run in ``out_dir`` from its latest checkpoint (from step 0 if it has none)
    with its saved config; ends with the same student as a run that never stopped. A finished
    run is left as it is and its summary returned. ``workload``: as for run_distillation (it
    must be the one the run was started with)."""
    start = time.perf_counter()
    run_dir = RunDir.open(out_dir)
    summary_path = run_dir.path / "summary.json"
    if summary_path.is_file() and (run_dir.path / "student").is_dir():
        _log.warning("clpd: %s is a finished run; nothing to resume", run_dir.path)
        return json.loads(summary_path.read_text())
    config = load_config(run_dir.path / "config.yaml")
    ckpt = run_dir.latest_checkpoint()
    step = int(run_dir.read_checkpoint(ckpt)["step"]) if ckpt else 0
    resolved = resolve_run_policy(config)
    check_models(config)
    workload = workload or build_workload(config, progress=progress)
    check_tokenizers(config, workload)
    run_dir.rewind(step)
    return _execute(
        config,
        run_dir,
        resolved,
        workload,
        start=start,
        address=address,
        progress=progress,
        name_suffix=name_suffix,
        on_step=on_step,
        resume_from=ckpt,
        resumed_from_step=step,
    )


def _execute(
    config: Config,
    run_dir: RunDir,
    resolved: SchedulerPolicy,
    workload: Workload,
    *,
    start: float,
    address: str | None,
    progress: bool,
    name_suffix: str = "",
    on_step: Callable[[int], None] | None = None,
    resume_from: Path | None = None,
    resumed_from_step: int | None = None,
) -> dict:
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
        launcher.start(resolved, None)
        controller = Controller(
            config,
            workload,
            run_dir,
            launcher,
            resolved,
            progress=progress,
            on_step=on_step,
            resume_from=resume_from,
        )
        stats = controller.run()
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
    result = stats.evaluation
    summary = {
        "run_id": run_id,
        "policy": resolved.name,
        "steps": stats.steps,
        "wall_s": round(time.perf_counter() - start, 2),
        "train_wall_s": round(stats.wall_s, 2),
        "recoveries": stats.recoveries,
        "resumed_from_step": resumed_from_step,
        "student": {
            "accuracy": result["accuracy"],
            "accuracy_by_difficulty": result["by_difficulty"],
            "n": result["n"],
            "parameters": stats.student["parameters"],
        },
        "teachers": teachers,
        "stages": controller.summary_stages(),
        "busy_s": {k: round(v, 3) for k, v in stats.busy_s.items()},
    }
    summary = json.loads(json.dumps(summary))  # the dict callers get equals summary.json
    run_dir.summary(summary)
    return summary
