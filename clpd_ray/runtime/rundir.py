"""The run directory contract (documented in README.md, "Run directory").

<out>/
  config.yaml        the resolved config
  metrics.jsonl      one JSON object per logged step: step, stage, teacher, loss, lr, tokens_per_s, ...
  decisions.jsonl    one JSON object per scheduler decision that changed something:
                     step, stage, teacher, policy, reason, replay
  summary.json       steps, wall_s, student.accuracy(_by_difficulty), teachers.<name>.accuracy, stages
  student/           save_pretrained directory (model + tokenizer)
  checkpoints/       step-<N>/ written atomically (temporary directory, then rename):
                       student.safetensors  student_optim.pt  student.json  controller.json

A crash can leave a ``.step-<N>.tmp`` directory (never read, removed on resume) and a torn last
line in a ``.jsonl`` file (dropped on resume); a committed ``step-<N>`` is always complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clpd_ray.config import Config, save_config
from clpd_ray.errors import RunDirError

__all__ = ["CHECKPOINT_FILES", "RunDir", "write_json_atomic"]

# What a committed checkpoint holds; controller.json is written last.
CHECKPOINT_FILES = ("student.safetensors", "student_optim.pt", "student.json", "controller.json")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write ``payload`` to a temporary file, flush it to disk, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(payload, indent=2, sort_keys=False))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @staticmethod
    def check_new(path: str | Path) -> None:
        """Raise unless ``path`` can become a new run directory (absent, or an empty directory)."""
        p = Path(path)
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            if (p / "config.yaml").is_file() and (p / "checkpoints").is_dir():
                hint = f"choose a new directory, or continue that run with: clpd run --resume {p}"
            else:
                hint = "choose a new directory (or resume that run with --resume)"
            raise RunDirError(f"--out {p} already exists and is not empty; {hint}")

    @classmethod
    def create(cls, path: str | Path, config: Config) -> RunDir:
        """A new run directory; refuses an existing non-empty one so nothing is overwritten."""
        cls.check_new(path)
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        (p / "checkpoints").mkdir()
        save_config(config, p / "config.yaml")
        return cls(p)

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run directory to resume; raises :class:`RunDirError` if it is not one."""
        p = Path(path)
        if not p.is_dir():
            raise RunDirError(
                f"--resume {p}: no such run directory; pass the --out directory of an earlier "
                "`clpd run`"
            )
        missing = [n for n in ("config.yaml", "checkpoints") if not (p / n).exists()]
        if missing:
            raise RunDirError(
                f"--resume {p}: not a run directory (no {' or '.join(missing)}); pass the --out "
                "directory of an earlier `clpd run`"
            )
        return cls(p)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def append(self, name: str, row: dict[str, Any]) -> None:
        with open(self.path / name, "a") as f:
            f.write(json.dumps(row) + "\n")

    def metrics(self, row: dict[str, Any]) -> None:
        self.append("metrics.jsonl", row)

    def decision(self, row: dict[str, Any]) -> None:
        self.append("decisions.jsonl", row)

    def summary(self, payload: dict[str, Any]) -> None:
        write_json_atomic(self.path / "summary.json", payload)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_tmp(self, step: int) -> Path:
        tmp = self.checkpoints / f".step-{step:07d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit_checkpoint(self, tmp: Path, step: int) -> Path:
        """Make ``tmp`` the checkpoint of ``step`` with one rename (all or nothing)."""
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        final = self.checkpoints / f"step-{step:07d}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(self.checkpoints)
        return final

    def latest_checkpoint(self) -> Path | None:
        done = sorted(self.checkpoints.glob("step-*"))
        return done[-1] if done else None

    def read_checkpoint(self, path: Path) -> dict[str, Any]:
        """The controller state of checkpoint ``path``; raises if it is incomplete or unreadable."""
        missing = [n for n in CHECKPOINT_FILES if not (path / n).is_file()]
        try:
            state = None if missing else json.loads((path / "controller.json").read_text())
        except ValueError as err:
            missing = [f"a readable controller.json ({err})"]
        if missing or not isinstance(state, dict) or "step" not in state:
            raise RunDirError(
                f"checkpoint {path} is incomplete (missing {', '.join(missing) or 'step'}); it was "
                "not written by clpd: delete it to resume from the checkpoint before it"
            )
        return state

    # ------------------------------------------------------------------ rewind
    def rewind(self, step: int) -> None:
        """Make the files look as if the run had just finished ``step`` steps.

        Drops metrics rows past ``step``, decisions from ``step`` on (they are made again), torn
        last lines and unfinished temporary checkpoints. Committed checkpoints are kept.
        """
        self._filter_jsonl("metrics.jsonl", lambda row: row.get("step", 0) <= step)
        self._filter_jsonl("decisions.jsonl", lambda row: row.get("step", 0) < step)
        for tmp in self.checkpoints.glob(".step-*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
        summary = self.path / "summary.json"
        if summary.exists():
            summary.unlink()

    def _filter_jsonl(self, name: str, keep: Callable[[dict[str, Any]], bool]) -> None:
        path = self.path / name
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash mid-append
            if isinstance(row, dict) and keep(row):
                kept.append(json.dumps(row) + "\n")
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
