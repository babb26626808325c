"""The files that mark and index an ablation directory, shared by the runner, report and export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clpd_ray.errors import ClpdError

__all__ = ["MANIFEST", "RESULTS", "read_results"]

MANIFEST = "ablation.json"  # the ablation directory's marker and base config
RESULTS = "results.jsonl"


def read_results(out: str | Path) -> list[dict[str, Any]]:
    """The rows of ``<out>/results.jsonl`` (an ablation directory)."""
    path = Path(out) / RESULTS
    if not path.is_file():
        raise ClpdError(f"{path} does not exist; point at a directory written by `clpd ablate`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
