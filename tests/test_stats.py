"""The ablation statistics on hand-made numbers, against closed forms (no Ray)."""

from __future__ import annotations

import json
import math

import pytest

from clpd_ray.ablation.stats import (
    WILCOXON_MIN_N,
    cohens_dz,
    comparison_pairs,
    holm,
    mean_ci,
    paired_compare,
    summarise,
)

T_975_DF3 = 3.182446305284263  # Student t quantile 0.975 with 3 degrees of freedom (tables)


def test_mean_ci_matches_the_t_table():
    mean, ci = mean_ci([1.0, 2.0, 3.0, 4.0])
    half = T_975_DF3 * math.sqrt(5 / 3) / 2  # sd = sqrt(5/3), sem = sd / sqrt(4)
    assert mean == 2.5
    assert ci == pytest.approx([2.5 - half, 2.5 + half], rel=1e-12)


def test_mean_ci_degenerate_cases():
    assert mean_ci([0.7]) == (0.7, None)  # one seed: no interval
    assert mean_ci([0.25, 0.25, 0.25]) == (0.25, [0.25, 0.25])  # no spread: zero width
    with pytest.raises(ValueError, match="non-empty"):
        mean_ci([])


def test_paired_compare_against_the_closed_form_for_two_degrees_of_freedom():
    a = {0: 0.5, 1: 0.6, 2: 0.7}
    b = {0: 0.4, 1: 0.45, 2: 0.5}
    c = paired_compare("clpd", "standard_kd", a, b)
    # d = (0.10, 0.15, 0.20): mean 0.15, sd 0.05, t = 0.15 / (0.05 / sqrt 3) = sqrt 27.
    # With 2 df the t CDF is 1/2 + t / (2 sqrt(2 + t^2)), so p = 1 - t / sqrt(2 + t^2).
    assert (c.a, c.b, c.n, c.seeds) == ("clpd", "standard_kd", 3, [0, 1, 2])
    assert c.mean_diff == pytest.approx(0.15)
    assert c.p_value == pytest.approx(1 - math.sqrt(27 / 29), rel=1e-9)
    assert c.effect_size == pytest.approx(3.0)
    assert c.wilcoxon_p is None  # n = 3 < WILCOXON_MIN_N
    assert "ttest_rel" in c.test


def test_paired_compare_uses_only_the_seeds_both_arms_ran():
    c = paired_compare("a", "b", {0: 0.5, 1: 0.9, 2: 0.1}, {1: 0.5, 2: 0.2, 5: 0.0})
    assert c.seeds == [1, 2] and c.n == 2
    assert c.mean_diff == pytest.approx((0.4 - 0.1) / 2)


def test_paired_compare_degenerate_differences_give_none_not_nan():
    same = paired_compare("a", "b", {0: 0.3, 1: 0.4}, {0: 0.3, 1: 0.4})
    assert (same.mean_diff, same.p_value, same.effect_size) == (0.0, None, None)
    shifted = paired_compare("a", "b", {0: 0.5, 1: 0.6}, {0: 0.3, 1: 0.4})
    assert shifted.p_value == 0.0  # t is infinite
    assert shifted.effect_size is None  # sd of the differences is 0
    one = paired_compare("a", "b", {0: 0.5}, {0: 0.3})
    assert one.n == 1 and one.p_value is None and one.effect_size is None
    json.dumps(one.to_dict(), allow_nan=False)


def test_wilcoxon_only_from_its_minimum_n():
    n = WILCOXON_MIN_N
    a = {s: 0.5 + 0.01 * (s + 1) for s in range(n)}
    b = dict.fromkeys(range(n), 0.5)
    # All n differences positive: the exact two-sided p-value is 2 / 2**n.
    assert paired_compare("a", "b", a, b).wilcoxon_p == pytest.approx(2 / 2**n)
    short = {s: v for s, v in a.items() if s < n - 1}
    assert paired_compare("a", "b", short, b).wilcoxon_p is None


def test_cohens_dz():
    assert cohens_dz([1.0, 2.0, 3.0]) == pytest.approx(2.0)  # mean 2, sd 1
    assert cohens_dz([1.0]) is None
    assert cohens_dz([2.0, 2.0]) is None


def test_holm():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([None, 0.02, 0.01]) == [None, pytest.approx(0.02), pytest.approx(0.02)]
    assert holm([0.6, 0.7]) == [1.0, 1.0]
    assert holm([]) == []


def test_comparison_pairs():
    arms = ["standard_kd", "data_only", "teacher_only", "clpd", "random_curriculum", "adaptive"]
    assert comparison_pairs(arms) == [
        ("clpd", "standard_kd"),
        ("clpd", "data_only"),
        ("clpd", "teacher_only"),
        ("clpd", "random_curriculum"),
        ("adaptive", "clpd"),
    ]
    single = {"t0": "single:t0", "t1": "single:t1", "t2": "standard_kd"}
    assert comparison_pairs(["standard_kd", "single:t0", "single:t1"], single) == [
        ("standard_kd", "single:t0"),
        ("standard_kd", "single:t1"),
    ]
    assert comparison_pairs(["adaptive", "standard_kd"]) == []


def _row(arm: str, seed: int, acc: float, by: dict[str, float]) -> dict:
    return {"arm": arm, "seed": seed, "accuracy": acc, "accuracy_by_difficulty": by}


def test_summarise_hand_made_rows():
    rows = [
        _row("standard_kd", 0, 0.40, {"1": 0.8, "2": 0.0}),
        _row("clpd", 0, 0.50, {"1": 0.9, "2": 0.1}),
        _row("standard_kd", 1, 0.45, {"1": 0.85, "2": 0.05}),
        _row("clpd", 1, 0.60, {"1": 1.0, "2": 0.2}),
        _row("clpd", 2, 0.70, {"1": 1.0, "2": 0.4}),  # standard_kd has no seed 2
    ]
    s = summarise(rows, ["standard_kd", "clpd"])
    json.dumps(s, allow_nan=False)
    assert list(s["arms"]) == ["standard_kd", "clpd"]
    clpd = s["arms"]["clpd"]
    assert (clpd["n"], clpd["seeds"], clpd["values"]) == (3, [0, 1, 2], [0.5, 0.6, 0.7])
    assert clpd["mean"] == pytest.approx(0.6)
    assert clpd["ci95"] == pytest.approx(list(mean_ci([0.5, 0.6, 0.7])[1]))
    assert clpd["by_difficulty"]["2"]["mean"] == pytest.approx(0.7 / 3)
    assert clpd["by_difficulty"]["1"]["n"] == 3
    [c] = s["comparisons"]
    assert (c["a"], c["b"], c["n"]) == ("clpd", "standard_kd", 2)
    assert c["mean_diff"] == pytest.approx(0.125)
    assert c["p_holm"] == c["p_value"]  # a family of one
    assert {"a", "b", "mean_diff", "p_value", "test", "effect_size", "n"} <= c.keys()
