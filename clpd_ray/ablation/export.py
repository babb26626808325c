"""Export an ablation's results without its weights: what `clpd report` needs, and nothing else.

An ablation directory holds every run's student weights and checkpoints (1.1 MB a run for the
demo's 30k-parameter student, far more for real models). To
publish or share the results, ``export_ablation(src, dst)`` copies only the files the report is
built from, then writes the report in ``dst``, so ``clpd report dst`` redoes every number and
figure from the export alone::

    src/ablation.json, results.jsonl                  ──▶ dst/ (same names)
    src/runs/<arm>/seed-<s>/{config.yaml, summary.json, metrics.jsonl, decisions.jsonl,
                             eval.jsonl (the learning curve, when train.eval_every is set)}
                                                      ──▶ dst/runs/<arm>/seed-<s>/
    write_report(dst)                                 ──▶ dst/summary.json, report.md, figures/

Only finished runs (those with a results.jsonl row) are exported. ``dst`` must not exist or be
empty, so an export never overwrites anything.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from clpd_ray.ablation.results import MANIFEST, RESULTS, read_results
from clpd_ray.errors import ClpdError

__all__ = ["RUN_FILES", "export_ablation"]

# Per run: what the report reads (summary.json, metrics.jsonl, decisions.jsonl, eval.jsonl),
# and the resolved config that says how the run was made.
RUN_FILES = ("config.yaml", "summary.json", "metrics.jsonl", "decisions.jsonl", "eval.jsonl")


def export_ablation(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """Copy the report inputs of the ablation in ``src`` to ``dst``, report there; returns
    the summary (as :func:`clpd_ray.ablation.report.write_report`)."""
    from clpd_ray.ablation.report import write_report

    src, dst = Path(src), Path(dst)
    rows = read_results(src)  # names src in its error when it is not an ablation directory
    if not (src / MANIFEST).is_file():
        raise ClpdError(f"{src} has no {MANIFEST}; point at a directory written by `clpd ablate`")
    if not rows:
        raise ClpdError(f"{src / RESULTS} has no finished runs yet; nothing to export")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ClpdError(f"--export {dst} exists and is not empty; choose a new directory")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ClpdError(f"--export {dst} is inside the ablation {src}; choose a directory outside")
    for row in rows:
        run = src / row["run_dir"]
        if not (run / "summary.json").is_file():
            raise ClpdError(
                f"{run} has no summary.json but {src / RESULTS} lists it; rerun `clpd ablate` "
                f"on {src} to redo that run, then export again"
            )
    dst.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST, RESULTS):
        shutil.copy2(src / name, dst / name)
    for row in rows:
        out = dst / row["run_dir"]
        out.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:
            f = src / row["run_dir"] / name
            if f.is_file():
                shutil.copy2(f, out / name)
    return write_report(dst)
