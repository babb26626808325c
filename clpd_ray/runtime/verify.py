"""Checking a checkpoint completely before ``clpd run --resume`` uses it.

A committed checkpoint (``checkpoints/step-N/`` with a ``manifest.json``) can still be damaged
after the fact: a disk error, a bad copy, a file edited by hand. ``--resume`` reads every file of
the newest one before it changes anything, and falls back to the newest good one::

    for step-N, newest first:
        manifest lists every file, sizes and sha256 match      (bytes changed after the commit)
        controller.json parses, has the version and every key the planner reads
        student.json parses, names step N and its files
        student.safetensors opens with safetensors' safe_open (header; offsets cover the file)
        student_optim.pt loads with torch.load(weights_only=True) and holds optimizer, LR
          schedule and RNG state
    first good one ──▶ resume from it (a warning names what was wrong with each newer one)
    none good      ──▶ RunDirError (exit 2) naming each checkpoint and its problem
    none at all    ──▶ resume from step 0

The deeper checks catch what the hashes cannot: files damaged before the manifest was written,
or a manifest rewritten to match damaged files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clpd_ray.errors import RunDirError
from clpd_ray.runtime import storage
from clpd_ray.runtime.recovery import STATE_VERSION
from clpd_ray.runtime.rundir import MANIFEST, RunDir

__all__ = ["CONTROLLER_KEYS", "CheckpointChoice", "checkpoint_problem", "choose_checkpoint"]

_log = logging.getLogger(__name__)

# Every key Planner.load_state_dict and the executor's restore read from controller.json.
CONTROLLER_KEYS = (
    "version",
    "step",
    "policy_name",
    "sampler",
    "current",
    "stage_start",
    "stage_ranges",
    "policy",
    "log_from",
    "results_from",
    "results",
    "probes",
    "pending_probes",
)
_OPTIMIZER_KEYS = ("optimizer", "scheduler", "torch_rng")


@dataclass(frozen=True)
class CheckpointChoice:
    """Where a resume starts: ``checkpoint`` None means step 0 (the run wrote none)."""

    checkpoint: str | None
    step: int
    skipped: tuple[tuple[str, str], ...] = ()  # newer checkpoints passed over: (uri, problem)


def choose_checkpoint(run: RunDir) -> CheckpointChoice:
    """The newest checkpoint of ``run`` that passes :func:`checkpoint_problem`; raises
    :class:`RunDirError` if the run has checkpoints but none is good."""
    skipped: list[tuple[str, str]] = []
    for uri in run.manifested_checkpoints():
        manifest, problem = run.manifest_problem(uri)
        if manifest is not None:
            problem = checkpoint_problem(uri, manifest)
        if problem is None:
            assert manifest is not None
            for bad, why in skipped:
                _log.warning(
                    "clpd: warning: checkpoint %s cannot be resumed from: %s; using the one "
                    "before it, %s",
                    bad,
                    why,
                    uri,
                )
            return CheckpointChoice(uri, int(manifest["step"]), tuple(skipped))
        skipped.append((uri, problem))
    if skipped:
        listed = "; ".join(f"checkpoint {uri} is incomplete or damaged: {p}" for uri, p in skipped)
        them = "it" if len(skipped) == 1 else "them"
        raise RunDirError(
            f"--resume {run.uri}: no checkpoint can be resumed from: {listed}. Restore the "
            f"damaged files from a backup, or delete {them} to start the run again from step 0"
        )
    return CheckpointChoice(None, 0)


def checkpoint_problem(uri: str, manifest: dict[str, Any]) -> str | None:
    """What is wrong with checkpoint ``uri`` (whose manifest lists every file), or None."""
    step = manifest.get("step")
    with _local_copy(uri) as local:
        problem = _files_problem(local, manifest["files"])
        checks: tuple[Callable[[Path, Any], str | None], ...] = (
            _controller_problem,
            _student_json_problem,
            _weights_problem,
            _optimizer_problem,
        )
        for check in checks:
            if problem is not None:
                break
            problem = check(local, step)
    return problem


@contextlib.contextmanager
def _local_copy(uri: str) -> Iterator[Path]:
    """The checkpoint as a local directory: itself, or (S3) a temporary download."""
    if not storage.is_s3(uri):
        yield Path(uri)
        return
    tmp = storage.local_temp_dir("clpd-verify-")
    try:
        yield storage.download_dir(uri, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files_problem(local: Path, files: dict[str, Any]) -> str | None:
    for name, meta in files.items():
        path = local / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if not isinstance(meta, dict) or size != meta.get("size"):
            return f"{name} has {size} bytes, {MANIFEST} says {_get(meta, 'size')}"
        if _sha256_file(path) != meta.get("sha256"):
            return f"{name} does not match its sha256 in {MANIFEST} (its bytes changed)"
    return None


def _get(meta: Any, key: str) -> Any:
    return meta.get(key) if isinstance(meta, dict) else None


def _json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_bytes()), None
    except (ValueError, UnicodeDecodeError) as err:
        return None, f"{path.name} is not valid JSON ({_first_line(err)})"


def _first_line(err: BaseException) -> str:
    """``Type: first sentence`` of an error (torch's and safetensors' run on for lines)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text.split('. ')[0][:200]}"


def _controller_problem(local: Path, step: Any) -> str | None:
    state, problem = _json(local / "controller.json")
    if problem is not None:
        return problem
    if not isinstance(state, dict):
        return "controller.json does not hold a JSON object"
    missing = [k for k in CONTROLLER_KEYS if k not in state]
    if missing:
        return f"controller.json lacks {', '.join(map(repr, missing))}, which a resume needs"
    if state["version"] != STATE_VERSION:
        return (
            f"controller.json has format version {state['version']!r}; this clpd reads version "
            f"{STATE_VERSION} (resume with the clpd that wrote it)"
        )
    if state["step"] != step:
        return f"controller.json is the state of step {state['step']!r}, not of step {step}"
    kinds = {"sampler": dict, "stage_ranges": dict, "probes": dict, "results": list}
    for key, kind in {**kinds, "pending_probes": list}.items():
        if not isinstance(state[key], kind):
            return f"controller.json: {key!r} is not a JSON {'object' if kind is dict else 'list'}"
    lo = state["results_from"]
    if not isinstance(lo, int) or lo + len(state["results"]) != step:
        return f"controller.json: its step results ({lo!r} + {len(state['results'])}) do not reach step {step}"
    return None


def _student_json_problem(local: Path, step: Any) -> str | None:
    meta, problem = _json(local / "student.json")
    if problem is not None:
        return problem
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        return "student.json has no 'files' object"
    if meta.get("step") != step:
        return f"student.json is the student of step {meta.get('step')!r}, not of step {step}"
    return None


def _weights_problem(local: Path, step: Any) -> str | None:
    from safetensors import safe_open

    try:  # opening checks the header and that the tensors' offsets cover the file exactly
        with safe_open(str(local / "student.safetensors"), framework="pt") as f:
            f.keys()
    except Exception as err:  # safetensors raises SafetensorError, OSError, ... by case
        return f"student.safetensors does not open with safetensors ({_first_line(err)})"
    return None


def _optimizer_problem(local: Path, step: Any) -> str | None:
    import torch

    path = local / "student_optim.pt"
    try:
        extra = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # UnpicklingError, RuntimeError (not a zip archive), EOFError, ...
        return f"student_optim.pt does not load with torch.load(weights_only=True) ({_first_line(err)})"
    if not isinstance(extra, dict) or any(k not in extra for k in _OPTIMIZER_KEYS):
        have = sorted(extra) if isinstance(extra, dict) else type(extra).__name__
        return f"student_optim.pt lacks the optimizer, LR schedule or RNG state (it holds {have})"
    return None
