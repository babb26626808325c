"""What a run is: the config it started with and a fingerprint of every model it used.

``RunDir.create`` writes both to ``<run>/run.json`` (never edited by clpd afterwards; the
``config.yaml`` next to it is the user's to read and, within limits, to edit). ``--resume``
compares the run as it would continue with the run as it started, before it changes anything:

- ``config.yaml`` edits: keys in :data:`HARMLESS` (where the run executes, how long it waits,
  which checkpoints it keeps) are allowed and recorded in ``resumes.jsonl``; any other change
  would make the resumed run a hybrid of two configs that no single run produces, and is
  refused. ``train.log_every`` is not harmless: an observation's ``recent_loss`` is the mean over
  the last ``log_every`` losses, so policies would decide differently; nor is
  ``scheduler.probe_every`` (probe timing decides what probe-reading policies see).
- model weights: a teacher (or the student's initial weights, ``student.path``) whose weights
  changed under the same path or cache key would continue the distillation from another model;
  refused, naming the model and both fingerprints.

A fingerprint is the sha256 over the names and bytes of a model directory's weight files
(``*.safetensors``, ``*.bin``, ...); for a hub id, of the files of its cached snapshot, with the
snapshot's revision.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from clpd_ray.config import Config, config_from_dict
from clpd_ray.errors import ConfigError, ModelLoadError, RunDirError

__all__ = [
    "HARMLESS",
    "check_config_unchanged",
    "check_models_unchanged",
    "config_changes",
    "model_fingerprint",
    "model_fingerprints",
]

_log = logging.getLogger(__name__)

# Config keys (a key or a section ending in '.') a resume may change: they change where and how
# the run executes, never what it computes. checkpoint_every and eval_every add or move
# checkpoints and evaluations, report_to adds trackers; none consumes randomness nor feeds a
# decision.
HARMLESS = (
    "cluster.",
    "teachers.cache_dir",
    "teachers.resident",
    "teachers.work_ahead",  # when idle teachers fill the target store, never what it holds
    "train.keep_checkpoints",
    "train.checkpoint_every",
    "train.eval_every",
    "train.report_to",
    "scheduler.timeout_s",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_ABSENT = "(absent)"


# ---------------------------------------------------------------------- config


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.0.c": leaf}`` for nested dicts and lists of dicts (lists of scalars are leaves)."""
    if isinstance(value, dict):
        items: list[tuple[str, Any]] = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
        items = [(str(i), v) for i, v in enumerate(value)]
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
    if not items and prefix:
        out[prefix] = value
    return out


def _is_harmless(key: str) -> bool:
    return any(key == h or (h.endswith(".") and key.startswith(h)) for h in HARMLESS)


def config_changes(
    original: dict[str, Any], current: dict[str, Any]
) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """(refused, allowed): each changed key with its (old, new) value, split by :data:`HARMLESS`."""
    old, new = _flatten(original), _flatten(current)
    refused: dict[str, tuple[Any, Any]] = {}
    allowed: dict[str, tuple[Any, Any]] = {}
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a != b:
            (allowed if _is_harmless(key) else refused)[key] = (a, b)
    return refused, allowed


def check_config_unchanged(uri: str, original: dict[str, Any], config: Config) -> dict[str, Any]:
    """The harmless changes of ``config`` (the run's config.yaml now) from ``original`` (the
    config it started with), as ``{key: [old, new]}``; raises :class:`RunDirError` naming every
    other change."""
    try:  # the same defaults as now: a key added to Config since is not an edit
        started = config_from_dict(original, f"{uri}/run.json").to_dict()
    except ConfigError:
        started = original
    refused, allowed = config_changes(started, config.to_dict())
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise RunDirError(
            f"--resume {uri}: config.yaml was edited since the run started, and these changes "
            f"would change the run: {listed}. A run cannot change them midway (it would match "
            f"no single run): restore them in {uri}/config.yaml (the original is under 'config' "
            f"in {uri}/run.json), or start a new run with the new config (clpd run CONFIG --out "
            f"NEW_DIR). A resume may change only {', '.join(k + ('*' if k.endswith('.') else '') for k in HARMLESS)}"
        )
    return {k: [a, b] for k, (a, b) in allowed.items()}


# ---------------------------------------------------------------------- models


def _weights_sha256(local: Path) -> str | None:
    """sha256 over the relative names and bytes of the weight files under ``local``."""
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(local).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _hub_snapshot(repo_id: str) -> Path | None:
    """The locally cached snapshot of hub model ``repo_id`` (its name is the revision)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, not a repo id, hub library missing: nothing to record
        return None


def model_fingerprint(path: str | Path) -> dict[str, Any]:
    """``{"path", "sha256"[, "hub_id", "revision"]}`` of the model at ``path`` (a local
    directory, or a hub id; sha256 None if there is nothing local to hash)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return {"path": str(path), "sha256": _weights_sha256(local)}
    snapshot = _hub_snapshot(str(path))
    return {
        "path": str(path),
        "hub_id": str(path),
        "revision": snapshot.name if snapshot else None,
        "sha256": _weights_sha256(snapshot) if snapshot else None,
    }


def model_fingerprints(config: Config, teacher_dirs: list[Path]) -> dict[str, dict[str, Any]]:
    """The fingerprint of every model a run uses: each teacher (``teacher <name>``, from the
    workload's ladder directories) and, with ``student.path``, the student's initial weights.
    ``config``: the run's config with ``s3://`` paths fetched (``models_store.localise``)."""
    out = {
        f"teacher {spec.name}": model_fingerprint(local)
        for spec, local in zip(config.teachers.ladder, teacher_dirs, strict=True)
    }
    if config.student.path:
        out["student"] = model_fingerprint(config.student.path)
    return out


def check_models_unchanged(
    uri: str, recorded: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]]
) -> None:
    """Raise :class:`ModelLoadError` naming every model whose weights differ from the ones the
    run started with (a model without a fingerprint on either side is not compared)."""
    changed = []
    for name, then in recorded.items():
        current = now.get(name)
        if current is None or then.get("sha256") is None or current.get("sha256") is None:
            continue
        if then["sha256"] != current["sha256"]:
            changed.append(
                f"{name} at {current.get('path')} (sha256 {then['sha256'][:16]}... when the run "
                f"started, {current['sha256'][:16]}... now)"
            )
    if changed:
        raise ModelLoadError(
            f"--resume {uri}: the weights of {'; '.join(changed)} changed since the run started, "
            "so the resumed run would distil from another model than the one it started with. "
            "Restore the original weights at that path (an embedded teacher is also published in "
            f"{uri}/models/<name>/), or start a new run with the new weights (clpd run CONFIG "
            "--out NEW_DIR)"
        )
