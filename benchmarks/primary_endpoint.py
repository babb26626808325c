"""Issue 13's primary endpoint, from the committed evaluation exports (docs/results.md protocol).

Per budget: the paired difference between ``clpd`` and the comparator chosen on the tuning draw
before evaluation, over the evaluation seeds both ran; the paired t-test and the Wilcoxon
signed-rank test (``clpd_ray.ablation.stats.paired_compare``: scipy's ``ttest_rel`` and
``wilcoxon``), each Holm-adjusted over the budgets given. "CLPD is better" is claimed at a budget
only where the difference is positive and both adjusted p-values are below 0.05. A budget whose
export is not there yet is left out of the family, and the table says so.

    python benchmarks/primary_endpoint.py \\
        --budget 1500=docs/results/eval-1500:sft --budget 4500=docs/results/eval-4500:sft

Prints a markdown table (docs/results.md quotes it; tests/test_published_results.py checks that).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from clpd_ray.ablation.results import RESULTS, read_results
from clpd_ray.ablation.stats import holm, mean_ci, paired_compare

ALPHA = 0.05
HEADER = (
    "| budget | clpd minus | n | mean diff | 95% CI (t) | p (t) | p (Wilcoxon) | Holm p (t) | "
    "Holm p (Wilcoxon) | CLPD better? |\n|---:|---|---:|---:|---|---:|---:|---:|---:|---|"
)


def by_seed(rows: list[dict[str, Any]], export: Path, arm: str) -> dict[int, float]:
    out = {int(r["seed"]): float(r["accuracy"]) for r in rows if r["arm"] == arm}
    if not out:
        raise SystemExit(f"{export}/results.jsonl has no runs of arm {arm!r}")
    return out


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def primary_table(budgets: list[tuple[int, Path, str]]) -> str:
    """The markdown table for (budget, export directory, comparator arm) triples."""
    rows: list[dict[str, Any]] = []
    for budget, export, comparator in budgets:
        results = read_results(export)
        clpd, other = by_seed(results, export, "clpd"), by_seed(results, export, comparator)
        c = paired_compare("clpd", comparator, clpd, other)
        diffs = [clpd[s] - other[s] for s in c.seeds]
        rows.append({"budget": budget, "b": comparator, "c": c, "ci": mean_ci(diffs)[1]})
    holm_t = holm([r["c"].p_value for r in rows])
    holm_w = holm([r["c"].wilcoxon_p for r in rows])
    lines = [HEADER]
    for r, ht, hw in zip(rows, holm_t, holm_w, strict=True):
        c = r["c"]
        better = (
            c.mean_diff is not None
            and c.mean_diff > 0
            and ht is not None
            and hw is not None
            and max(ht, hw) < ALPHA
        )
        ci = "-" if r["ci"] is None else f"[{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}]"
        lines.append(
            f"| {r['budget']:,} | {r['b']} | {c.n} | {fmt(c.mean_diff, '+.3f')} | {ci} | "
            f"{fmt(c.p_value, '.3g')} | {fmt(c.wilcoxon_p, '.3g')} | {fmt(ht, '.3g')} | "
            f"{fmt(hw, '.3g')} | {'yes' if better else 'no'} |"
        )
    return "\n".join(lines)


def _budget(text: str) -> tuple[int, Path, str]:
    try:
        steps, rest = text.split("=", 1)
        export, comparator = rest.rsplit(":", 1)
        return int(steps), Path(export), comparator
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--budget {text!r}: write STEPS=EXPORT_DIR:COMPARATOR, e.g. "
            "1500=docs/results/eval-1500:sft"
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=_budget, action="append", required=True)
    args = parser.parse_args(argv)
    present = []
    for steps, export, comparator in args.budget:
        if (export / RESULTS).is_file():
            present.append((steps, export, comparator))
        else:
            print(f"(budget {steps:,}: {export} has no results yet; left out of the Holm family)")
    if not present:
        return 1
    print(primary_table(present))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
