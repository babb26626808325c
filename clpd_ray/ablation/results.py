"""The files that mark and index an ablation directory, shared by the runner, report and export.

JSONL files are appended to a row at a time, so a crash mid-append leaves a torn last line:
:func:`read_jsonl` skips it with a warning (the runner rebuilds ``results.jsonl`` from the run
directories on its next invocation). A bad line anywhere else is corruption and an error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from clpd_ray.errors import ClpdError

__all__ = ["MANIFEST", "RESULTS", "read_jsonl", "read_results"]

_log = logging.getLogger(__name__)

MANIFEST = "ablation.json"  # the ablation directory's marker and base config
RESULTS = "results.jsonl"


def read_results(out: str | Path) -> list[dict[str, Any]]:
    """The rows of ``<out>/results.jsonl`` (an ablation directory)."""
    path = Path(out) / RESULTS
    if not path.is_file():
        raise ClpdError(f"{path} does not exist; point at a directory written by `clpd ablate`")
    return read_jsonl(path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON object on each non-blank line of ``path``; a torn last line is skipped with a
    warning, any other line that is not a JSON object raises ClpdError naming it."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    rows: list[dict[str, Any]] = []
    for k, (lineno, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if k == len(numbered) - 1:
                _log.warning(
                    "clpd: warning: %s: its last line %d is torn (not complete JSON; a crash "
                    "while it was written?): ignored it and read the %d rows before it",
                    path,
                    lineno,
                    len(rows),
                )
                break
            raise ClpdError(
                f"{path}: line {lineno} is not valid JSON ({err.msg}: column {err.colno}), and it "
                f"is not the last "
                f"line, so the file is damaged; fix or delete that line"
            ) from None
        if not isinstance(row, dict):
            raise ClpdError(
                f"{path}: line {lineno} holds a {type(row).__name__}, not a JSON object; fix or "
                f"delete that line"
            )
        rows.append(row)
    return rows
