"""Issue 13 (b): ``adaptive`` against the boundary-grid oracle's pick, on the evaluation seeds.

The pick (the schedule the grid search chose on its tuning seeds) ran on the evaluation seeds
in its own export; ``adaptive`` ran in the evaluation export. Per budget: the paired difference
``adaptive`` minus the pick over the seeds both ran, its 95% CI, the paired t-test and the
Wilcoxon signed-rank test (``clpd_ray.ablation.stats``). As declared in docs/results.md before
the runs, "``adaptive`` matches the oracle" is read at a budget only where the CI's lower end is
above ``-MARGIN``; no Holm family (this reading is not a test of superiority).

    python benchmarks/oracle_endpoint.py \\
        --budget 1500=docs/results/eval-1500:adaptive,docs/results/oracle-eval-1500:clpd-b250-500 \\
        --budget 4500=docs/results/eval-4500:adaptive,docs/results/oracle-eval-4500:clpd-b750-2250

Prints a markdown table (docs/results.md quotes it; tests/test_published_results.py checks that).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from primary_endpoint import by_seed, fmt

from clpd_ray.ablation.results import read_results
from clpd_ray.ablation.stats import mean_ci, paired_compare

MARGIN = 0.05
HEADER = (
    "| budget | adaptive minus | n | adaptive | pick | mean diff | 95% CI (t) | p (t) | "
    "p (Wilcoxon) | matches the pick? |\n|---:|---|---:|---:|---:|---:|---|---:|---:|---|"
)

Side = tuple[Path, str]  # (export directory, arm)


def oracle_table(budgets: list[tuple[int, Side, Side]]) -> str:
    """The markdown table for (budget, adaptive side, pick side) triples."""
    lines = [HEADER]
    for budget, (a_export, a_arm), (b_export, b_arm) in budgets:
        a = by_seed(read_results(a_export), a_export, a_arm)
        b = by_seed(read_results(b_export), b_export, b_arm)
        c = paired_compare(a_arm, b_arm, a, b)
        _, ci = mean_ci([a[s] - b[s] for s in c.seeds])
        mean_a, _ = mean_ci([a[s] for s in c.seeds])
        mean_b, _ = mean_ci([b[s] for s in c.seeds])
        matches = ci is not None and ci[0] > -MARGIN
        ci_text = "-" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"
        lines.append(
            f"| {budget:,} | {b_arm} | {c.n} | {mean_a:.3f} | {mean_b:.3f} | "
            f"{fmt(c.mean_diff, '+.3f')} | {ci_text} | {fmt(c.p_value, '.3g')} | "
            f"{fmt(c.wilcoxon_p, '.3g')} | {'yes' if matches else 'no'} |"
        )
    return "\n".join(lines)


def _side(text: str) -> Side:
    export, arm = text.rsplit(":", 1)
    if not export or not arm:
        raise ValueError(text)
    return Path(export), arm


def _budget(text: str) -> tuple[int, Side, Side]:
    try:
        steps, rest = text.split("=", 1)
        first, second = rest.split(",")
        return int(steps), _side(first), _side(second)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--budget {text!r}: write STEPS=EXPORT_DIR:ARM,EXPORT_DIR:ARM (adaptive first, the "
            "pick second), e.g. 1500=docs/results/eval-1500:adaptive,"
            "docs/results/oracle-eval-1500:clpd-b250-500"
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=_budget, action="append", required=True)
    args = parser.parse_args(argv)
    print(oracle_table(args.budget))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
