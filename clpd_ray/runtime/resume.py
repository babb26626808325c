"""The checks ``clpd run --resume`` makes before it changes anything, and the record it leaves.

``resume_distillation`` (runtime/run.py) holds the run's lock (runtime/lock.py) throughout::

    RunDir.open (config.yaml valid) ──▶ lock ──▶ check_start: config edits vs run.json,
        checkpoint verified (newest good one) ──▶ inputs (policy, cluster, models, data)
        ──▶ check_models: fingerprints vs run.json ──▶ Ray ──▶ commit: drop damaged newer
        checkpoints, rewind, resumes.jsonl row ──▶ execute

Everything before ``commit`` only reads the run directory, so a resume refused for any reason
leaves it byte for byte as it was.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clpd_ray.config import Config
from clpd_ray.runtime.identity import (
    check_config_unchanged,
    check_models_unchanged,
    model_fingerprints,
)
from clpd_ray.runtime.rundir import IDENTITY, RunDir
from clpd_ray.runtime.verify import CheckpointChoice, choose_checkpoint

__all__ = ["ResumePlan", "check_models", "check_start", "commit"]

_log = logging.getLogger(__name__)


@dataclass
class ResumePlan:
    """What the checks found: where to start, and what to record."""

    choice: CheckpointChoice
    config_changes: dict[str, Any]  # harmless config.yaml edits: {key: [old, new]}
    identity: dict[str, Any] | None  # run.json (None: a run made before clpd wrote it)
    models: dict[str, Any] = field(default_factory=dict)  # fingerprints now

    @property
    def step(self) -> int:
        return self.choice.step


def check_start(run_dir: RunDir) -> ResumePlan:
    """Config edits and the checkpoint, before anything slow: raises
    :class:`~clpd_ray.errors.RunDirError` on a refused edit or when no checkpoint is good."""
    config = run_dir.config
    assert config is not None  # RunDir.open read it
    identity = run_dir.identity()
    changes: dict[str, Any] = {}
    if identity is None:
        _log.warning(
            "clpd: warning: %s has no %s (a run started by an older clpd): config.yaml edits and "
            "changed model weights cannot be checked for this resume; they are from now on",
            run_dir.uri,
            IDENTITY,
        )
    else:
        changes = check_config_unchanged(run_dir.uri, identity["config"], config)
    return ResumePlan(choose_checkpoint(run_dir), changes, identity)


def check_models(
    run_dir: RunDir, plan: ResumePlan, local: Config, teacher_dirs: list[Path]
) -> None:
    """Fingerprint the models the resume would use (``local``: the config with ``s3://`` models
    fetched) and refuse any that changed since the run started (ModelLoadError)."""
    plan.models = model_fingerprints(local, teacher_dirs)
    if plan.identity is not None:
        check_models_unchanged(run_dir.uri, plan.identity.get("models") or {}, plan.models)


def commit(run_dir: RunDir, plan: ResumePlan) -> None:
    """Every check passed: make the run directory ready to continue from ``plan.step`` and
    record the resume in ``resumes.jsonl``."""
    config = run_dir.config
    assert config is not None
    run_dir.drop_checkpoints_after(plan.step)
    run_dir.rewind(plan.step)
    if plan.identity is None:
        run_dir.write_identity(config, plan.models)
    if plan.config_changes:
        _log.warning(
            "clpd: resuming with config.yaml edits that do not change the run: %s",
            "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in plan.config_changes.items()),
        )
    run_dir.record_resume(
        {
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "from_step": plan.step,
            "checkpoint": plan.choice.checkpoint,
            "config_changes": plan.config_changes,
            "skipped_checkpoints": [
                {"checkpoint": uri, "problem": why} for uri, why in plan.choice.skipped
            ],
        }
    )
