"""``clpd ablate`` / ``clpd report``: planning and bad input without Ray, then a 2-arm x 2-seed
ablation end to end (concurrent runs), checked against scipy, resumed, and re-reported."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import TINY_LADDER
from scipy import stats as sps

from clpd_ray.ablation.arms import (
    DEFAULT_ARMS,
    describe_seeds,
    parse_arm,
    parse_arms,
    parse_seeds,
    run_config,
    single_arm_map,
    split_arms,
)
from clpd_ray.ablation.runner import _run_threads, plan_runs, run_ablation
from clpd_ray.cli import main
from clpd_ray.data.task import HELD_OUT_SPLIT
from clpd_ray.errors import ClpdError, ClusterError
from clpd_ray.runtime.capacity import default_parallel, runs_that_fit


def _write(tmp_path: Path, config) -> Path:
    p = tmp_path / "ablate.yaml"
    p.write_text(yaml.safe_dump(config.to_dict()))
    return p


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# -- planning, without Ray ------------------------------------------------------------------


def test_parse_arms_builtins_and_single_teachers(tiny_config):
    config = tiny_config()
    arms = parse_arms(list(DEFAULT_ARMS), config, single_teachers=True)
    names = [a.name for a in arms]
    # standard_kd already distils from the strongest rung, so only the weaker ones are added.
    assert names == [*DEFAULT_ARMS, "single:t0", "single:t1"]
    by = {a.name: a for a in arms}
    assert (by["single:t0"].policy, by["single:t0"].kwargs) == ("standard_kd", {"teacher": 0})
    assert by["standard_kd"].teacher == "t2" and by["clpd"].teacher is None
    assert by["single:t1"].slug == "single_t1"
    alone = parse_arms(["clpd"], config, single_teachers=True)
    assert [a.name for a in alone] == ["clpd", "single:t0", "single:t1", "single:t2"]


def test_config_kwargs_go_only_to_their_own_policy(tiny_config):
    config = tiny_config("scheduler.policy=adaptive", "scheduler.kwargs.patience=7")
    by = {a.name: a for a in parse_arms(["adaptive", "clpd"], config)}
    assert by["adaptive"].kwargs == {"patience": 7} and by["clpd"].kwargs == {}


def test_run_config_sets_seed_and_policy_only(tiny_config):
    base = tiny_config()
    [arm] = parse_arms(["single:t1"], base)
    cfg = run_config(base, arm, 4)
    assert cfg.seed == 4
    assert (cfg.scheduler.policy, cfg.scheduler.kwargs) == ("standard_kd", {"teacher": 1})
    strip = {"seed", "scheduler"}
    assert {k: v for k, v in cfg.to_dict().items() if k not in strip} == {
        k: v for k, v in base.to_dict().items() if k not in strip
    }


def test_plan_is_seed_major_with_one_directory_per_run(tiny_config):
    arms = parse_arms(["clpd", "single:t0"], tiny_config())
    plan = plan_runs(arms, [0, 1])
    assert [(r.arm.name, r.seed, r.rel) for r in plan] == [
        ("clpd", 0, "runs/clpd/seed-0"),
        ("single:t0", 0, "runs/single_t0/seed-0"),
        ("clpd", 1, "runs/clpd/seed-1"),
        ("single:t0", 1, "runs/single_t0/seed-1"),
    ]


def test_single_arm_map():
    ladder = ["t0", "t1", "t2"]
    teachers = {"clpd": None, "standard_kd": "t2", "single:t0": "t0"}
    assert single_arm_map(teachers, ladder) == {"t0": "single:t0", "t2": "standard_kd"}
    assert single_arm_map({"clpd": None, "standard_kd": "t2"}, ladder) == {}


def _fake_summary(accuracy: float) -> dict:
    student = {"accuracy": accuracy, "accuracy_by_difficulty": {"1": accuracy}, "n": 10}
    return {
        "policy": "clpd",
        "steps": 6,
        "wall_s": 1.0,
        "train_wall_s": 0.5,
        "run_id": "x",
        "student": student,
    }


def test_a_failed_run_stops_new_ones_and_keeps_the_finished(tmp_path, tiny_config):
    plan = plan_runs(parse_arms(["clpd"], tiny_config()), [0, 1, 2])
    started = []

    def one(run):
        started.append(run.seed)
        if run.seed == 1:
            raise ClpdError("boom")
        return _fake_summary(0.5)

    finished: dict = {}
    lines: list[str] = []
    errors = _run_threads(plan, one, 1, tmp_path, finished, (0, 3), lines.append)
    assert started == [0, 1]  # seed 2 never starts
    assert [(r.seed, str(e)) for r, e in errors] == [(1, "boom")]
    assert list(finished) == [("clpd", 0)]
    assert [r["seed"] for r in _jsonl(tmp_path / "results.jsonl")] == [0]
    assert lines[0].startswith("[1/3] clpd") and lines[1].startswith("[failed] clpd seed 1")


def test_finished_runs_are_read_not_redone_and_invocations_add_up(tmp_path, tiny_config):
    # Runs finished earlier (as run_distillation leaves them) in an ablation directory: a rerun
    # needs neither Ray nor the workload, and a narrower rerun keeps the other arms' results.
    config = tiny_config()
    out = tmp_path / "abl"
    arms = parse_arms(["clpd", "standard_kd"], config)
    plan = plan_runs(arms, [0, 1])
    for i, run in enumerate(plan):
        run.path(out).mkdir(parents=True)
        (run.path(out) / "summary.json").write_text(json.dumps(_fake_summary(0.1 * i)))
    manifest = {
        "config": config.to_dict(),
        "eval_split": HELD_OUT_SPLIT,
        "runs": [[r.arm.name, r.seed] for r in plan],
    }
    (out / "ablation.json").write_text(json.dumps(manifest))
    mtimes = {r.rel: (r.path(out) / "summary.json").stat().st_mtime_ns for r in plan}

    lines: list[str] = []
    for _ in range(2):
        summary = run_ablation(config, out, arms, [0, 1], log=lines.append)
    assert (
        lines
        == [
            "ablation: 2 arms x 2 seeds (seeds 0-1) = 4 runs; 4 done before, 0 to run -> "
            + str(out)
        ]
        * 2
    )
    rows = _jsonl(out / "results.jsonl")
    assert [(r["arm"], r["seed"], r["accuracy"]) for r in rows] == [
        ("clpd", 0, 0.0),
        ("standard_kd", 0, 0.1),
        ("clpd", 1, 0.2),
        ("standard_kd", 1, pytest.approx(0.3)),
    ]
    assert {r.rel: (r.path(out) / "summary.json").stat().st_mtime_ns for r in plan} == mtimes
    assert summary["arms"]["clpd"]["n"] == 2 and summary["comparisons"][0]["n"] == 2

    # Asking for one arm again keeps the other's results in results.jsonl and the report; where
    # the runs execute (cluster.*) is not part of what must match.
    moved = tiny_config("cluster.num_cpus=2")
    summary = run_ablation(moved, out, arms[:1], [0, 1], log=lines.append)
    assert lines[-1].startswith(
        "ablation: 1 arms x 2 seeds (seeds 0-1) = 2 runs; 2 done before, 0 to run"
    )
    assert len(_jsonl(out / "results.jsonl")) == 4 and list(summary["arms"]) == [
        "clpd",
        "standard_kd",
    ]
    assert json.loads((out / "ablation.json").read_text())["runs"] == manifest["runs"]

    # An ablation made before held-out problems were kept out of training is not extended.
    manifest.pop("eval_split")
    (out / "ablation.json").write_text(json.dumps(manifest))
    with pytest.raises(ClpdError, match="another held-out set"):
        run_ablation(config, out, arms, [0, 1], log=lines.append)


@pytest.mark.parametrize(
    ("names", "needle"),
    [
        (["clpd", "nope"], "unknown arm 'nope'"),
        (["single:t9"], "no teacher 't9'"),
        (["clpd", "clpd"], "more than once"),
        (["clpd", ""], "empty entry"),
    ],
)
def test_parse_arms_rejects_bad_names(tiny_config, names, needle):
    with pytest.raises(ClpdError, match=needle):
        parse_arms(names, tiny_config())


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--arms", "clpd,bogus"], "unknown arm 'bogus'"),
        (["--seeds", "0"], "--seeds 0"),
        (["--parallel", "0"], "--parallel 0"),
        (["--arms", "clpd", "--set", "curriculum.num_stages=2"], "as many stages as teachers"),
    ],
)
def test_bad_ablate_input_exits_2_before_any_run(tmp_path, tiny_config, capsys, argv, needle):
    out = tmp_path / "abl"
    assert main(["ablate", str(_write(tmp_path, tiny_config())), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clpd: error:") and needle in err and "Traceback" not in err
    assert not (out / "runs").exists()


def test_ablate_refuses_a_foreign_directory(tmp_path, tiny_config, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["ablate", str(_write(tmp_path, tiny_config())), "--out", str(out)]) == 2
    assert "not an ablation directory" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_report_of_a_missing_directory_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "none")]) == 2
    assert "results.jsonl does not exist" in capsys.readouterr().err


# -- arm specs: policy + kwargs + overrides; seed lists --------------------------------------


def test_arm_specs_with_kwargs_overrides_and_labels(tiny_config):
    config = tiny_config("train.total_steps=30")
    arm = parse_arm("clpd@boundaries=[10,20]", config)
    assert (arm.name, arm.policy, arm.kwargs) == (
        "clpd@boundaries=[10,20]",
        "clpd",
        {"boundaries": [10, 20]},
    )
    assert arm.overrides == () and arm.slug == "clpd_boundaries_10_20"
    cfg = run_config(config, arm, 3)
    assert (cfg.seed, cfg.scheduler.policy, cfg.scheduler.kwargs) == (
        3,
        "clpd",
        {"boundaries": [10, 20]},
    )

    kd = parse_arm("kd-T2=standard_kd@distill.temperature=2@student.lr=0.001", config)
    assert (kd.name, kd.policy, kd.kwargs, kd.teacher) == ("kd-T2", "standard_kd", {}, "t2")
    assert kd.source == "kd-T2=standard_kd@distill.temperature=2@student.lr=0.001"
    cfg = run_config(config, kd, 0)
    assert (cfg.distill.temperature, cfg.student.lr) == (2.0, 0.001)
    # Everything but the overridden keys, the seed and the policy is the base config's.
    strip = {"seed", "scheduler", "distill", "student"}
    assert {k: v for k, v in cfg.to_dict().items() if k not in strip} == {
        k: v for k, v in config.to_dict().items() if k not in strip
    }

    sft = parse_arm("sft", config)
    assert (sft.policy, sft.kwargs, sft.teacher) == ("standard_kd", {}, None)
    assert run_config(config, sft, 0).distill.objective == "sft"
    assert run_config(config, parse_arm("sft@student.lr=0.01", config), 0).student.lr == 0.01

    one = parse_arm("single:t0@distill.temperature=2", config)
    assert (one.kwargs, one.teacher) == ({"teacher": 0}, "t0")
    arms = parse_arms(split_arms("clpd@boundaries=[10,20],sft,long=clpd@boundaries=[5,25]"), config)
    assert [a.name for a in arms] == ["clpd@boundaries=[10,20]", "sft", "long"]


def test_split_arms_keeps_commas_inside_brackets():
    assert split_arms("a,b@x=[1,2],c@y={p: 1, q: 2}") == ["a", "b@x=[1,2]", "c@y={p: 1, q: 2}"]
    assert split_arms("clpd") == ["clpd"] and split_arms("a,,b") == ["a", "", "b"]


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("clpd@boundaries=oops", "boundaries='oops'"),
        ("clpd@boundaries=[10,40]", "boundaries"),  # past total_steps: caught before any run
        ("clpd@patience=3", "patience"),
        ("clpd@distill.nokey=1", "nokey"),
        ("clpd@distill.temperature=-1", "temperature"),
        ("clpd@task.train_size=10", "cannot differ between arms"),
        ("clpd@seed=3", "seed cannot differ between arms"),
        ("standard_kd@teachers.ladder=[]", "cannot differ between arms"),
        ("sft@teacher=0", "takes no policy kwargs"),
        ("sft@distill.objective=token", "sets distill.objective=sft itself"),
        ("single:t0@teacher=1", "fixes the teacher"),
        ("clpd@boundaries", "is not KEY=VALUE"),
        ("clpd@=3", "is not KEY=VALUE"),
        ("bad label=clpd", "label 'bad label'"),
        ("x=nope@a=1", "unknown arm 'nope'"),
    ],
)
def test_bad_arm_specs_name_the_spec(tiny_config, spec, needle):
    config = tiny_config()
    with pytest.raises(ClpdError, match=needle) as err:
        run_ablation(config, "/nonexistent/never-made", parse_arms([spec], config), [0])
    assert repr(spec) in str(err.value) or spec in str(err.value)


@pytest.mark.parametrize(
    ("text", "seeds"),
    [
        ("3", [0, 1, 2]),
        (3, [0, 1, 2]),
        ("5-9", [5, 6, 7, 8, 9]),
        ("5-5", [5]),
        ("0,2,4", [0, 2, 4]),
        ("0-2,10", [0, 1, 2, 10]),
        ("100-102", [100, 101, 102]),
        (" 7 , 3 ", [7, 3]),
    ],
)
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize(
    ("seeds", "text"),
    [([100], "seed 100"), (list(range(100)), "seeds 0-99"), ([0, 2, 3, 4, 9], "seeds 0,2-4,9")],
)
def test_the_plan_line_names_the_seeds(seeds, text):
    # "--seeds 100" is seeds 0-99, not seed 100: the plan line says which.
    assert describe_seeds(seeds) == text


@pytest.mark.parametrize(
    "text", ["0", "9-5", "a", "1,1", "", "-3", "0-2,2", "1.5", "4294967296-4294967297"]
)
def test_parse_seeds_rejects(text):
    with pytest.raises(ClpdError, match="--seeds"):
        parse_seeds(text)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--arms", "clpd@boundaries=oops"], "arm 'clpd@boundaries=oops'"),
        (["--arms", "clpd@task.eval_size=20"], "arm 'clpd@task.eval_size=20'"),
        (["--seeds", "3-1"], "--seeds '3-1'"),
        (["--seeds", "0,0"], "more than once"),
    ],
)
def test_bad_specs_and_seed_lists_exit_2(tmp_path, tiny_config, capsys, argv, needle):
    out = tmp_path / "abl"
    assert main(["ablate", str(_write(tmp_path, tiny_config())), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clpd: error:") and needle in err and "Traceback" not in err
    assert not out.exists()


def _fake_run(out: Path, run, accuracy: float, curve: list | None, floor: float = 0.2) -> None:
    path = run.path(out)
    path.mkdir(parents=True)
    summary = _fake_summary(accuracy)
    summary["student"].update(full_chain=accuracy / 2, floor=floor, floor_answer="0")
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "metrics.jsonl").write_text("")
    if curve is not None:
        rows = [{"step": s, "accuracy": a, "accuracy_by_difficulty": {}, "n": 10} for s, a in curve]
        (path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_learning_curves_floor_and_full_chain_reach_results_report_and_export(
    tmp_path, tiny_config
):
    config = tiny_config()
    out = tmp_path / "abl"
    arms = parse_arms(["clpd", "early=clpd@boundaries=[5,10]"], config)
    curves = {
        ("clpd", 0): [[2, 0.1], [4, 0.3]],
        ("clpd", 1): [[2, 0.2], [4, 0.2]],
        ("early", 0): [[2, 0.3], [4, 0.4]],
        ("early", 1): None,  # run without train.eval_every: no curve, still a result
    }
    plan = plan_runs(arms, [0, 1])
    final = {("clpd", 0): 0.5, ("clpd", 1): 0.4, ("early", 0): 0.6, ("early", 1): 0.7}
    for run in plan:
        key = (run.arm.name, run.seed)
        _fake_run(out, run, final[key], curves[key])
    manifest = {
        "config": config.to_dict(),
        "eval_split": HELD_OUT_SPLIT,
        "arms": {a.name: a.source for a in arms},
        "runs": [[r.arm.name, r.seed] for r in plan],
    }
    (out / "ablation.json").write_text(json.dumps(manifest))

    summary = run_ablation(config, out, arms, [0, 1], log=lambda _: None)
    rows = {(r["arm"], r["seed"]): r for r in _jsonl(out / "results.jsonl")}
    # The curve is eval.jsonl's rows, then the final evaluation at the run's last step (6).
    assert rows[("clpd", 0)]["curve"] == [[2, 0.1], [4, 0.3], [6, 0.5]]
    assert rows[("early", 0)]["curve"] == [[2, 0.3], [4, 0.4], [6, 0.6]]
    assert "curve" not in rows[("early", 1)]
    assert rows[("clpd", 1)]["floor"] == 0.2 and rows[("clpd", 1)]["full_chain"] == 0.2
    assert summary["floor"] == {"floor": 0.2, "answer": "0"}
    assert summary["arms"]["clpd"]["full_chain"]["mean"] == pytest.approx(0.225)
    lc = summary["learning_curves"]
    assert list(lc) == ["clpd", "early"]
    assert lc["clpd"]["steps"] == [2, 4, 6] and lc["clpd"]["mean"] == pytest.approx(
        [0.15, 0.25, 0.45]
    )
    assert lc["early"]["n"] == [1, 1, 1] and lc["early"]["ci95"] == [None, None, None]
    report = (out / "report.md").read_text()
    assert "## Learning curves" in report and "## Full-chain exact match" in report
    # Mean curves 0.15, 0.25, 0.45 and 0.3, 0.4, 0.6 reach 0.30 at steps 6 and 2.
    assert (lc["clpd"]["reach"]["step"], lc["early"]["reach"]["step"]) == (6, 2)
    assert "| 0.450 | 6 | 2/2 |" in report  # each seed's own curve gets there (steps 4 and 6)
    assert "always answering '0' scores 0.200" in report
    assert (out / "figures" / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"

    # The export carries eval.jsonl, so `clpd report` on it rebuilds the same curves.
    exported = tmp_path / "export"
    assert main(["report", str(out), "--export", str(exported)]) == 0
    assert (exported / "runs/clpd/seed-0/eval.jsonl").is_file()
    assert json.loads((exported / "summary.json").read_text())["learning_curves"] == lc

    # A label keeps its spec: asking for "early" as another arm is refused, naming both.
    other = parse_arms(["early=clpd@boundaries=[3,10]"], config)
    with pytest.raises(ClpdError, match=r"arm 'early' was 'early=clpd@boundaries=\[5,10\]'"):
        run_ablation(config, out, other, [0, 1], log=lambda _: None)
    # ...while the same spec resumes with nothing to run.
    lines: list[str] = []
    run_ablation(config, out, arms[1:], [0, 1], log=lines.append)
    assert "2 done before, 0 to run" in lines[0]


# -- end to end on the shared local Ray cluster ---------------------------------------------


@pytest.mark.ray
def test_default_parallel_follows_the_launchers_bundles(ray_cluster, tiny_config):
    # 2 CPUs, 3 logical GPUs. tiny_config asks for CPU bundles (gpus_per_actor 0):
    # 5 x 0.2 CPU = 1 CPU a run, 2 fit, capped at CPUs // 2 = 1.
    assert (runs_that_fit(tiny_config()), default_parallel(tiny_config())) == (2, 1)
    # Two teachers + student get a logical GPU each: one run at a time.
    two = tiny_config(
        teachers={"ladder": TINY_LADDER[:2]},
        curriculum={"num_stages": 2},
        cluster={"gpus_per_actor": 1},
    )
    assert runs_that_fit(two) == 1
    # Three teachers + student would need 4 GPUs: an error, not a silent CPU fallback.
    with pytest.raises(ClusterError, match="needs 4 GPUs"):
        runs_that_fit(tiny_config("cluster.gpus_per_actor=1"))


QUICK = [
    "--quick",
    "--set",
    "train.total_steps=6",
    "--set",
    "scheduler.probe_every=3",
    "--set",
    "train.log_every=2",
    "--set",
    "train.checkpoint_every=0",
]


def _check_against_scipy(out: Path) -> None:
    """summary.json's means, 95% t-intervals and paired t-test, recomputed by scipy from
    results.jsonl (identical values: the zero-width interval; identical differences: no p-value
    when all zero, else p = 0)."""
    rows = _jsonl(out / "results.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    acc: dict[str, dict[int, float]] = {}
    for r in rows:
        acc.setdefault(r["arm"], {})[r["seed"]] = r["accuracy"]
    assert list(summary["arms"]) == list(acc)
    for arm, by_seed in acc.items():
        x = [by_seed[s] for s in sorted(by_seed)]
        mean, sem = sum(x) / len(x), sps.sem(x)
        ci = [mean, mean] if sem == 0 else list(sps.t.interval(0.95, len(x) - 1, mean, sem))
        got = summary["arms"][arm]
        assert got["n"] == len(x)
        assert got["mean"] == pytest.approx(mean)
        assert got["ci95"] == pytest.approx(ci)
    [other] = [arm for arm in acc if arm != "clpd"]  # the one comparison: clpd vs the other
    seeds = sorted(acc["clpd"])
    xa, xb = [acc["clpd"][s] for s in seeds], [acc[other][s] for s in seeds]
    diff = [u - v for u, v in zip(xa, xb, strict=True)]
    test = sps.ttest_rel(xa, xb)
    if all(d == 0 for d in diff):
        p = None
    else:
        p = 0.0 if math.isinf(test.statistic) else float(test.pvalue)
    [c] = summary["comparisons"]
    assert (c["a"], c["b"], c["n"]) == ("clpd", other, len(seeds))
    assert c["mean_diff"] == pytest.approx(sum(diff) / len(diff))
    assert c["p_value"] == pytest.approx(p)
    assert "ttest_rel" in c["test"] and "effect_size" in c


@pytest.mark.ray
@pytest.mark.slow
def test_ablation_end_to_end_resume_and_report(ray_cluster, tmp_path, tiny_config, capsys, caplog):
    """clpd against sft (no teacher), 2 seeds, in three invocations and a report."""
    # Two rungs for clpd (4 actors a run: actor start-up, not training, is what a run costs
    # here); sft starts only the student and the scheduler. CPU bundles: the session cluster's
    # 3 logical GPUs would place one clpd run at a time.
    caplog.set_level(logging.INFO, logger="clpd_ray")
    config = tiny_config(
        teachers={"ladder": TINY_LADDER[:2]},
        curriculum={"num_stages": 2},
        cluster={"gpus_per_actor": 0},
    )
    out = tmp_path / "abl"
    argv = ["ablate", str(_write(tmp_path, config)), "--arms", "clpd,sft", "--out"]
    argv += [str(out), "--parallel", "2", *QUICK, "--set", "train.eval_every=3"]

    # 1. One seed: two runs at once; n = 1 has no interval and no test, and says so.
    assert main([*argv, "--seeds", "1"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "2 arms x 1 seeds (seed 0) = 2 runs; 0 done before, 2 to run, 2 at a time" in printed
    assert "warning" not in printed  # two runs fit the 2-CPU cluster at once
    assert "[2/2]" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arms"]["clpd"]["ci95"] is None
    assert summary["comparisons"][0]["p_value"] is None
    seed0 = {
        r["run_dir"]: (out / r["run_dir"] / "summary.json").stat().st_mtime_ns
        for r in _jsonl(out / "results.jsonl")
    }

    # 2. Extend to two seeds over a run left half-done (a directory without summary.json):
    #    finished runs are kept as they are, the half-done one is cleared and run again.
    cut = out / "runs/sft/seed-1"
    cut.mkdir(parents=True)
    (cut / "stale.txt").write_text("from an interrupted run")
    assert main([*argv, "--seeds", "2"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "2 arms x 2 seeds (seeds 0-1) = 4 runs; 2 done before, 2 to run" in printed
    assert "[3/4]" in printed and "[4/4]" in printed  # a progress line per finished run
    for rel, mtime in seed0.items():
        assert (out / rel / "summary.json").stat().st_mtime_ns == mtime, rel
    assert not (cut / "stale.txt").exists() and (cut / "summary.json").is_file()

    rows = _jsonl(out / "results.jsonl")
    assert [(r["arm"], r["seed"]) for r in rows] == [
        ("clpd", 0),
        ("sft", 0),
        ("clpd", 1),
        ("sft", 1),
    ]
    for r in rows:
        assert {"accuracy", "accuracy_by_difficulty", "run_dir", "wall_s"} <= r.keys()
        run = out / r["run_dir"]
        assert r["steps"] == 6 and (run / "summary.json").is_file()
        cfg_run = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg_run["seed"] == r["seed"] and cfg_run["scheduler"]["policy"] == r["policy"]
        assert set(r["accuracy_by_difficulty"]) == {"1", "2", "3"}
        # A learning curve (train.eval_every=3) ending at the final accuracy, and the floor.
        assert [s for s, _ in r["curve"]] == [3, 6] and r["curve"][-1][1] == r["accuracy"]
        assert 0 <= r["floor"] <= 1 and r["floor_answer"] is not None and "full_chain" in r
    # One target store for every arm and seed (a run served from a store computes nothing and
    # ends with the same student: test_target_store.py), none of a run's own.
    assert (out / "targets").is_dir() and not list((out / "runs").glob("*/*/targets"))
    for r in rows:
        summary = json.loads((out / r["run_dir"] / "summary.json").read_text())
        if r["arm"] == "sft":  # asks no teacher for anything
            assert "target_store" not in summary
            continue
        counts = summary["target_store"]
        assert sum(c["hits"] + c["misses"] for c in counts.values()) == 6 * 8  # 6 steps x 8 rows
    decisions = _jsonl(out / "runs/clpd/seed-1/decisions.jsonl")
    assert [d["teacher"] for d in decisions] == ["t0", "t1"]
    _check_sft_runs(out, [r for r in rows if r["arm"] == "sft"], caplog)
    _check_against_scipy(out)

    report = (out / "report.md").read_text()
    assert "## Paired comparisons" in report and "runs/clpd/seed-1" in report
    figures = {p.name for p in (out / "figures").iterdir()}
    assert figures == {
        "accuracy.png",
        "accuracy_by_difficulty.png",
        "learning_curves.png",
        "schedule_clpd.png",
        "teachers_by_difficulty.png",
    }
    for name in figures:
        assert (out / "figures" / name).read_bytes()[:4] == b"\x89PNG"

    # 3. Finished: a rerun runs nothing and duplicates no row; another config is refused.
    assert main([*argv, "--seeds", "2"]) == 0
    assert "4 done before, 0 to run" in capsys.readouterr().out
    assert len(_jsonl(out / "results.jsonl")) == 4
    assert main([*argv, "--seeds", "2", "--set", "train.total_steps=7"]) == 2
    assert "different config (differs at train.total_steps)" in capsys.readouterr().err

    # 4. `clpd report` rebuilds summary.json, report.md and figures from the files alone.
    before = json.loads((out / "summary.json").read_text())
    for name in ("summary.json", "report.md"):
        (out / name).unlink()
    shutil.rmtree(out / "figures")
    assert main(["report", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text()) == before
    assert (out / "report.md").is_file() and (out / "figures" / "schedule_clpd.png").is_file()

    # 5. `clpd report --export` copies the report's inputs without weights; the copy reports
    #    the same numbers, rebuilds on its own, and an export never lands on existing files.
    exported = tmp_path / "export"
    assert main(["report", str(out), "--export", str(exported)]) == 0, capsys.readouterr().err
    assert "exported 4 runs" in capsys.readouterr().out
    assert json.loads((exported / "summary.json").read_text()) == before
    kept = {p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()}
    assert "runs/clpd/seed-1/metrics.jsonl" in kept and "runs/clpd/seed-1/config.yaml" in kept
    assert not [p for p in kept if "checkpoints" in p or p.endswith((".safetensors", ".pt"))]
    (exported / "summary.json").unlink()
    assert main(["report", str(exported)]) == 0
    assert json.loads((exported / "summary.json").read_text()) == before
    listing = sorted(kept)
    assert main(["report", str(out), "--export", str(exported)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (
        sorted(p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file())
        == listing
    )

    # The scipy check again with non-degenerate numbers: a few-step student scores ~0
    # everywhere, so give results.jsonl hand-made accuracies and let `clpd report` recompute.
    made = {("clpd", 0): 0.5, ("clpd", 1): 0.7, ("sft", 0): 0.4, ("sft", 1): 0.45}
    edited = [{**r, "accuracy": made[(r["arm"], r["seed"])]} for r in rows]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in edited))
    assert main(["report", str(out)]) == 0
    _check_against_scipy(out)
    assert json.loads((out / "summary.json").read_text())["comparisons"][0]["p_value"] > 0


def _check_sft_runs(out: Path, rows: list[dict], caplog) -> None:
    """The sft arm trained without a teacher: no teacher term in its loss, and no teacher placed
    or started (the run header lists every actor a run started)."""
    for row in rows:
        assert (row["policy"], row["teacher"]) == ("standard_kd", None)
        run = out / row["run_dir"]
        assert yaml.safe_load((run / "config.yaml").read_text())["distill"]["objective"] == "sft"
        metrics = _jsonl(run / "metrics.jsonl")
        assert metrics and all(m["kd_loss"] == 0.0 for m in metrics)
        assert all(m["ce_loss"] == pytest.approx(m["loss"]) and m["ce_loss"] > 0 for m in metrics)
        [header] = [
            r.getMessage()
            for r in caplog.records
            if r.getMessage().startswith(f"clpd run {row['run_id']} ")
        ]
        assert "no teacher actors (distill.objective is sft)" in header
        actors = [line.split()[0] for line in header.splitlines()[3:]]
        assert [a.split("-")[0] for a in actors] == ["student", "scheduler"], actors
