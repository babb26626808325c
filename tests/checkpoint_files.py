"""A small, valid checkpoint written without Ray or a trainer: what ``--resume`` verifies.

Used by tests that need a run directory with a checkpoint a resume accepts (test_resume.py,
test_bad_input.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from safetensors.torch import save

from clpd_ray.runtime import storage
from clpd_ray.runtime.recovery import STATE_VERSION
from clpd_ray.runtime.rundir import RunDir, sha256


def controller_state(step: int, policy: str = "clpd") -> dict:
    """A controller.json with every key a resume reads (the state of a run that logged nothing)."""
    return {
        "version": STATE_VERSION,
        "step": step,
        "policy_name": policy,
        "sampler": {},
        "current": None,
        "stage_start": 0,
        "stage_ranges": {},
        "policy": {},
        "log_from": step,
        "results_from": step,
        "results": [],
        "probes": {},
        "pending_probes": [],
    }


def student_files(step: int) -> dict[str, bytes]:
    """student.safetensors, student_optim.pt and student.json (listing the other two)."""
    weights = save({"w": torch.arange(8, dtype=torch.float32) + step})
    buf = io.BytesIO()
    torch.save({"optimizer": {}, "scheduler": {}, "torch_rng": torch.get_rng_state()}, buf)
    files = {"student.safetensors": weights, "student_optim.pt": buf.getvalue()}
    meta = {name: {"size": len(data), "sha256": sha256(data)} for name, data in files.items()}
    return {**files, "student.json": json.dumps({"step": step, "files": meta}).encode()}


def write_checkpoint(run_uri: str | Path, step: int, policy: str = "clpd") -> str:
    """Commit a valid checkpoint of ``step`` into the run directory ``run_uri``."""
    run = RunDir(run_uri)
    where = run.checkpoint_dir(step)
    for name, data in student_files(step).items():
        storage.write_bytes(storage.join(where, name), data)
    return run.commit_checkpoint(step, controller_state(step, policy))


def rehash(checkpoint: str | Path, name: str) -> None:
    """Make ``manifest.json`` (and student.json, for a student file) vouch for ``name`` as it
    is now: damage the hashes cannot see."""
    ckpt = str(checkpoint)
    data = storage.read_bytes(storage.join(ckpt, name))
    entry = {"size": len(data), "sha256": sha256(data)}
    if name in ("student.safetensors", "student_optim.pt"):
        meta = json.loads(storage.read_bytes(storage.join(ckpt, "student.json")))
        meta["files"][name] = entry
        storage.write_text(storage.join(ckpt, "student.json"), json.dumps(meta))
        rehash(ckpt, "student.json")
    manifest = json.loads(storage.read_bytes(storage.join(ckpt, "manifest.json")))
    manifest["files"][name] = entry
    storage.write_text(storage.join(ckpt, "manifest.json"), json.dumps(manifest))
