"""docs/results.md is what `clpd report` makes of the saved results, not numbers typed by hand.

docs/results/<loss>/ is the `clpd report --export` copy of each published ablation (no weights).
Here `clpd report` rebuilds each from its inputs alone, and the rebuilt summary.json and report
tables must equal the committed ones and appear, row for row, in docs/results.md.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from clpd_ray.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs"
# Each export: the runs it must hold and the fewest seeds any arm has.
# The first wave's ablations: 6 arms (+2 single-teacher arms for fkl) x 5 seeds, and the
# follow-up (clpd with a long last stage and with equal stages, 10 seeds each).
PUBLISHED = {"fkl": (40, 5), "jsd": (30, 5), "fkl-long-last-stage": (10, 10)}
PUBLISHED |= {"fkl-clpd-10-seeds": (10, 10)}
# The redo's tuning-draw exports (issue 13): 2 tuning seeds per arm (the second task: 1); only
# their per-arm table is quoted in docs/results.md (the learning rate each arm gets; the
# boundary-grid oracle).
TUNING = {"tuning-1500": (56, 2), "tuning-4500": (56, 2), "oracle-1500": (32, 2)}
TUNING |= {"oracle-4500": (32, 2), "tuning-add-4500": (20, 1)}
# The redo's evaluation exports (issue 13): 7 arms x 10 evaluation seeds; the second task's 5
# arms x 5 seeds; the oracle's pick on the 10 evaluation seeds. With learning curves, the floor and
# full-chain match; every table of their reports is quoted in docs/results.md.
EVALUATION = {"eval-1500": (70, 10), "eval-4500": (70, 10), "eval-add-4500": (25, 5)}
EVALUATION |= {"oracle-eval-1500": (10, 10), "oracle-eval-4500": (10, 10)}
OUTPUTS = ("summary.json", "report.md", "figures")  # what `clpd report` writes


def _unquoted(rows: list[str]) -> list[str]:
    """The rows docs/results.md does not contain."""
    results_md = (DOCS / "results.md").read_text()
    return [r for r in rows if r not in results_md]


def _tables(report: str, sections: tuple[str, ...]) -> list[str]:
    """The table rows (lines starting with '|') under the given '## ' headings of a report."""
    rows, keep = [], False
    for line in report.splitlines():
        if line.startswith("## "):
            keep = line[3:].strip() in sections
        elif keep and line.startswith("|") and not line.startswith("|---"):
            rows.append(line)
    return rows


@pytest.mark.parametrize("loss", [*PUBLISHED, *TUNING, *EVALUATION])
def test_clpd_report_rebuilds_the_published_numbers(tmp_path, loss, capsys):
    src = DOCS / "results" / loss
    copy = tmp_path / loss
    shutil.copytree(src, copy)
    for name in OUTPUTS:
        path = copy / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    assert main(["report", str(copy)]) == 0, capsys.readouterr().err
    rebuilt = json.loads((copy / "summary.json").read_text())
    assert rebuilt == json.loads((src / "summary.json").read_text())
    tuning, evaluation = loss in TUNING, loss in EVALUATION
    runs, fewest_seeds = {**PUBLISHED, **TUNING, **EVALUATION}[loss]
    assert rebuilt["runs"] == runs
    assert min(a["n"] for a in rebuilt["arms"].values()) == fewest_seeds

    report = (copy / "report.md").read_text()
    committed = (src / "report.md").read_text()
    drop_date = lambda text: [ln for ln in text.splitlines() if not ln.startswith("Generated ")]  # noqa: E731
    assert drop_date(report) == drop_date(committed)
    redrawn: tuple[str, ...] = (
        "accuracy.png",
        "accuracy_by_difficulty.png",
    )
    if evaluation:
        redrawn += ("learning_curves.png",)
    if "clpd" in rebuilt["arms"]:
        redrawn += ("schedule_clpd.png",)
    for name in redrawn:
        assert (copy / "figures" / name).read_bytes()[:4] == b"\x89PNG"

    sections = ("Accuracy per arm",)
    if not tuning:
        sections += (
            "Accuracy by difficulty",
            "Paired comparisons",
            "Stronger teacher, worse student?",
        )
    if evaluation:
        sections += ("Full-chain exact match", "Learning curves")
    rows = _tables(report, sections)
    assert len(rows) > (1 if tuning else 2) * len(rebuilt["arms"])
    missing = _unquoted(rows)
    assert not missing, f"docs/results.md lacks these rows of the {loss} report: {missing}"


# The primary endpoint's comparator per budget, chosen on the tuning draw before evaluation: the
# first task at two budgets (Holm over both), the second task at one.
PRIMARY = [
    {1500: ("eval-1500", "sft"), 4500: ("eval-4500", "sft")},
    {4500: ("eval-add-4500", "teacher_only")},
]


def _script_rows(name: str, argv: list[str], capsys) -> list[str]:
    """The markdown rows benchmarks/<name>.py prints for argv."""
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location(name, benchmarks / f"{name}.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(benchmarks))  # as when run as a script: its siblings import
    try:
        spec.loader.exec_module(script)
    finally:
        sys.path.remove(str(benchmarks))
    assert script.main(argv) == 0
    return [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]


@pytest.mark.parametrize("budgets", PRIMARY, ids=["first-task", "second-task"])
def test_the_primary_endpoint_table_is_what_the_script_prints(capsys, budgets):
    argv = [f"--budget={b}={DOCS / 'results' / d}:{arm}" for b, (d, arm) in budgets.items()]
    rows = _script_rows("primary_endpoint", argv, capsys)
    assert len(rows) == 1 + len(budgets)  # the header and one row per budget
    missing = _unquoted(rows)
    assert not missing, f"docs/results.md lacks these primary-endpoint rows: {missing}"


# adaptive (in the evaluation export) against the oracle's pick (in its own export), per budget.
ORACLE = {
    1500: (("eval-1500", "adaptive"), ("oracle-eval-1500", "clpd-b250-500")),
    4500: (("eval-4500", "adaptive"), ("oracle-eval-4500", "clpd-b750-2250")),
}


def test_the_oracle_table_is_what_the_script_prints(capsys):
    results = DOCS / "results"
    argv = [
        f"--budget={b}={results / a}:{a_arm},{results / o}:{o_arm}"
        for b, ((a, a_arm), (o, o_arm)) in ORACLE.items()
    ]
    rows = _script_rows("oracle_endpoint", argv, capsys)
    assert len(rows) == 1 + len(ORACLE)
    assert all(row.split(" | ")[2] == "10" for row in rows[1:])  # n: ten paired seeds
    missing = _unquoted(rows)
    assert not missing, f"docs/results.md lacks these oracle rows: {missing}"
