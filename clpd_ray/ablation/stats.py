"""Statistics of an ablation: pure functions from per-run rows to the numbers in summary.json.

* :func:`mean_ci` - the mean over seeds and a Student-t confidence interval (``scipy.stats.t``).
* :func:`paired_compare` - arm ``a`` against arm ``b`` on the seeds both ran: mean difference
  (a minus b), paired t-test (``scipy.stats.ttest_rel``), Wilcoxon signed-rank where ``n`` allows,
  and Cohen's d_z (mean of the paired differences over their standard deviation).
* :func:`holm` - Holm-Bonferroni adjusted p-values for a family of comparisons.
* :func:`comparison_pairs` / :func:`summarise` - which comparisons an ablation reports, and the
  whole ``summary.json`` payload from the ``results.jsonl`` rows.
* :func:`curve_auc`, :func:`steps_to`, :func:`learning_curves` - a run's learning curve
  ([[step, accuracy], ...]) as one number (mean accuracy over the steps it covers, by the
  trapezoid rule), the first step it reaches an accuracy, and per arm the mean and t-interval
  at each step over seeds.
* :func:`floor_of` - the floor (best constant answer's accuracy) the rows were evaluated
  against; the same for every run of an ablation (one evaluation set).

Degenerate cases give ``None`` (JSON ``null``), never NaN or infinity, so summary.json stays
strict JSON: one seed has no interval; identical values have the zero-width interval
``[mean, mean]``; paired differences that are all equal (up to float rounding, :data:`TOL`:
accuracies are fractions k/n, so 0.5 - 0.3 and 0.6 - 0.4 differ in the last bit) have no d_z and
p = 0, or no p-value when they are all zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from scipy import stats as sps

from clpd_ray.errors import ClpdError

__all__ = [
    "CONFIDENCE",
    "REACH",
    "TOL",
    "WILCOXON_MIN_N",
    "Comparison",
    "cohens_dz",
    "comparison_pairs",
    "curve_auc",
    "floor_of",
    "holm",
    "learning_curves",
    "mean_ci",
    "paired_compare",
    "steps_to",
    "summarise",
]

# With n paired differences the smallest two-sided exact Wilcoxon p-value is 2 / 2**n: 0.0625 at
# n = 5, 0.031 at n = 6. Below 6 the test cannot reach 0.05 whatever the data, so it is not run.
WILCOXON_MIN_N = 6
CONFIDENCE = 0.95  # of every interval in summary.json (its key is ci95)
REACH = 0.30  # the accuracy whose first step the learning-curve table reports (issue 13)
TOL = 1e-9  # paired differences whose spread is below TOL x max(1, |mean|) count as all equal


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def mean_ci(values: Sequence[float], level: float = CONFIDENCE) -> tuple[float, list[float] | None]:
    """The mean of ``values`` and its ``level`` t-interval ``[low, high]`` (None when n < 2).

    The interval is ``scipy.stats.t.interval(level, n - 1, loc=mean, scale=sem)`` with
    ``sem = std(ddof=1) / sqrt(n)``; identical values give ``[mean, mean]``.
    """
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"mean_ci needs a non-empty 1-D sequence, got shape {x.shape}")
    mean = float(x.mean())
    if x.size < 2:
        return mean, None
    sem = float(x.std(ddof=1)) / math.sqrt(x.size)
    if sem == 0.0:
        return mean, [mean, mean]
    low, high = sps.t.interval(level, x.size - 1, loc=mean, scale=sem)
    return mean, [float(low), float(high)]


def _all_equal(d: np.ndarray) -> bool:
    return float(d.std(ddof=1)) <= TOL * max(1.0, abs(float(d.mean())))


def cohens_dz(diffs: Sequence[float]) -> float | None:
    """Cohen's d_z: mean of the paired differences over their sample standard deviation."""
    d = np.asarray(diffs, dtype=float)
    if d.size < 2 or _all_equal(d):
        return None
    return float(d.mean()) / float(d.std(ddof=1))


@dataclass(frozen=True)
class Comparison:
    """Arm ``a`` against arm ``b`` over the ``n`` seeds both have; ``mean_diff`` is a minus b."""

    a: str
    b: str
    n: int
    seeds: list[int]
    mean_diff: float | None
    p_value: float | None  # the paired t-test's two-sided p-value
    test: str
    effect_size: float | None  # Cohen's d_z
    wilcoxon_p: float | None = None  # None when n < WILCOXON_MIN_N or all differences are 0
    p_holm: float | None = None  # Holm-adjusted over the ablation's comparisons

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_compare(
    a: str, b: str, a_by_seed: Mapping[int, float], b_by_seed: Mapping[int, float]
) -> Comparison:
    """Compare two arms on the seeds both ran (pairs share data, teachers and student init)."""
    seeds = sorted(set(a_by_seed) & set(b_by_seed))
    xa = np.array([a_by_seed[s] for s in seeds], dtype=float)
    xb = np.array([b_by_seed[s] for s in seeds], dtype=float)
    d = xa - xb
    n = len(seeds)
    mean_diff = float(d.mean()) if n else None
    p_value = wilcoxon_p = None
    if n >= 2:
        if not _all_equal(d):
            p_value = _finite(sps.ttest_rel(xa, xb).pvalue)
        elif abs(float(d.mean())) > TOL:
            p_value = 0.0  # identical non-zero differences: t is infinite
    rounded = np.round(d, 12)  # exact zeros and ties for the rank test
    if n >= WILCOXON_MIN_N and np.any(rounded != 0):
        wilcoxon_p = _finite(sps.wilcoxon(rounded).pvalue)
    return Comparison(
        a=a,
        b=b,
        n=n,
        seeds=seeds,
        mean_diff=mean_diff,
        p_value=p_value,
        test="paired t-test (scipy.stats.ttest_rel, two-sided)",
        effect_size=cohens_dz(d),
        wilcoxon_p=wilcoxon_p,
    )


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values, in input order; ``None`` entries are not in the family."""
    family = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(family)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(family):
        running = max(running, min(1.0, (m - rank) * p))  # step-down keeps the order monotone
        out[i] = running
    return out


def comparison_pairs(
    arms: Sequence[str], single_arms: Mapping[str, str] | None = None
) -> list[tuple[str, str]]:
    """The (a, b) pairs an ablation reports, a minus b.

    ``clpd`` against every other arm but ``adaptive``; ``adaptive`` against ``clpd``; and, for the
    single-teacher check (``single_arms``: teacher name -> arm, weakest first), the strongest
    teacher's student against each weaker teacher's student.
    """
    present = set(arms)
    pairs: list[tuple[str, str]] = []
    if "clpd" in present:
        pairs += [("clpd", b) for b in arms if b not in ("clpd", "adaptive")]
        if "adaptive" in present:
            pairs.append(("adaptive", "clpd"))
    if single_arms and len(single_arms) > 1:
        ladder = list(single_arms.values())
        strongest = ladder[-1]
        pairs += [(strongest, weaker) for weaker in ladder[:-1] if (strongest, weaker) not in pairs]
    return pairs


def _by_seed(
    rows: Iterable[Mapping[str, Any]], arm: str, key: str | None = None
) -> dict[int, float]:
    out: dict[int, float] = {}
    for r in rows:
        if r["arm"] != arm:
            continue
        value = r["accuracy"] if key is None else r["accuracy_by_difficulty"].get(key)
        if value is not None:
            out[int(r["seed"])] = float(value)
    return out


def curve_auc(curve: Sequence[Sequence[float]]) -> float | None:
    """Mean accuracy over the steps a learning curve covers: the trapezoid area under
    accuracy-vs-step divided by the step span (the accuracy itself for one point; None for
    none). Curves on the same step grid (one ``train.eval_every``) compare directly."""
    if not curve:
        return None
    steps = np.array([c[0] for c in curve], dtype=float)
    acc = np.array([c[1] for c in curve], dtype=float)
    if steps.size == 1:
        return float(acc[0])
    area = float(np.sum((steps[1:] - steps[:-1]) * (acc[1:] + acc[:-1]) / 2.0))
    return area / float(steps[-1] - steps[0])


def steps_to(curve: Sequence[Sequence[float]], accuracy: float) -> int | None:
    """The first evaluated step whose accuracy is at least ``accuracy`` (None: never)."""
    return next((int(s) for s, a in curve if a >= accuracy), None)


def learning_curves(
    rows: Sequence[Mapping[str, Any]], arms: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per arm with curves: ``steps``, and at each step ``mean``, ``ci95`` and ``n`` over the
    seeds evaluated there; ``auc`` (:func:`curve_auc` per seed: mean, ci95, n, values); ``reach``:
    the first step the mean curve reaches :data:`REACH` (None: never) and how many seeds' own
    curves reach it."""
    out: dict[str, dict[str, Any]] = {}
    for arm in arms:
        curves = {int(r["seed"]): r["curve"] for r in rows if r["arm"] == arm and r.get("curve")}
        if not curves:
            continue
        at: dict[int, list[float]] = {}
        for curve in curves.values():
            for step, acc in curve:
                at.setdefault(int(step), []).append(float(acc))
        steps = sorted(at)
        stats = [mean_ci(at[s]) for s in steps]
        seeds = sorted(curves)
        aucs = [float(curve_auc(curves[s]) or 0.0) for s in seeds]
        auc_mean, auc_ci = mean_ci(aucs)
        means = [float(m) for m, _ in stats]
        out[arm] = {
            "steps": steps,
            "mean": means,
            "ci95": [c for _, c in stats],
            "n": [len(at[s]) for s in steps],
            "auc": {
                "mean": auc_mean,
                "ci95": auc_ci,
                "n": len(aucs),
                "seeds": seeds,
                "values": aucs,
            },
            "reach": {
                "accuracy": REACH,
                "step": steps_to(list(zip(steps, means, strict=True)), REACH),
                "seeds": sum(steps_to(curves[s], REACH) is not None for s in seeds),
            },
        }
    return out


def floor_of(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """``{"floor", "answer"}`` of the rows (None when no row has one); raises ClpdError when
    runs disagree, i.e. were evaluated on different sets and are not comparable."""
    seen = {(r["floor"], r.get("floor_answer")) for r in rows if r.get("floor") is not None}
    if not seen:
        return None
    if len(seen) > 1:
        raise ClpdError(
            f"the runs report different floors {sorted(seen, key=str)}: they were evaluated on "
            f"different evaluation sets, so their accuracies do not compare; report them apart"
        )
    floor, answer = seen.pop()
    return {"floor": floor, "answer": answer}


def _extra_metric(rows: Sequence[Mapping[str, Any]], arm: str, key: str) -> dict[str, Any] | None:
    by_seed = {int(r["seed"]): float(r[key]) for r in rows if r["arm"] == arm and key in r}
    if not by_seed:
        return None
    seeds = sorted(by_seed)
    mean, ci = mean_ci([by_seed[s] for s in seeds])
    return {"mean": mean, "ci95": ci, "n": len(seeds), "seeds": seeds}


def summarise(
    rows: Sequence[Mapping[str, Any]],
    arms: Sequence[str] | None = None,
    single_arms: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The ablation's summary.json payload from its ``results.jsonl`` rows.

    ``arms.<arm>``: ``mean``, ``ci95`` ([low, high] or None), ``n``, ``seeds``, ``values`` and
    ``by_difficulty.<d>`` (the same per difficulty); ``comparisons``: :class:`Comparison` dicts.
    Only when the rows carry them (runs made since they were recorded): ``arms.<arm>.full_chain``
    (mean, ci95, n, seeds), ``floor`` (:func:`floor_of`) and ``learning_curves``
    (:func:`learning_curves`).
    """
    arms = list(arms) if arms is not None else list(dict.fromkeys(r["arm"] for r in rows))
    out_arms: dict[str, Any] = {}
    for arm in arms:
        by_seed = _by_seed(rows, arm)
        if not by_seed:
            continue
        seeds = sorted(by_seed)
        values = [by_seed[s] for s in seeds]
        mean, ci = mean_ci(values)
        difficulties = sorted(
            {k for r in rows if r["arm"] == arm for k in r["accuracy_by_difficulty"]}, key=int
        )
        by_difficulty = {}
        for k in difficulties:
            dv = _by_seed(rows, arm, k)
            d_mean, d_ci = mean_ci(list(dv.values()))
            by_difficulty[k] = {"mean": d_mean, "ci95": d_ci, "n": len(dv)}
        out_arms[arm] = {
            "mean": mean,
            "ci95": ci,
            "n": len(values),
            "seeds": seeds,
            "values": values,
            "by_difficulty": by_difficulty,
        }
        full_chain = _extra_metric(rows, arm, "full_chain")
        if full_chain is not None:
            out_arms[arm]["full_chain"] = full_chain
    done = list(out_arms)
    single = {t: a for t, a in (single_arms or {}).items() if a in out_arms}
    comparisons = [
        paired_compare(a, b, _by_seed(rows, a), _by_seed(rows, b))
        for a, b in comparison_pairs(done, single)
    ]
    adjusted = holm([c.p_value for c in comparisons])
    out: dict[str, Any] = {
        "metric": "held-out exact-match accuracy",
        "confidence": CONFIDENCE,
        "arms": out_arms,
        "comparisons": [
            replace(c, p_holm=p).to_dict() for c, p in zip(comparisons, adjusted, strict=True)
        ],
    }
    floor = floor_of(rows)
    if floor is not None:
        out["floor"] = floor
    curves = learning_curves(rows, done)
    if curves:
        out["learning_curves"] = curves
    return out
