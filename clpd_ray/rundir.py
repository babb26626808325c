"""The run directory contract (documented in README.md, "Run directory").

<out>/
  config.yaml        the resolved config
  metrics.jsonl      one JSON object per logged step: step, stage, teacher, loss, lr, tokens_per_s, ...
  decisions.jsonl    one JSON object per scheduler decision that changed something:
                     step, stage, teacher, policy, reason, replay
  summary.json       steps, wall_s, student.accuracy(_by_difficulty), teachers.<name>.accuracy, stages
  student/           save_pretrained directory (model + tokenizer)
  checkpoints/       step-<N>/ written atomically (temporary directory, then rename)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from clpd_ray.config import Config, save_config
from clpd_ray.errors import RunDirError

__all__ = ["RunDir", "write_json_atomic"]


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False))
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, path: str | Path, config: Config) -> RunDir:
        """A new run directory; refuses an existing non-empty one so nothing is overwritten."""
        p = Path(path)
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            raise RunDirError(
                f"--out {p} already exists and is not empty; choose a new directory "
                "(or resume that run with --resume)"
            )
        p.mkdir(parents=True, exist_ok=True)
        (p / "checkpoints").mkdir()
        save_config(config, p / "config.yaml")
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

    def checkpoint_tmp(self, step: int) -> Path:
        tmp = self.checkpoints / f".step-{step:07d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit_checkpoint(self, tmp: Path, step: int) -> Path:
        final = self.checkpoints / f"step-{step:07d}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

    def latest_checkpoint(self) -> Path | None:
        done = sorted(self.checkpoints.glob("step-*"))
        return done[-1] if done else None
