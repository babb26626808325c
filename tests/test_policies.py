"""Scheduling policies on scripted observation streams, without Ray."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from clpd_ray.errors import PolicyError
from clpd_ray.policies import (
    BUILTIN_POLICIES,
    AdaptivePolicy,
    ClpdPolicy,
    DataOnlyPolicy,
    Decision,
    Observation,
    ProbeResult,
    RandomCurriculumPolicy,
    SchedulerPolicy,
    StandardKDPolicy,
    TeacherOnlyPolicy,
    check_decision,
    resolve_policy,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


# -- helpers ----------------------------------------------------------------------------------


def make_obs(
    step: int,
    *,
    total: int = 90,
    stages: int = 3,
    teachers: int = 3,
    stage: int = 0,
    teacher: int = 0,
    steps_in_stage: int = 0,
    probes: tuple[ProbeResult, ...] = (),
    probe_step: int | None = None,
    teacher_accuracy: tuple[tuple[float, ...], ...] = (),
) -> Observation:
    return Observation(
        step=step,
        total_steps=total,
        stage=stage,
        num_stages=stages,
        teacher=teacher,
        num_teachers=teachers,
        steps_in_stage=steps_in_stage,
        probes=probes,
        probe_step=probe_step,
        teacher_accuracy=teacher_accuracy,
    )


def bound(policy: SchedulerPolicy, *, stages: int = 3, teachers: int = 3, total: int = 90):
    policy.bind(num_stages=stages, num_teachers=teachers, total_steps=total)
    return policy


def run_fixed(policy: SchedulerPolicy, *, stages=3, teachers=3, total=90) -> list[Decision]:
    bound(policy, stages=stages, teachers=teachers, total=total)
    return [
        policy.decide(make_obs(s, total=total, stages=stages, teachers=teachers))
        for s in range(total)
    ]


def change_steps(decisions: list[Decision], attr: str = "stage") -> list[int]:
    return [
        s
        for s in range(1, len(decisions))
        if getattr(decisions[s], attr) != getattr(decisions[s - 1], attr)
    ]


# A probe curve: (stage probed, current stage, current teacher, steps in current stage) -> value.
Curve = Callable[[int, int, int, int], float]


def simulate(
    policy: SchedulerPolicy,
    *,
    total: int = 150,
    stages: int = 3,
    teachers: int = 3,
    loss: Curve | None = None,
    accuracy: Curve | None = None,
    kl: Callable[[int, int, int, int], tuple[float, ...]] | None = None,
    teacher_accuracy: tuple[tuple[float, ...], ...] = (),
    probe_every: int = 5,
    states_at: tuple[int, ...] = (),
) -> tuple[list[Observation], list[Decision], dict[int, dict]]:
    """A controller stand-in: it follows each decision and probes every `probe_every` steps."""
    policy.bind(num_stages=stages, num_teachers=teachers, total_steps=total)
    stage = teacher = stage_start = 0
    probes: tuple[ProbeResult, ...] = ()
    probe_step = None
    observations, decisions, states = [], [], {}
    for step in range(total):
        if loss is not None and step % probe_every == 0:
            n = step - stage_start
            probes = tuple(
                ProbeResult(
                    stage=k,
                    loss=loss(k, stage, teacher, n),
                    accuracy=accuracy(k, stage, teacher, n) if accuracy else 0.0,
                    kl_to_teacher=kl(k, stage, teacher, n) if kl else (),
                )
                for k in range(stages)
            )
            probe_step = step
        obs = make_obs(
            step,
            total=total,
            stages=stages,
            teachers=teachers,
            stage=stage,
            teacher=teacher,
            steps_in_stage=step - stage_start,
            probes=probes,
            probe_step=probe_step,
            teacher_accuracy=teacher_accuracy,
        )
        if step in states_at:
            states[step] = json.loads(json.dumps(policy.state_dict()))
        decision = check_decision(policy.name, policy.decide(obs), stages, teachers)
        if decision.stage != stage:
            stage_start = step
        stage, teacher = decision.stage, decision.teacher
        observations.append(obs)
        decisions.append(decision)
    return observations, decisions, states


def flat_loss(k: int, stage: int, teacher: int, n: int) -> float:
    return 1.0


def improving_loss(k: int, stage: int, teacher: int, n: int) -> float:
    return 2.0 * 0.8 ** (n / 5) if k == stage else 2.0


def loss_flattening_after(m: int) -> Curve:
    """The current stage's loss drops 10% per probe for m steps, then stays put."""
    return lambda k, stage, teacher, n: 2.0 * 0.9 ** (min(n, m) / 5) if k == stage else 2.0


# -- the interface ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls", "curriculum"),
    [
        ("standard_kd", StandardKDPolicy, "none"),
        ("data_only", DataOnlyPolicy, "difficulty"),
        ("teacher_only", TeacherOnlyPolicy, "none"),
        ("clpd", ClpdPolicy, "difficulty"),
        ("random_curriculum", RandomCurriculumPolicy, "random"),
        ("adaptive", AdaptivePolicy, "difficulty"),
    ],
)
def test_builtin_names_and_curricula(name, cls, curriculum):
    assert BUILTIN_POLICIES[name] is cls
    assert cls.name == name
    assert cls.curriculum == curriculum


def test_subclass_gets_its_own_name_and_bad_curriculum_fails_at_definition():
    class MyClpd(ClpdPolicy):
        pass

    assert MyClpd.name == "MyClpd"
    with pytest.raises(PolicyError, match="curriculum='sorted'"):

        class Bad(ClpdPolicy):
            curriculum = "sorted"  # type: ignore[assignment]


@pytest.mark.parametrize("name", sorted(BUILTIN_POLICIES))
def test_every_builtin_gives_valid_decisions_with_reasons(name):
    decisions = run_fixed(resolve_policy(name))
    for d in decisions:
        assert check_decision(name, d, 3, 3) == d
        assert d.reason.strip()


@pytest.mark.parametrize("name", sorted(BUILTIN_POLICIES))
def test_decide_before_bind_raises(name):
    with pytest.raises(PolicyError, match="before bind"):
        resolve_policy(name).decide(make_obs(0))


def test_observation_geometry_must_match_bind():
    policy = bound(ClpdPolicy())
    with pytest.raises(PolicyError, match="bound to 3 stages and 3 teachers"):
        policy.decide(make_obs(0, stages=2, teachers=2))


@pytest.mark.parametrize("key", ["num_stages", "num_teachers", "total_steps"])
@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bind_rejects_bad_geometry(key, bad):
    geometry = {"num_stages": 3, "num_teachers": 3, "total_steps": 90, key: bad}
    with pytest.raises(PolicyError, match=key):
        StandardKDPolicy().bind(**geometry)


def test_stateless_state_dict():
    policy = bound(ClpdPolicy())
    assert json.loads(json.dumps(policy.state_dict())) == {}
    policy.load_state_dict({})
    with pytest.raises(PolicyError, match=r"stateless.*'stage'"):
        policy.load_state_dict({"stage": 1})
    with pytest.raises(PolicyError, match="needs a dict"):
        policy.load_state_dict([])  # type: ignore[arg-type]


# -- fixed schedules ------------------------------------------------------------------------


def test_clpd_switches_at_equal_budgets():
    decisions = run_fixed(ClpdPolicy())
    assert change_steps(decisions) == [30, 60]
    assert [d.stage for d in decisions] == [0] * 30 + [1] * 30 + [2] * 30
    assert all(d.teacher == d.stage for d in decisions)
    assert decisions[30].reason.startswith("step 30 reached stage-1 boundary (equal budgets of 30")
    assert "stage 0 of 3" in decisions[5].reason


def test_clpd_uneven_budgets_match_the_formula():
    decisions = run_fixed(ClpdPolicy(), total=100)
    assert [d.stage for d in decisions] == [min(2, s * 3 // 100) for s in range(100)]


def test_clpd_given_boundaries():
    decisions = run_fixed(ClpdPolicy(boundaries=[10, 50]))
    assert change_steps(decisions) == [10, 50]
    assert change_steps(decisions, "teacher") == [10, 50]
    assert "boundaries [10, 50]" in decisions[10].reason


@pytest.mark.parametrize(
    ("boundaries", "match"),
    [
        ([50, 10], "strictly increasing"),
        ([0, 10], "integer step >= 1"),
        ([10.5, 20], "integer step >= 1"),
        ("10,20", "list of step numbers"),
    ],
)
def test_boundaries_rejected_at_construction(boundaries, match):
    with pytest.raises(PolicyError, match=match):
        ClpdPolicy(boundaries=boundaries)


@pytest.mark.parametrize(
    ("boundaries", "match"), [([10], "needs 2"), ([10, 90], "not before total_steps=90")]
)
def test_boundaries_rejected_at_bind(boundaries, match):
    with pytest.raises(PolicyError, match=match):
        bound(ClpdPolicy(boundaries=boundaries))


def test_fewer_steps_than_stages_rejected():
    with pytest.raises(PolicyError, match="total_steps=2 is fewer than num_stages=3"):
        bound(ClpdPolicy(), total=2)


def test_data_only_keeps_the_strongest_teacher():
    decisions = run_fixed(DataOnlyPolicy(), stages=4, teachers=2, total=80)
    assert change_steps(decisions) == [20, 40, 60]
    assert {d.teacher for d in decisions} == {1}
    assert "strongest teacher 1" in decisions[0].reason


def test_teacher_only_follows_the_clock_on_all_data():
    decisions = run_fixed(TeacherOnlyPolicy())
    assert change_steps(decisions, "teacher") == [30, 60]
    assert "batches from all data" in decisions[0].reason


def test_standard_kd_never_changes():
    decisions = run_fixed(StandardKDPolicy(), stages=4, teachers=3)
    assert {(d.stage, d.teacher, d.replay, d.teacher_mix) for d in decisions} == {
        (0, 2, None, None)
    }


@pytest.mark.parametrize("teacher", [0, 1, 2])
def test_standard_kd_teacher_kwarg_fixes_the_teacher(teacher):
    policy = resolve_policy("standard_kd", {"teacher": teacher})
    decisions = run_fixed(policy, stages=3, teachers=3)
    assert {(d.stage, d.teacher) for d in decisions} == {(0, teacher)}
    which = "strongest teacher" if teacher == 2 else "fixed teacher"
    assert f"{which} {teacher}" in decisions[0].reason
    # None is the default: the strongest, whatever the ladder's length.
    assert {d.teacher for d in run_fixed(StandardKDPolicy(teacher=None), teachers=4)} == {3}


@pytest.mark.parametrize("bad", [-1, 1.0, True, "t0"])
def test_standard_kd_rejects_a_bad_teacher_at_construction(bad):
    with pytest.raises(PolicyError, match=rf"teacher={bad!r} must be a ladder index"):
        resolve_policy("standard_kd", {"teacher": bad})


def test_standard_kd_rejects_a_teacher_outside_the_ladder_at_bind():
    with pytest.raises(PolicyError, match=r"teacher=3 is out of range for a ladder of 3"):
        bound(StandardKDPolicy(teacher=3))


def test_random_curriculum_has_clpds_pacing():
    clpd = run_fixed(ClpdPolicy(boundaries=[20, 45]))
    rand = run_fixed(RandomCurriculumPolicy(boundaries=[20, 45]))
    assert [(d.stage, d.teacher) for d in rand] == [(d.stage, d.teacher) for d in clpd]
    assert "random" in rand[0].reason


@pytest.mark.parametrize("cls", [ClpdPolicy, TeacherOnlyPolicy, RandomCurriculumPolicy])
def test_ladder_policies_need_one_teacher_per_stage(cls):
    with pytest.raises(PolicyError) as info:
        bound(cls(), stages=3, teachers=2)
    message = str(info.value)
    for text in (repr(cls.name), "num_stages=3", "num_teachers=2", "curriculum.num_stages=2"):
        assert text in message


# -- adaptive -------------------------------------------------------------------------------


def test_adaptive_advances_on_a_plateau():
    policy = AdaptivePolicy(min_steps_per_stage=10, max_steps_per_stage=100, climb=0)
    _, decisions, _ = simulate(policy, loss=loss_flattening_after(20))
    # Flat from n=20: probes at n=25 and n=30 are the 2 flat ones.
    assert change_steps(decisions) == [30, 60]
    reason = decisions[30].reason
    assert reason.startswith("probe loss plateaued: 1.31 -> 1.31 (<1% for 2 probes) after 30 steps")
    assert reason.endswith("now stage 1, teacher 1")
    assert decisions[-1].stage == 2


def test_adaptive_never_advances_before_its_minimum():
    policy = AdaptivePolicy(min_steps_per_stage=23, max_steps_per_stage=100, climb=0)
    _, decisions, _ = simulate(policy, loss=flat_loss)
    assert change_steps(decisions) == [23, 46]
    assert "below the minimum" in decisions[22].reason
    assert "plateaued" in decisions[23].reason


def test_adaptive_always_advances_at_its_maximum():
    policy = AdaptivePolicy(min_steps_per_stage=10, max_steps_per_stage=40)
    _, decisions, _ = simulate(policy, loss=improving_loss)
    assert change_steps(decisions) == [40, 80]
    assert decisions[40].reason.startswith("stage 0 reached its maximum of 40 steps")
    assert "last stage" in decisions[-1].reason


def test_adaptive_reaches_the_last_stage_before_the_end():
    # Always improving and no maximum within reach: the deadline forces each advance.
    policy = AdaptivePolicy(min_steps_per_stage=20, max_steps_per_stage=1000)
    _, decisions, _ = simulate(policy, total=90, loss=improving_loss)
    assert change_steps(decisions) == [50, 70]
    assert decisions[50].reason.startswith("40 steps left, just enough for the minimum of 20")
    assert decisions[-1].stage == 2


def test_adaptive_without_probes_follows_the_clock():
    _, decisions, _ = simulate(AdaptivePolicy(), total=90)  # defaults: min 15, max 60
    assert change_steps(decisions) == [30, 60]
    assert "no probe of stage 0 yet: step 30 reached stage-1 boundary" in decisions[30].reason
    assert "following the clock" in decisions[20].reason


def test_adaptive_without_probes_stays_within_max():
    policy = AdaptivePolicy(min_steps_per_stage=10, max_steps_per_stage=20)
    _, decisions, _ = simulate(policy, total=90)
    assert change_steps(decisions) == [20, 40]


def test_adaptive_mastery_gate():
    def accuracy(k, stage, teacher, n):
        return min(1.0, n / 50)  # reaches 0.9 x 0.5 = 0.45 at n = 22.5

    policy = AdaptivePolicy(
        advance_on="mastery", min_steps_per_stage=10, max_steps_per_stage=80, climb=0
    )
    _, decisions, _ = simulate(
        policy,
        loss=flat_loss,
        accuracy=accuracy,
        teacher_accuracy=((0.5, 0.5, 0.5),) * 3,
    )
    assert change_steps(decisions)[:2] == [25, 50]
    assert "mastery: probe accuracy 0.5 >= 0.9 x teacher 0's 0.5" in decisions[25].reason
    assert "plateaued" not in decisions[25].reason


def test_adaptive_both_needs_plateau_and_mastery():
    policy = AdaptivePolicy(advance_on="both", min_steps_per_stage=10, max_steps_per_stage=35)
    _, decisions, _ = simulate(  # plateaus, but never masters: only the maximum advances
        policy, loss=flat_loss, accuracy=flat_loss, teacher_accuracy=((2.0,) * 3,) * 3
    )
    assert change_steps(decisions) == [35, 70]


def test_adaptive_counts_each_probe_once():
    policy = bound(AdaptivePolicy(min_steps_per_stage=10, max_steps_per_stage=60, patience=2))
    first = (ProbeResult(0, 1.0, 0.0, ()),)
    policy.decide(make_obs(0, probes=first, probe_step=0))
    second = (ProbeResult(0, 1.0, 0.0, ()),)  # flat, but seen over and over
    for step in range(1, 40):
        decision = policy.decide(make_obs(step, probes=second, probe_step=5))
        assert decision.stage == 0, decision.reason
    assert "1/2 flat probes" in decision.reason


def test_adaptive_replay_after_stage_zero():
    _, decisions, _ = simulate(AdaptivePolicy(), total=90)
    assert {d.replay for d in decisions[:30]} == {0.0}
    assert {d.replay for d in decisions[30:]} == {0.2}
    _, decisions, _ = simulate(AdaptivePolicy(replay=0.5), total=90)
    assert decisions[-1].replay == 0.5


def _kl_flat_for_current(k, stage, teacher, n):
    # KL to the current teacher stops moving; to the others it keeps shrinking.
    return tuple(0.5 if t == teacher else 0.5 * 0.5 ** (n / 5) + 0.1 for t in range(3))


def test_adaptive_climbs_one_rung_when_the_kl_flattens():
    policy = AdaptivePolicy(min_steps_per_stage=30, max_steps_per_stage=30)
    _, decisions, _ = simulate(policy, total=90, loss=improving_loss, kl=_kl_flat_for_current)
    # Stage 0 starts at teacher 0, climbs to 1 (its top with climb=1) after 2 flat probes.
    assert [d.teacher for d in decisions[:10]] == [0] * 10
    assert decisions[10].teacher == 1
    assert decisions[10].reason.startswith(
        "KL to teacher 0 on stage 0 flattened: 0.5 -> 0.5 (<1% for 2 probes); "
        "moving up to teacher 1"
    )
    assert {d.teacher for d in decisions[10:30]} == {1}
    assert {d.teacher for d in decisions[30:40]} == {1}
    assert {d.teacher for d in decisions[60:]} == {2}  # never above the last rung


def test_adaptive_climb_zero_keeps_the_ladder():
    policy = AdaptivePolicy(min_steps_per_stage=30, max_steps_per_stage=30, climb=0)
    _, decisions, _ = simulate(policy, total=90, loss=improving_loss, kl=_kl_flat_for_current)
    assert all(d.teacher == d.stage for d in decisions)


def test_adaptive_soft_switch_mixes_the_next_teacher():
    policy = AdaptivePolicy(mix_next=0.2)
    _, decisions, _ = simulate(policy, total=90)
    assert decisions[0].teacher_mix == (0.8, 0.2, 0.0)
    assert decisions[-1].teacher_mix is None  # no stronger teacher left
    assert "mixing 0.2 of teacher 1" in decisions[0].reason


def test_adaptive_uneven_ladder():
    _, decisions, _ = simulate(AdaptivePolicy(climb=0), total=120, stages=4, teachers=2)
    assert [d.teacher for d in decisions[::30]] == [0, 0, 1, 1]


def test_adaptive_state_round_trip_reproduces_future_decisions():
    kwargs = {"min_steps_per_stage": 10, "max_steps_per_stage": 70}
    curve = loss_flattening_after(25)
    observations, decisions, states = simulate(
        AdaptivePolicy(**kwargs), loss=curve, kl=_kl_flat_for_current, states_at=(17, 48)
    )
    assert len(change_steps(decisions)) >= 2
    for at, state in states.items():
        restored = bound(AdaptivePolicy(**kwargs), total=150)
        restored.load_state_dict(state)
        replayed = [restored.decide(obs) for obs in observations[at:]]
        assert replayed == decisions[at:]


def test_adaptive_rejects_foreign_state():
    policy = bound(AdaptivePolicy())
    with pytest.raises(PolicyError, match="expected keys"):
        policy.load_state_dict({"stage": 0})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"advance_on": "loss"}, "advance_on='loss'"),
        ({"epsilon": 0.0}, r"epsilon=0.0 must be a number in \(0, 1\)"),
        ({"epsilon": 1.5}, "epsilon=1.5"),
        ({"patience": 0}, "patience=0 must be an integer >= 1"),
        ({"patience": 2.5}, "patience=2.5"),
        ({"rho": 0}, "rho=0"),
        ({"rho": 3.0}, r"rho=3.0 must be a number in \(0, 2\]"),
        ({"min_steps_per_stage": 0}, "min_steps_per_stage=0"),
        ({"max_steps_per_stage": -5}, "max_steps_per_stage=-5"),
        ({"min_steps_per_stage": 50, "max_steps_per_stage": 40}, "max >= min"),
        ({"replay": 1.0}, r"replay=1.0 must be a number in \[0, 1\)"),
        ({"replay": "0.2"}, "replay='0.2'"),
        ({"climb": -1}, "climb=-1"),
        ({"kl_epsilon": float("nan")}, "kl_epsilon=nan"),
        ({"mix_next": 1.0}, "mix_next=1.0"),
    ],
)
def test_adaptive_validates_kwargs(kwargs, match):
    with pytest.raises(PolicyError, match=match) as info:
        AdaptivePolicy(**kwargs)
    assert "'adaptive'" in str(info.value)


def test_adaptive_bind_checks_budget():
    with pytest.raises(PolicyError, match="needs 120 steps but total_steps=90"):
        bound(AdaptivePolicy(min_steps_per_stage=40))
    with pytest.raises(PolicyError, match="max_steps_per_stage=10 is below the minimum of 15"):
        bound(AdaptivePolicy(max_steps_per_stage=10))


# -- the example user policy --------------------------------------------------------------


def test_competence_policy_paces_stages(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    policy = resolve_policy("custom_policy:CompetencePolicy", {"c0": 0.1, "ramp": 0.8})
    decisions = run_fixed(policy, total=100)
    stages = [d.stage for d in decisions]
    assert stages[0] == 0 and stages[-1] == 2 and stages == sorted(stages)
    assert all(check_decision(policy.name, d, 3, 3) for d in decisions)
    sys.modules.pop("custom_policy", None)


# -- resolve_policy -----------------------------------------------------------------------


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    yield
    sys.modules.pop("custom_policy", None)


def test_resolve_by_name_with_kwargs():
    policy = resolve_policy("clpd", {"boundaries": [5, 10]})
    assert isinstance(policy, ClpdPolicy)
    assert change_steps(run_fixed(policy)) == [5, 10]
    assert isinstance(resolve_policy("adaptive", {"patience": 3}), AdaptivePolicy)


def test_resolve_import_string(examples_on_path):
    policy = resolve_policy("custom_policy:CompetencePolicy", {"c0": 0.3})
    assert type(policy).__name__ == "CompetencePolicy"
    assert policy.name == "competence" and policy.c0 == 0.3


def test_resolve_class_and_instance():
    assert isinstance(resolve_policy(DataOnlyPolicy), DataOnlyPolicy)
    instance = AdaptivePolicy()
    assert resolve_policy(instance) is instance
    with pytest.raises(PolicyError, match="given as an instance"):
        resolve_policy(instance, {"patience": 3})


def _write_module(tmp_path, monkeypatch, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


class _Abstract(SchedulerPolicy):
    pass


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("cpld", "unknown policy 'cpld'; did you mean 'clpd'"),
        ("nothing_like_it", "built-in name .*standard_kd"),
        ("no_such_module_xyz:Policy", "module 'no_such_module_xyz' not found.*PYTHONPATH"),
        ("json:NoSuchPolicy", "module 'json' has no attribute 'NoSuchPolicy'"),
        ("collections:OrderedDict", "does not subclass clpd_ray.policies.SchedulerPolicy"),
        ("math:pi", "'pi' is a float, not a class"),
        (":Policy", "not of the form 'package.module:ClassName'"),
        ("a:b:c", "not of the form"),
        (42, "is a int"),
        (dict, "does not subclass"),
        (_Abstract, "abstract.*decide"),
    ],
)
def test_resolve_failures(spec, match):
    with pytest.raises(PolicyError, match=match):
        resolve_policy(spec)


def test_resolve_module_with_missing_dependency(tmp_path, monkeypatch):
    _write_module(tmp_path, monkeypatch, "needs_dep", "import not_installed_dep_xyz\n")
    with pytest.raises(PolicyError, match="missing module 'not_installed_dep_xyz'"):
        resolve_policy("needs_dep:Policy")


def test_resolve_module_that_raises(tmp_path, monkeypatch):
    _write_module(tmp_path, monkeypatch, "broken_policy", "raise RuntimeError('boom')\n")
    with pytest.raises(PolicyError, match="raised RuntimeError: boom; fix the module"):
        resolve_policy("broken_policy:Policy")


def test_resolve_lists_policies_when_class_missing(examples_on_path):
    with pytest.raises(PolicyError, match=r"CompetencePolicy"):
        resolve_policy("custom_policy:Competence")


@pytest.mark.parametrize(
    ("spec", "kwargs", "match"),
    [
        ("clpd", {"bogus": 1}, "bad scheduler.kwargs.*bogus.*accepts ClpdPolicy"),
        ("standard_kd", {"x": 1}, "bad scheduler.kwargs"),
        ("adaptive", {"patience": -1}, "patience=-1"),
        ("custom_policy:CompetencePolicy", {"c0": 2.0}, "c0=2.0"),
    ],
)
def test_resolve_bad_kwargs(examples_on_path, spec, kwargs, match):
    with pytest.raises(PolicyError, match=match):
        resolve_policy(spec, kwargs)


def test_resolve_wraps_constructor_type_errors():
    class Fussy(StandardKDPolicy):
        def __init__(self, width: int = 1) -> None:
            if not isinstance(width, int):
                raise TypeError("width must be an int")

    with pytest.raises(PolicyError, match=r"constructing Fussy.*width must be an int"):
        resolve_policy(Fussy, {"width": "wide"})


# -- check_decision -----------------------------------------------------------------------


def test_check_decision_accepts_and_normalises():
    d = Decision(stage=np.int64(1), teacher=2, reason="ok", replay=np.float32(0.25))
    out = check_decision("p", d, 3, 3)
    assert type(out.stage) is int and out.stage == 1
    assert type(out.replay) is float and out.replay == 0.25
    json.dumps(out.__dict__)
    mixed = Decision(0, 0, "mix", teacher_mix=(0.5, 0.5, 0.0))
    assert check_decision("p", mixed, 3, 3) == mixed


@pytest.mark.parametrize(
    ("decision", "match"),
    [
        ((0, 0), "got tuple .*must return clpd_ray.messages.Decision"),
        (None, "got NoneType"),
        (Decision(3, 0, "r"), r"stage=3 is not an int in \[0, 2\]"),
        (Decision(-1, 0, "r"), "stage=-1"),
        (Decision(0, 5, "r"), "teacher=5"),
        (Decision(True, 0, "r"), "stage=True"),
        (Decision(0, 1.0, "r"), "teacher=1.0"),  # type: ignore[arg-type]
        (Decision(0, 0, ""), "non-empty string"),
        (Decision(0, 0, "r", replay=1.0), r"replay=1.0 is not None or a number in \[0, 1\)"),
        (Decision(0, 0, "r", replay=-0.1), "replay=-0.1"),
        (Decision(0, 0, "r", replay=float("nan")), "replay=nan"),
        (Decision(0, 0, "r", teacher_mix=(0.5, 0.5)), "must hold 3 non-negative weights"),
        (Decision(0, 0, "r", teacher_mix=(1.2, -0.2, 0.0)), "non-negative"),
        (Decision(0, 0, "r", teacher_mix=(0.5, 0.4, 0.0)), "sums to 0.9, not 1"),
    ],
)
def test_check_decision_failures(decision, match):
    with pytest.raises(PolicyError, match=match) as info:
        check_decision("mine", decision, 3, 3)
    assert "policy 'mine' returned an invalid decision" in str(info.value)


def test_adaptive_seed_probe_is_not_counted_twice():
    # No probe of stage 0, so the clock switches at step 30, where a probe of stage 1 arrives:
    # it seeds stage 1's baseline and must not also count as that stage's first flat probe.
    policy = bound(AdaptivePolicy(min_steps_per_stage=5, max_steps_per_stage=60, patience=1))
    stage_1 = (ProbeResult(1, 1.0, 0.0, ()),)
    decisions = [policy.decide(make_obs(step)) for step in range(30)]
    decisions += [
        policy.decide(make_obs(step, stage=1, probes=stage_1, probe_step=30))
        for step in range(30, 45)
    ]
    assert change_steps(decisions) == [30]
    assert "0/1 flat probes" in decisions[-1].reason
