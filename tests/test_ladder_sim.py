"""benchmarks/ladder_sim.py (simulated time) against closed forms of its cost model."""

from __future__ import annotations

import importlib.util
import sys
from argparse import Namespace
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "ladder_sim.py"


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("ladder_sim", PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ladder_sim"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("ladder_sim", None)


def _args(**kw) -> Namespace:
    base = {
        "steps": 90, "batch": 8, "prefetch": 2, "examples": 300, "tokens": 100, "tflops": 1.0,
        "mfu": 1.0, "row_mfu": 1.0, "replicas7b": 2, "work_ahead": True,
    }  # fmt: skip
    return Namespace(**{**base, **kw})


def test_just_in_time_costs_the_slower_of_student_and_teacher_each_step(sim):
    args = _args()
    r = sim.simulate(args, "clpd", "just-in-time")
    student = 6 * sim.STUDENT * args.batch * args.tokens / 1e12
    per_stage = [
        max(student, 2 * p * args.tokens * args.batch / 1e12) for p in sim.TEACHERS.values()
    ]
    expected = sum((hi - lo + 1) * per_stage[int(s)] for s, (lo, hi) in r["stages"].items())
    # Pipeline fill and stage switches cost at most a few steps of the slowest actor.
    assert abs(r["wall_s"] - expected) <= (args.prefetch + 2) * max(per_stage)
    assert r["computed"] == [30 * args.batch] * 3  # every example of every batch, every time
    assert r["ratio"] == pytest.approx(r["wall_s"] / (args.steps * student))


@pytest.mark.parametrize("policy", ["clpd", "adaptive"])
def test_store_computes_each_example_once_and_work_ahead_never_slows_the_run(sim, policy):
    jit = sim.simulate(_args(), policy, "just-in-time")
    store = sim.simulate(_args(work_ahead=False), policy, "store")
    ahead = sim.simulate(_args(), policy, "store + work-ahead")
    replicas = sim.simulate(_args(), policy, "replicas")
    for r in (store, ahead, replicas):
        assert all(c <= 300 for c in r["computed"])  # at most the training set, per teacher
        assert r["ratio"] >= 1.0 - 1e-9  # never faster than the student's own compute
    assert store["wall_s"] <= jit["wall_s"] + 1e-9
    assert ahead["wall_s"] <= store["wall_s"] + 1e-9
    assert replicas["wall_s"] <= ahead["wall_s"] + 1e-9
    assert replicas["teacher_util"][2] < ahead["teacher_util"][2]  # 2 GPUs share the 7B's work
