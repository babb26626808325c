"""The planner's step arithmetic, without Ray: decision lag, probes, metrics windows, checkpoints.

These replace the Ray end-to-end checks of the same logic: each test runs in milliseconds.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from clpd_ray.config import apply_overrides, config_from_dict
from clpd_ray.curriculum.difficulty import step_scores
from clpd_ray.data.task import generate_examples
from clpd_ray.data.tokenizer import build_char_tokenizer
from clpd_ray.messages import Decision, ProbeResult, StepResult
from clpd_ray.policies import BUILTIN_POLICIES, resolve_policy
from clpd_ray.runtime.planner import Planner, probe_sets
from clpd_ray.workload import Workload

TOTAL = 40


def _config(*overrides: str):
    raw = {
        "seed": 0,
        "task": {"max_difficulty": 3, "train_size": 120, "eval_size": 12},
        "teachers": {
            "ladder": [
                {"name": "t0", "n_layer": 1, "n_embd": 8, "n_head": 2},
                {"name": "t1", "n_layer": 1, "n_embd": 8, "n_head": 2},
                {"name": "t2", "n_layer": 1, "n_embd": 8, "n_head": 2},
            ]
        },
        "curriculum": {"num_stages": 3},
        "scheduler": {"policy": "clpd", "probe_every": 10, "probe_size": 4},
        "train": {
            "total_steps": TOTAL,
            "batch_size": 4,
            "log_every": 5,
            "checkpoint_every": 15,
            "prefetch": 3,
        },
    }
    return config_from_dict(apply_overrides(raw, list(overrides)), "planner test config")


@pytest.fixture(scope="module")
def workload() -> Workload:
    train = generate_examples(120, 3, 0, "train")
    probe = generate_examples(30, 3, 0, "probe")
    return Workload(
        tokenizer=build_char_tokenizer(),
        tokenizer_dir=Path("unused"),
        train=train,
        scores=step_scores(train),
        eval=generate_examples(12, 3, 0, "eval"),
        probe_pool=probe,
        probe_scores=step_scores(probe),
        ladder=[],
        max_new_tokens=16,
    )


def _planner(workload, policy_name="clpd", *overrides: str) -> tuple[Planner, object]:
    config = _config(f"scheduler.policy={policy_name}", *overrides)
    policy = resolve_policy(policy_name, None)
    policy.bind(num_stages=3, num_teachers=3, total_steps=config.train.total_steps)
    planner = Planner(
        config,
        workload,
        policy_name=policy.name,
        curriculum=policy.curriculum,
        reads_probes=policy.reads_probes,
    )
    planner.start_clock(0.0)
    return planner, policy


def _result(step: int) -> StepResult:
    """A deterministic fake step result whose loss encodes its step."""
    return StepResult(
        step, loss=10.0 - step / 10, kd_loss=1.0, ce_loss=0.0, lr=1e-3, tokens=7, busy_s=0.1
    )


def _probe(step: int) -> tuple[ProbeResult, ...]:
    return tuple(
        ProbeResult(s, loss=1.0 / step, accuracy=0.1, kl_to_teacher=(0.5,) * 3) for s in range(3)
    )


def _drive(planner, policy, start: int, stop: int, *, lag_results: bool = True):
    """Run the planner like the executor does, in process: plan D ahead, record results late."""
    plans, rows = [], []
    for j in range(start, stop):
        steps, probe = planner.missing(j)
        for i in steps:
            rows += planner.record(_result(i), now=float(i))
        if probe is not None:
            planner.record_probe(probe, _probe(probe))
        before = policy.state_dict()
        decision = policy.decide(planner.observation(j))
        plans.append(planner.plan(j, decision, before))
        if not lag_results:
            rows += planner.record(_result(j), now=float(j))
    return plans, rows


def test_observation_sees_only_results_at_least_prefetch_plus_one_steps_old(workload):
    planner, _ = _planner(workload)
    D = planner.D
    j = 20
    with pytest.raises(RuntimeError, match="needs steps"):
        planner.observation(j)
    for i in range(j - D - 1 + 1):
        planner.record(_result(i), now=0.0)
    obs = planner.observation(j)
    assert obs.loss_history == tuple(_result(i).loss for i in range(j - D - 1 + 1))
    # Results that arrived early (a fast student) change nothing: the lag is by step number.
    for i in range(j - D, j + 5):
        planner.record(_result(i), now=0.0)
    assert planner.observation(j) == obs
    assert obs.recent_loss == pytest.approx(np.mean([_result(i).loss for i in range(12, 17)]))


def test_fixed_policies_take_no_probes_and_probe_readers_see_lagged_ones(workload):
    fixed, policy = _planner(workload, "clpd")
    plans, _ = _drive(fixed, policy, 0, TOTAL)
    assert not any(p.probe_after for p in plans)
    assert all(fixed.observation(j).probes == () for j in range(TOTAL - fixed.D))

    adaptive, policy = _planner(workload, "adaptive")
    plans, _ = _drive(adaptive, policy, 0, TOTAL)
    # Probes after steps 9, 19, 29 (done = 10, 20, 30), none after the last step.
    assert [p.step + 1 for p in plans if p.probe_after] == [10, 20, 30]
    lag = adaptive.probe_lag
    assert lag == max(adaptive.D + 1, 10 // 2)
    for j in range(TOTAL):
        p = adaptive.probe_step_visible(j)
        expect = (j - lag) // 10 * 10
        assert p == (expect if expect >= 10 else None)
        assert p is None or j - p >= lag


def test_metrics_rows_cover_every_step_and_carry_the_stage_of_their_steps(workload):
    planner, policy = _planner(workload)
    plans, rows = _drive(planner, policy, 0, TOTAL)
    for i in range(TOTAL - planner.D - 1, TOTAL):  # the tail the loop had not recorded yet
        rows += planner.record(_result(i), now=float(i))
    assert [r["step"] for r in rows] == list(range(5, TOTAL + 1, 5))
    stage_of = {p.step: p.decision.stage for p in plans}
    for r in rows:
        lo = r["step"] - 5
        assert r["loss"] == pytest.approx(np.mean([_result(i).loss for i in range(lo, r["step"])]))
        assert r["stage"] == stage_of[r["step"] - 1]  # not the decision D steps ahead
        assert r["student_busy_s"] == pytest.approx(0.5)
    # CLPD's equal budgets for 40 steps and 3 stages switch at 14 and 27 (stage clock).
    switches = [p.step for p in plans if p.decision_row is not None]
    assert [rows[i]["stage"] for i in range(len(rows))] == [stage_of[r["step"] - 1] for r in rows]
    assert switches[0] == 0 and len(switches) == 3


def test_results_recorded_out_of_order_give_the_same_rows(workload):
    a, _ = _planner(workload)
    b, _ = _planner(workload)
    order = list(range(12))
    rows_a = [r for i in order for r in a.record(_result(i), now=1.0)]
    rows_b = [r for i in reversed(order) for r in b.record(_result(i), now=1.0)]
    assert rows_a == rows_b
    assert [r["step"] for r in rows_a] == [5, 10]


def test_decision_rows_and_releases_only_when_something_changes(workload):
    planner, policy = _planner(workload, "clpd", "teachers.resident=needed")
    plans, _ = _drive(planner, policy, 0, TOTAL)
    changed = [p for p in plans if p.decision_row is not None]
    assert [p.decision.teacher for p in changed] == [0, 1, 2]
    assert [p.release for p in changed] == [(), (0,), (0, 1)]
    assert all(p.release == () for p in plans if p.decision_row is None)
    row = changed[1].decision_row
    assert row["teacher"] == "t1" and row["policy"] == "clpd" and row["step"] == changed[1].step


def test_checkpoint_and_eval_flags(workload):
    planner, policy = _planner(workload, "clpd", "train.eval_every=20")
    plans, _ = _drive(planner, policy, 0, TOTAL)
    assert [p.step + 1 for p in plans if p.checkpoint_after] == [15, 30]
    assert [p.step + 1 for p in plans if p.eval_after] == [20]


@pytest.mark.parametrize("policy_name", ["clpd", "adaptive", "standard_kd"])
@pytest.mark.parametrize("n", [15, 30])
def test_checkpoint_round_trip_continues_exactly(workload, policy_name, n):
    """A planner restored from state_dict(n) (through JSON) plans steps n.. exactly like the
    one that never stopped: same decisions, batches, flags and metrics rows."""
    planner, policy = _planner(workload, policy_name)
    first, _ = _drive(planner, policy, 0, n + planner.D)  # planned D ahead, like the executor
    for i in range(n):
        planner.record(_result(i), now=float(i))
    for p in planner.probes_for_checkpoint(n):
        assert p in planner.probes
    state = json.loads(json.dumps(planner.state_dict(n)))
    rest, rows = _drive(planner, policy, n + planner.D, TOTAL)

    again, policy2 = _planner(workload, policy_name)
    assert again.load_state_dict(state) == n
    policy2.load_state_dict(state["policy"])
    for p in state["pending_probes"]:
        again.record_probe(p, _probe(p))
    replay, _ = _drive(again, policy2, n, TOTAL)
    original = first[n:] + rest
    assert len(replay) == len(original)
    for x, y in zip(original, replay, strict=True):
        assert (x.step, x.decision, x.teachers, x.weights, x.probe_after, x.checkpoint_after) == (
            y.step,
            y.decision,
            y.teachers,
            y.weights,
            y.probe_after,
            y.checkpoint_after,
        )
        np.testing.assert_array_equal(x.batch.example_ids, y.batch.example_ids)
        np.testing.assert_array_equal(x.batch.input_ids, y.batch.input_ids)
    # Decision rows of steps >= n are made again (rewind drops them from the run directory).
    assert [p.decision_row for p in replay if p.decision_row] == [
        p.decision_row for p in original if p.decision_row
    ]
    # And the metrics rows after the restore equal those of the run that never stopped.
    tail_a = [r for i in range(n, TOTAL) for r in planner.record(_result(i), now=0.0)]
    tail_b = [r for i in range(n, TOTAL) for r in again.record(_result(i), now=0.0)]
    strip = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in tail_a]
    assert strip == [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in tail_b]
    assert rows == [] or all(r["step"] <= TOTAL for r in rows)


def test_state_of_an_unplanned_step_needs_the_policy_state(workload):
    planner, _ = _planner(workload, "clpd", "train.prefetch=1")
    with pytest.raises(ValueError, match="pass the current policy_state"):
        planner.state_dict(0)
    state = planner.state_dict(0, {})
    assert state["step"] == 0 and state["results"] == [] and state["current"] is None


def test_a_checkpoint_of_another_policy_or_version_is_refused(workload):
    from clpd_ray.errors import RunDirError

    planner, _ = _planner(workload, "clpd")
    state = planner.state_dict(0, {})
    with pytest.raises(RunDirError, match="written by policy 'clpd'"):
        _planner(workload, "data_only")[0].load_state_dict(state)
    with pytest.raises(RunDirError, match="format version"):
        planner.load_state_dict({**state, "version": 99})
    broken = {**state, "step": 3}
    with pytest.raises(RunDirError, match="do not reach step 3"):
        planner.load_state_dict(broken)


def test_probe_sets_follow_the_stages(workload):
    planner, _ = _planner(workload, "adaptive")
    sets = probe_sets(planner, seed=0, size=4)
    assert len(sets) == 3 and all(0 < len(s) <= 4 for s in sets)
    # Difficulty stages: each probe set is drawn from problems of its stage's difficulty.
    assert [sorted({e.steps for e in s}) for s in sets] == [[1], [2], [3]]


def test_mixture_decisions_ask_every_weighted_teacher(workload):
    planner, _ = _planner(workload, "clpd")
    d = Decision(stage=0, teacher=1, reason="mix", teacher_mix=(0.25, 0.0, 0.75))
    plan = planner.plan(0, d, {})
    assert plan.teachers == (0, 2) and plan.weights == (0.25, 0.75)
    plan = planner.plan(1, replace(d, teacher_mix=None), {})
    assert plan.teachers == (1,) and plan.weights is None


@pytest.mark.parametrize("policy_name", sorted(BUILTIN_POLICIES))
def test_every_builtin_policy_plans_a_whole_run(workload, policy_name):
    """Every built-in policy, through the planner as the executor runs it (the Ray pipeline
    itself is covered once, with the adaptive policy, in tests/test_cli.py)."""
    from clpd_ray.policies import check_decision

    planner, policy = _planner(workload, policy_name, "scheduler.probe_every=4")
    plans, _ = _drive(planner, policy, 0, TOTAL)
    for p in plans:
        assert check_decision(policy_name, p.decision, 3, 3) == p.decision
        assert len(p.batch.example_ids) == 4
    assert plans[0].decision_row is not None and plans[0].decision_row["reason"]
    assert any(p.probe_after for p in plans) == policy.reads_probes


def _calls(planner, plans) -> list[list[int]]:
    """The steps of each student call, as the executor groups them (planner.ends_call)."""
    calls, held = [], []
    for p in plans:
        held.append(p.step)
        if planner.ends_call(p, len(held)):
            calls.append(held)
            held = []
    assert not held, "the last step ends a call"
    return calls


@pytest.mark.parametrize("prefetch", [1, 2, 3, 4, 5, 8])
def test_calls_end_where_the_weights_are_read_and_never_starve_the_student(workload, prefetch):
    """Steps are grouped into calls of at most D // 2 steps, each probe / eval / checkpoint step
    ends one, and on a timeline where each step takes one unit and a call's results arrive at
    its end, the driver (planning step j once the results of steps <= j-D-1 are in) sends
    every call while the student still has at least two steps of work queued (D with D = 1)."""
    planner, policy = _planner(
        workload, "adaptive", f"train.prefetch={prefetch}", "train.eval_every=20"
    )
    plans, _ = _drive(planner, policy, 0, TOTAL)
    calls = _calls(planner, plans)
    assert [s for c in calls for s in c] == list(range(TOTAL))
    assert max(len(c) for c in calls) == planner.steps_per_call == max(1, prefetch // 2)
    ends = {c[-1] for c in calls}
    for p in plans:
        if p.probe_after or p.eval_after or p.checkpoint_after:
            assert p.step in ends
    assert any(p.probe_after for p in plans) and any(p.eval_after for p in plans)

    result_at: dict[int, int] = {}  # step -> time its result reaches the driver
    busy_until = 0  # the student's clock
    for call in calls:
        needed = [s - prefetch - 1 for s in call if s - prefetch - 1 >= 0]
        sent = max((result_at[s] for s in needed), default=0)
        if sent > 0:
            queued = busy_until - sent
            assert queued >= min(2, prefetch), f"call {call} sent with {queued} steps queued"
        busy_until = max(busy_until, sent) + len(call)
        for s in call:
            result_at[s] = busy_until
    assert busy_until == TOTAL  # the student never waited
