"""The run directory contract (documented in README.md, "Run directory").

A run directory is a storage location (:mod:`clpd_ray.runtime.storage`): a local path, a shared
filesystem or an ``s3://bucket/prefix`` URI, with the same layout in each::

  <out>/
    config.yaml        the resolved config (a resume reads it; see run.json for what may change)
    run.json           the config the run started with and the fingerprint of every model it
                       used, written once at creation (runtime/identity.py); --resume checks both
    resumes.jsonl      one JSON object per resume: time, host, pid, from_step, the harmless
                       config changes it accepted, the damaged checkpoints it passed over
    .clpd.lock         held while a run or resume uses the directory (runtime/lock.py)
    metrics.jsonl      one JSON object per logged step: step, stage, teacher, loss, lr, tokens_per_s, ...
    decisions.jsonl    one JSON object per scheduler decision that changed something:
                       step, stage, teacher, policy, reason, replay
    eval.jsonl         held-out accuracy every train.eval_every steps (when set): step, accuracy, ...
    summary.json       steps, wall_s, student.accuracy(_by_difficulty), teachers.<name>.accuracy, stages
    student/           save_pretrained directory (model + tokenizer), written by the student actor
    models/<name>/     models the driver made (embedded ladder, tokenizer), fetched by the actors
    targets/           the teachers' per-example top-k targets (runtime/target_store.py; only
                       with teachers.target_store: run); kept by --resume
    checkpoints/       step-<N>/ for the newest train.keep_checkpoints committed steps:
                         student.safetensors  student_optim.pt  student.json   (the student actor)
                         controller.json  manifest.json                          (the driver, last)

Commit protocol: the student actor writes its files into ``checkpoint_dir(N)`` from its own node;
the driver then writes ``controller.json`` and, last, ``manifest.json`` (every file's name, size
and sha256). Only a directory whose manifest matches its files is a checkpoint; anything else in
``checkpoints/`` is a crash's leftover, never read and removed by :meth:`RunDir.rewind`.

Rows: a local ``.jsonl`` is appended to (a crash can tear its last line: dropped on resume). S3
has no append, so on S3 the driver keeps the file's rows in memory and rewrites the object whole
for each row; an object is replaced atomically, so a crash leaves the previous version, whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from clpd_ray.config import Config, load_config
from clpd_ray.errors import ConfigError, RunDirError, StorageError
from clpd_ray.runtime import storage
from clpd_ray.runtime.lock import LOCK_FILE

__all__ = [
    "IDENTITY",
    "MANIFEST",
    "STUDENT_FILES",
    "RunDir",
    "sha256",
    "verify_files",
    "write_json_atomic",
]

# What the student actor writes into a checkpoint; student.json (last) lists the others' hashes.
STUDENT_FILES = ("student.safetensors", "student_optim.pt", "student.json")
MANIFEST = "manifest.json"
IDENTITY = "run.json"
_STEP = re.compile(r"^step-(\d+)$")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write ``payload`` as JSON to the local ``path`` all at once (temporary file + rename)."""
    storage.write_text(str(path), json.dumps(payload, indent=2, sort_keys=False))


class RunDir:
    """The files of one run, at ``uri`` (see the module docstring for the layout)."""

    def __init__(self, uri: str | Path, *, keep_checkpoints: int = 2) -> None:
        self.uri = storage.resolve(uri)
        self.keep_checkpoints = keep_checkpoints
        self.config: Config | None = None  # set by create() and open()
        self._rows: dict[str, list[str]] = {}  # S3 only: the rows of each jsonl file

    def __repr__(self) -> str:
        return f"RunDir({self.uri})"

    def _at(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    # ------------------------------------------------------------------ create / open
    @staticmethod
    def check_new(uri: str | Path) -> None:
        """Raise unless ``uri`` can become a new run directory (absent or empty; for S3, in a
        bucket that exists and answers)."""
        where = storage.resolve(uri)
        storage.check_bucket(where)
        # The run's own lock (taken just before create) does not make the directory taken.
        if storage.is_s3(where) or not Path(where).exists():
            taken = bool(set(storage.list_dir(where)) - {LOCK_FILE})
        else:
            taken = not Path(where).is_dir() or any(
                p.name != LOCK_FILE for p in Path(where).iterdir()
            )
        if taken:
            if storage.exists(storage.join(where, "config.yaml")):
                hint = (
                    f"choose a new directory, or continue that run with: clpd run --resume {where}"
                )
            else:
                hint = "choose a new directory (or resume that run with --resume)"
            raise RunDirError(f"--out {where} already exists and is not empty; {hint}")

    @classmethod
    def create(
        cls, uri: str | Path, config: Config, *, models: dict[str, Any] | None = None
    ) -> RunDir:
        """A new run directory; refuses an existing non-empty one so nothing is overwritten.
        ``models``: the fingerprint of every model the run uses (``identity.model_fingerprints``),
        kept with the config in ``run.json``. A write that fails (a full or read-only disk)
        removes what it wrote before raising :class:`StorageError`."""
        cls.check_new(uri)
        run = cls(uri, keep_checkpoints=config.train.keep_checkpoints)
        try:
            storage.make_dir(run.checkpoints)
            storage.write_text(
                run._at("config.yaml"), yaml.safe_dump(config.to_dict(), sort_keys=False)
            )
            run.write_identity(config, models or {})
        except StorageError:
            with contextlib.suppress(StorageError):  # nothing half-made is left behind
                storage.delete_file(run._at("config.yaml"))
                storage.delete_file(run._at(IDENTITY))
                storage.delete_tree(run.checkpoints)
            raise
        run.config = config
        return run

    def write_identity(self, config: Config, models: dict[str, Any]) -> None:
        """``run.json``: the config the run starts with and its models' fingerprints."""
        payload = {"config": config.to_dict(), "models": models}
        storage.write_text(self._at(IDENTITY), json.dumps(payload, indent=2))

    def identity(self) -> dict[str, Any] | None:
        """``run.json`` (None for a run made by a clpd that did not write it); raises
        :class:`RunDirError` if it is unreadable."""
        where = self._at(IDENTITY)
        if not storage.is_file(where):
            return None
        try:
            data = json.loads(storage.read_text(where))
            if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
                raise ValueError("no 'config' object")
        except (ValueError, UnicodeDecodeError) as err:
            raise RunDirError(
                f"{where} is damaged ({err}): --resume compares the run's config and models with "
                "it; restore it from a backup, or start a new run"
            ) from None
        return data

    def record_resume(self, row: dict[str, Any]) -> None:
        """A row of ``resumes.jsonl``: one per resume (never rewound)."""
        self._append("resumes.jsonl", row)

    @classmethod
    def open(cls, uri: str | Path) -> RunDir:
        """An existing run directory to resume; raises :class:`RunDirError` if it is not one."""
        where = storage.resolve(uri)
        storage.check_bucket(where)
        if not storage.exists(storage.join(where, "config.yaml")):
            what = "no such run directory" if not storage.list_dir(where) else "no config.yaml"
            raise RunDirError(
                f"--resume {where}: not a run directory ({what}); pass the --out location of an "
                "earlier `clpd run`"
            )
        config = _load_saved_config(storage.join(where, "config.yaml"))
        run = cls(where, keep_checkpoints=config.train.keep_checkpoints)
        run.config = config
        return run

    # ------------------------------------------------------------------ rows and summary
    def _append(self, name: str, row: dict[str, Any]) -> None:
        line = json.dumps(row) + "\n"
        if not storage.is_s3(self.uri):
            storage.append_text(self._at(name), line)
            return
        rows = self._rows.setdefault(name, self._read_lines(name))
        rows.append(line)
        storage.write_text(self._at(name), "".join(rows))

    def _read_lines(self, name: str) -> list[str]:
        """The whole rows of a jsonl file (a line torn by a crash is dropped)."""
        if not storage.exists(self._at(name)):
            return []
        kept = []
        for line in storage.read_text(self._at(name)).splitlines():
            try:
                json.loads(line)
            except ValueError:
                continue
            kept.append(line + "\n")
        return kept

    def metrics(self, row: dict[str, Any]) -> None:
        self._append("metrics.jsonl", row)

    def decision(self, row: dict[str, Any]) -> None:
        self._append("decisions.jsonl", row)

    def evaluation(self, row: dict[str, Any]) -> None:
        """A held-out evaluation during training (``train.eval_every``)."""
        self._append("eval.jsonl", row)

    def predictions(self, rows: list[dict[str, Any]]) -> str:
        """The final evaluation's per-example predictions (``eval/predictions.jsonl``)."""
        uri = self._at("eval", "predictions.jsonl")
        storage.write_text(uri, "".join(json.dumps(r) + "\n" for r in rows))
        return uri

    def summary(self, payload: dict[str, Any]) -> None:
        storage.write_text(self._at("summary.json"), json.dumps(payload, indent=2))

    def finished_summary(self) -> dict[str, Any] | None:
        """The summary of a finished run (summary.json and student/ written), else None."""
        if storage.is_file(self._at("summary.json")) and storage.list_dir(self.student_dir()):
            return dict(json.loads(storage.read_text(self._at("summary.json"))))
        return None

    def student_dir(self) -> str:
        """Where the student actor saves the final model (``save_pretrained``)."""
        return self._at("student")

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoints(self) -> str:
        return self._at("checkpoints")

    def checkpoint_dir(self, step: int) -> str:
        """Where the student actor writes its checkpoint files for ``step``. Emptied first, so
        that no manifest of an earlier attempt can vouch for files being rewritten."""
        where = storage.join(self.checkpoints, f"step-{step:07d}")
        storage.delete_tree(where)
        return where

    def commit_checkpoint(self, step: int, controller_state: dict[str, Any]) -> str:
        """Make ``checkpoint_dir(step)`` a checkpoint once the student's files are in it: write
        ``controller.json``, then the manifest (last), then prune old checkpoints."""
        where = storage.join(self.checkpoints, f"step-{step:07d}")
        sizes = storage.file_sizes(where)
        try:
            student = json.loads(storage.read_text(storage.join(where, "student.json")))
            files = dict(student["files"])
        except (StorageError, ValueError, KeyError, TypeError) as err:
            raise RunDirError(
                f"checkpoint {where}: the student's student.json is missing or unreadable ({err}); "
                "the student actor must write its files before the commit"
            ) from None
        for name, meta in files.items():
            if sizes.get(name) != meta["size"]:
                raise RunDirError(
                    f"checkpoint {where}: {name} has {sizes.get(name)} bytes in storage, the "
                    f"student wrote {meta['size']}; its upload did not complete"
                )
        controller = json.dumps(controller_state, indent=2).encode()
        storage.write_bytes(storage.join(where, "controller.json"), controller)
        student_json = storage.read_bytes(storage.join(where, "student.json"))
        files["student.json"] = {"size": len(student_json), "sha256": sha256(student_json)}
        files["controller.json"] = {"size": len(controller), "sha256": sha256(controller)}
        manifest = {"step": step, "files": files}
        storage.write_text(storage.join(where, MANIFEST), json.dumps(manifest, indent=2))
        self._prune()
        return where

    def manifest_problem(self, where: str) -> tuple[dict[str, Any] | None, str | None]:
        """(manifest, None) for a committed checkpoint, else (None, what is wrong)."""
        try:
            manifest = json.loads(storage.read_text(storage.join(where, MANIFEST)))
            files = manifest["files"]
        except StorageError:
            return None, f"no {MANIFEST} (it is written last: the checkpoint was never committed)"
        except (ValueError, KeyError, TypeError) as err:
            return None, f"an unreadable {MANIFEST} ({err})"
        named = _STEP.match(where.rstrip("/").rsplit("/", 1)[-1])
        if named is None or manifest.get("step") != int(named.group(1)):
            return None, f"{MANIFEST} is for step {manifest.get('step')!r}, not this directory's"
        if not isinstance(files, dict) or not all(isinstance(m, dict) for m in files.values()):
            return None, f"an unreadable {MANIFEST} ('files' is not an object of objects)"
        sizes = storage.file_sizes(where)
        for name in (*STUDENT_FILES, "controller.json"):
            if name not in files:
                return None, f"{MANIFEST} does not list {name}"
        for name, meta in files.items():
            if sizes.get(name) != meta.get("size"):
                return (
                    None,
                    f"{name} has {sizes.get(name)} bytes, the manifest says {meta.get('size')}",
                )
        return manifest, None

    def _steps(self) -> list[tuple[int, str]]:
        """(step, location) of every ``step-N`` directory in ``checkpoints/``, oldest first."""
        found = [(_STEP.match(n), n) for n in storage.list_dir(self.checkpoints)]
        steps = [(int(m.group(1)), storage.join(self.checkpoints, n)) for m, n in found if m]
        return sorted(steps)

    def _committed(self) -> list[str]:
        """Committed checkpoints, oldest first."""
        return [w for _, w in self._steps() if self.manifest_problem(w)[1] is None]

    def manifested_checkpoints(self) -> list[str]:
        """Checkpoint directories with a manifest (committed once, whole or damaged since),
        newest first: what ``--resume`` verifies (``runtime/verify.py``)."""
        has = [w for _, w in self._steps() if storage.is_file(storage.join(w, MANIFEST))]
        return has[::-1]

    def drop_checkpoints_after(self, step: int) -> None:
        """Remove the checkpoint directories of steps after ``step`` (a resume from ``step``
        passed over them as damaged; the replay writes them again)."""
        for n, where in self._steps():
            if n > step:
                storage.delete_tree(where)

    def latest_checkpoint(self) -> str | None:
        """The newest committed checkpoint (a valid manifest), or None."""
        committed = self._committed()
        return committed[-1] if committed else None

    def read_checkpoint(self, uri: str) -> dict[str, Any]:
        """The controller state of checkpoint ``uri``, checked against its manifest; raises
        :class:`RunDirError` naming what is wrong."""
        manifest, problem = self.manifest_problem(uri)
        state: Any = None
        if manifest is not None:
            data = storage.read_bytes(storage.join(uri, "controller.json"))
            if sha256(data) != manifest["files"]["controller.json"]["sha256"]:
                problem = "controller.json does not match its manifest"
            else:
                state = json.loads(data)
                if not isinstance(state, dict) or state.get("step") != manifest.get("step"):
                    problem = f"controller.json is not the state of step {manifest.get('step')}"
        if problem is not None:
            raise RunDirError(
                f"checkpoint {uri} is incomplete or damaged: {problem}; delete it to resume "
                "from the checkpoint before it"
            )
        return state

    def _prune(self) -> None:
        for old in self._committed()[: -self.keep_checkpoints]:
            storage.delete_tree(old)

    # ------------------------------------------------------------------ rewind
    def rewind(self, step: int) -> None:
        """Make the files look as if the run had just finished ``step`` steps.

        Drops metrics and evaluation rows past ``step``, decisions from ``step`` on (they are made again), torn
        last lines, uncommitted checkpoint directories and the summary. Committed checkpoints
        are kept.
        """
        self._filter_jsonl("metrics.jsonl", lambda row: row.get("step", 0) <= step)
        self._filter_jsonl("decisions.jsonl", lambda row: row.get("step", 0) < step)
        self._filter_jsonl("eval.jsonl", lambda row: row.get("step", 0) <= step)
        committed = set(self._committed())
        for name in storage.list_dir(self.checkpoints):
            where = storage.join(self.checkpoints, name)
            if where not in committed:
                storage.delete_tree(where)
        storage.delete_file(self._at("summary.json"))

    def _filter_jsonl(self, name: str, keep: Callable[[dict[str, Any]], bool]) -> None:
        if not storage.exists(self._at(name)):
            return
        kept = [line for line in self._read_lines(name) if _keep(line, keep)]
        storage.write_text(self._at(name), "".join(kept))
        if storage.is_s3(self.uri):
            self._rows[name] = kept


def _load_saved_config(uri: str) -> Config:
    """The run's config.yaml, with every check ``load_config`` makes (a copy in S3 is read
    through a local file, and errors name the URI)."""
    if not storage.is_s3(uri):
        return load_config(uri)
    with tempfile.TemporaryDirectory(prefix="clpd-config-") as tmp:
        local = Path(tmp, "config.yaml")
        local.write_bytes(storage.read_bytes(uri))
        try:
            return load_config(local)
        except ConfigError as err:
            raise ConfigError(str(err).replace(str(local), uri)) from None


def _keep(line: str, keep: Callable[[dict[str, Any]], bool]) -> bool:
    row = json.loads(line)
    return isinstance(row, dict) and keep(row)


def verify_files(local_dir: Path, files: dict[str, dict[str, Any]]) -> None:
    """Raise :class:`RunDirError` unless every file in ``files`` (name -> size, sha256) is in
    ``local_dir`` with that size and hash (a checkpoint fetched to a node before loading it)."""
    for name, meta in files.items():
        path = local_dir / name
        data = path.read_bytes() if path.is_file() else None
        if data is None or len(data) != meta["size"] or sha256(data) != meta["sha256"]:
            raise RunDirError(
                f"checkpoint file {name} is missing or differs from what was written "
                f"(size {None if data is None else len(data)}, expected {meta['size']}); "
                "delete that checkpoint to resume from the one before it"
            )
