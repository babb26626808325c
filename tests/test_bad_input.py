"""Every bad input to ``clpd run``: exit 2, one message naming the file/key/row and the fix, no
traceback, and nothing written: no new run directory, and an existing run left byte for byte.

Each case runs twice: as a new run (``clpd run CFG --out NEW``) and as a resume of an existing
run whose config.yaml holds the same mistake (``clpd run --resume RUN``), which must fail before
it rewinds anything. docs/reliability.md lists the same cases with the messages users see.
The config-level messages themselves are pinned in test_config.py and test_cli.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from clpd_ray.cli import main
from clpd_ray.config import apply_overrides

BROKEN_POLICY = "raise RuntimeError('this module is broken')\n"
BAD_DECISION_POLICY = """
from clpd_ray.policies import Decision, SchedulerPolicy


class BadAt12(SchedulerPolicy):
    name = "bad_at_12"

    def decide(self, obs):
        if obs.step >= {step}:
            return Decision(stage=7, teacher=0, reason="a bug")
        return Decision(stage=0, teacher=0, reason="warm-up on stage 0")
"""


RAISING_POLICY = """from clpd_ray.policies import SchedulerPolicy


class Raises(SchedulerPolicy):
    name = "raises"

    def decide(self, obs):
        return 1 / 0
"""


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _existing_run(path: Path, config_text: str) -> Path:
    """A run stopped at step 7 with a checkpoint at 5: what a resume would rewind, if it ran."""
    ckpt = path / "checkpoints" / "step-0000005"
    ckpt.mkdir(parents=True)
    (path / "checkpoints" / ".step-0000010.tmp").mkdir()
    (path / "config.yaml").write_text(config_text)
    (path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (5, 7)))
    (path / "decisions.jsonl").write_text(json.dumps({"step": 0, "stage": 0}) + "\n")
    for name in ("student.safetensors", "student_optim.pt", "student.json"):
        (ckpt / name).write_bytes(b"kept as is")
    (ckpt / "controller.json").write_text(json.dumps({"step": 5}))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Bad datasets, model directories and a broken policy module (written once)."""
    from clpd_ray.config import ModelSpec
    from clpd_ray.data.tokenizer import build_char_tokenizer
    from clpd_ray.distill.models import build_model

    root = tmp_path_factory.mktemp("inputs")
    good = {"question": "What is 2+3?", "answer": "2+3 = 5\n#### 5"}
    rows = [good, good, {"question": "What is 1+1?"}, {"question": "x"}]  # row 2: no answer
    (root / "missing_field.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "empty.jsonl").write_text("")
    no_answer = [{"question": f"q{i}", "answer": "just words"} for i in range(3)]
    (root / "no_answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in no_answer))
    other_tok = build_char_tokenizer("abc")  # not the task's alphabet
    other = build_model(ModelSpec(n_layer=1, n_embd=16, n_head=2), other_tok)
    other.save_pretrained(root / "other_vocab")
    other_tok.save_pretrained(root / "other_vocab")
    (root / "empty_dir").mkdir()
    corrupt = root / "corrupt_weights"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((root / "other_vocab" / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    (root / "broken_policy_mod.py").write_text(BROKEN_POLICY)
    return root


def _ladder_with(path: Path | str) -> str:
    from conftest import TINY_LADDER

    return "teachers.ladder=" + json.dumps([*TINY_LADDER[:2], {"name": "ext", "path": str(path)}])


# id -> (overrides, or raw config text; words the message must contain)
CASES = {
    "unparsable_yaml": ("train: [unclosed\n", ["config.yaml", "not valid YAML", "line 2"]),
    "unknown_key": (["train.total_stepz=5"], ["unknown key 'train.total_stepz'"]),
    "wrong_type": (["train.batch_size=lots"], ["train.batch_size", "'lots'", "integer"]),
    "beta_out_of_range": (["distill.beta=1.5"], ["distill.beta", "1.5", "less than 1"]),
    "alpha_out_of_range": (["distill.alpha=1.0"], ["distill.alpha", "less than 1"]),
    "temperature_out_of_range": (["distill.temperature=0"], ["distill.temperature", "greater"]),
    "steps_out_of_range": (["train.total_steps=-5"], ["train.total_steps", "-5"]),
    "unknown_loss_kind": (["distill.loss=kl"], ["distill.loss", "'fkl'", "'jsd'"]),
    "stages_vs_teachers": (
        ["curriculum.num_stages=2"],
        ["policy 'clpd'", "num_stages=2", "num_teachers=3", "curriculum.num_stages=3"],
    ),
    "missing_dataset": (["data.path={root}/nope.jsonl"], ["nope.jsonl", "does not exist"]),
    "row_missing_field": (
        ["data.path={root}/missing_field.jsonl"],
        ["missing_field.jsonl", "row 2 (0-based)", "'answer'", "Fill or remove that row"],
    ),
    "empty_dataset": (["data.path={root}/empty.jsonl"], ["empty.jsonl", "empty"]),
    "all_rows_filtered": (
        ["data.path={root}/no_answers.jsonl"],
        ["all 3 rows were dropped", "no final answer", "answer_field"],
    ),
    "tokenizer_mismatch": (
        [_ladder_with("{root}/other_vocab")],
        ["teacher ext tokenizer", "differ", "distill.objective=sequence"],
    ),
    "model_path_missing": (
        [_ladder_with("/nonexistent/teacher")],
        ["teachers.ladder[ext].path", "/nonexistent/teacher", "does not exist"],
    ),
    "model_path_not_a_model": (
        [_ladder_with("{root}/empty_dir")],
        ["teachers.ladder[ext].path", "no config.json", "save_pretrained"],
    ),
    "model_weights_unreadable": (
        [_ladder_with("{root}/corrupt_weights")],
        ["teachers.ladder[ext].path", "model.safetensors", "not a readable safetensors"],
    ),
    "student_path_unloadable": (
        ["student.path={root}/empty_dir"],
        ["student.path", "no config.json"],
    ),
    "policy_import_fails": (
        ["scheduler.policy=broken_policy_mod:Policy"],
        ["broken_policy_mod", "RuntimeError", "this module is broken"],
    ),
}


@pytest.fixture
def no_runs(monkeypatch):
    """Bad input must fail before a run starts: starting one here is a test failure."""
    import clpd_ray.runtime.run

    def refuse(*args, **kwargs):
        raise AssertionError("bad input reached the run")

    monkeypatch.setattr(clpd_ray.runtime.run, "_execute", refuse)


def _check_error(capsys, code: int, needles: list[str]) -> str:
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err + captured.out
    # stderr may also hold progress bars (data loading, teacher training): the error comes last.
    assert captured.err.count("clpd: error: ") == 1, captured.err
    err = captured.err[captured.err.index("clpd: error: ") :]
    missing = [n for n in needles if n not in err]
    assert not missing, f"{missing} not in: {err}"
    return err


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_and_writes_nothing(
    case, inputs, tiny_config, tmp_path, capsys, monkeypatch, no_runs
):
    monkeypatch.syspath_prepend(str(inputs))
    spec, needles = CASES[case]
    base = tiny_config().to_dict()
    if isinstance(spec, str):
        text = spec
    else:
        overrides = [o.replace("{root}", str(inputs)) for o in spec]
        text = yaml.safe_dump(apply_overrides(base, overrides))

    # 1. A new run: refused, and no run directory appears.
    cfg = tmp_path / "config.yaml"
    cfg.write_text(text)
    new = tmp_path / "new-run"
    _check_error(capsys, main(["run", str(cfg), "--out", str(new)]), needles)
    assert not new.exists()

    # 2. Resuming a run whose config holds the mistake: refused before anything is rewound.
    existing = _existing_run(tmp_path / "existing", text)
    before = _snapshot(existing)
    _check_error(capsys, main(["run", "--resume", str(existing)]), needles)
    assert _snapshot(existing) == before


def test_missing_config_file_creates_nothing(tmp_path, capsys, no_runs):
    new = tmp_path / "new-run"
    code = main(["run", str(tmp_path / "nope.yaml"), "--out", str(new)])
    _check_error(capsys, code, ["nope.yaml", "does not exist", "YAML file"])
    assert not new.exists()


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["run", "--resume", "{tmp}/nowhere"], ["no such run directory"]),
        (["run", "--resume", "{tmp}"], ["not a run directory", "config.yaml"]),
        (["run", "--resume", "{run}", "--set", "train.total_steps=9"], ["drop --set"]),
        (["run", "--resume", "{run}", "--out", "{tmp}/x"], ["drop --out"]),
    ],
)
def test_resume_arguments_are_checked(tmp_path, capsys, tiny_config, no_runs, argv, needles):
    run = _existing_run(tmp_path / "run", yaml.safe_dump(tiny_config().to_dict()))
    before = _snapshot(run)
    args = [a.replace("{tmp}", str(tmp_path)).replace("{run}", str(run)) for a in argv]
    _check_error(capsys, main(args), needles)
    assert _snapshot(run) == before


def test_out_pointing_at_an_existing_run_is_refused(tmp_path, capsys, tiny_config, no_runs):
    text = yaml.safe_dump(tiny_config().to_dict())
    run = _existing_run(tmp_path / "run", text)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    before = _snapshot(run)
    code = main(["run", str(cfg), "--out", str(run)])
    _check_error(capsys, code, ["already exists", f"clpd run --resume {run}"])
    assert _snapshot(run) == before


@pytest.mark.parametrize("argv", [["run"], ["run", "{run}/config.yaml", "--resume", "{run}"]])
def test_run_takes_a_config_or_resume_not_both(tmp_path, capsys, tiny_config, argv):
    run = _existing_run(tmp_path / "run", yaml.safe_dump(tiny_config().to_dict()))
    before = _snapshot(run)
    with pytest.raises(SystemExit) as exc:  # an argparse usage error
        main([a.replace("{run}", str(run)) for a in argv])
    assert exc.value.code == 2
    assert "config" in capsys.readouterr().err and _snapshot(run) == before


def test_torn_checkpoint_is_named_on_resume(tmp_path, capsys, tiny_config, no_runs):
    run = _existing_run(tmp_path / "run", yaml.safe_dump(tiny_config().to_dict()))
    (run / "checkpoints" / "step-0000005" / "controller.json").unlink()
    before = _snapshot(run)
    code = main(["run", "--resume", str(run)])
    _check_error(capsys, code, ["step-0000005", "incomplete", "controller.json", "delete it"])
    assert _snapshot(run) == before


@pytest.mark.ray
@pytest.mark.slow
def test_invalid_decision_stops_the_run_and_keeps_the_last_checkpoint(
    ray_cluster, tiny_config, tmp_path, capsys, monkeypatch
):
    from clpd_ray.runtime.actors.student import StudentTrainer
    from clpd_ray.runtime.rundir import RunDir

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "bad_policy_mod.py").write_text(BAD_DECISION_POLICY.format(step=12))
    config = tiny_config(
        "scheduler.policy=bad_policy_mod:BadAt12",
        "train.total_steps=20",
        "train.checkpoint_every=5",
        "scheduler.probe_every=5",
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config.to_dict()))
    out = tmp_path / "run"
    err = _check_error(
        capsys,
        main(["run", str(cfg), "--out", str(out)]),
        ["policy 'bad_at_12' returned an invalid decision", "stage=7", "stopped at step 12"],
    )
    assert "step-0000005" in err and f"clpd run --resume {out}" in err
    assert not (out / "summary.json").exists()
    # The last checkpoint is complete and loads with the code a resume uses (test_faults.py
    # resumes runs from such checkpoints end to end).
    run = RunDir(out)
    ckpt = run.latest_checkpoint()
    assert ckpt is not None and ckpt.name == "step-0000005"
    assert not list(run.checkpoints.glob(".*"))  # no half-written checkpoint
    state = run.read_checkpoint(ckpt)
    assert state["step"] == 5 and state["policy_name"] == "bad_at_12"
    tok = tmp_path / "tok"
    from clpd_ray.data.tokenizer import build_char_tokenizer

    build_char_tokenizer().save_pretrained(tok)
    assert StudentTrainer(config, tok).restore(ckpt) == 5


def test_a_policy_that_raises_is_named(tiny_config, tmp_path, capsys, monkeypatch):
    """An exception inside a user policy's decide() is reported as the policy's, at its line."""
    from clpd_ray.data.tokenizer import build_char_tokenizer
    from clpd_ray.errors import PolicyError
    from clpd_ray.messages import Observation
    from clpd_ray.runtime.actors.scheduler import SchedulerService

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "raising_policy_mod.py").write_text(RAISING_POLICY)
    build_char_tokenizer().save_pretrained(tmp_path / "tok")
    service = SchedulerService(
        "raising_policy_mod:Raises",
        None,
        num_stages=3,
        teacher_names=["t0", "t1", "t2"],
        total_steps=10,
        student_spec=tiny_config().student,
        tokenizer_dir=tmp_path / "tok",
    )
    obs = Observation(
        step=3, total_steps=10, stage=0, num_stages=3, teacher=0, num_teachers=3, steps_in_stage=3
    )
    with pytest.raises(PolicyError) as err:
        service.decide(obs)
    text = str(err.value)
    assert "policy 'raises'" in text and "ZeroDivisionError" in text and "step 3" in text
    assert "raising_policy_mod.py:8" in text


@pytest.mark.ray
@pytest.mark.slow
def test_package_error_in_an_actor_init_is_reported_as_bad_input(ray_cluster):
    """A model that only fails inside an actor (past the driver's checks) is still exit 2."""
    import ray

    from clpd_ray.errors import ClpdError, ModelLoadError
    from clpd_ray.runtime.controller import unwrap

    class Loader:
        def __init__(self) -> None:
            raise ModelLoadError("cannot load a causal LM from /models/x: broken shard; fix it")

        def ping(self) -> int:
            return 1

    actor = ray.remote(Loader).options(max_restarts=-1, max_task_retries=-1).remote()
    with pytest.raises(ClpdError, match=r"^cannot load a causal LM from /models/x: broken shard"):
        unwrap(actor.ping.remote(), timeout=120)
