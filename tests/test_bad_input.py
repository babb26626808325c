"""Every bad input to ``clpd run``: exit 2, one message naming the file/key/row and the fix, no
traceback, and nothing written: no new run directory, and an existing run left byte for byte.

Each case runs twice: as a new run (``clpd run CFG --out NEW``) and as a resume of an existing
run whose config.yaml holds the same mistake (``clpd run --resume RUN``), which must fail before
it rewinds anything. docs/reliability.md lists the same cases with the messages users see.
The config-level messages themselves are pinned in test_config.py and test_cli.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from conftest import ONE_RUNG

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


BLOCKING_POLICY = """
import time

from clpd_ray.policies import Decision, SchedulerPolicy


class BlocksAt6(SchedulerPolicy):
    name = "blocks_at_6"
    reads_probes = False

    def decide(self, obs):
        if obs.step >= 6:
            time.sleep(3600)
        return Decision(stage=0, teacher=0, reason="stage 0")
"""


RAISING_POLICY = """from clpd_ray.policies import SchedulerPolicy


class Raises(SchedulerPolicy):
    name = "raises"

    def decide(self, obs):
        return 1 / 0
"""


RAISING_INIT_POLICY = """from clpd_ray.policies import SchedulerPolicy


class RaisesInInit(SchedulerPolicy):
    name = "raises_in_init"

    def __init__(self):
        raise RuntimeError("no config for me")

    def decide(self, obs):
        raise AssertionError("never called")
"""

RAISING_BIND_POLICY = """from clpd_ray.policies import SchedulerPolicy


class RaisesInBind(SchedulerPolicy):
    name = "raises_in_bind"

    def bind(self, *, num_stages, num_teachers, total_steps):
        return {}["window"]

    def decide(self, obs):
        raise AssertionError("never called")
"""

NUMPY_STATE_POLICY = """import numpy as np

from clpd_ray.policies import Decision, SchedulerPolicy


class NumpyState(SchedulerPolicy):
    name = "numpy_state"
    curriculum = "none"

    def __init__(self, extra=None):
        self.ema = np.float32(0.25)
        self.extra = extra

    def decide(self, obs):
        self.ema = np.float32(0.5) * self.ema + np.float32(obs.step)
        return Decision(stage=0, teacher=0, reason="numpy numbers")

    def state_dict(self):
        state = {"ema": self.ema, "seen": np.arange(3), "steps": (np.int64(2), np.bool_(True))}
        return state if self.extra is None else {**state, "extra": {1, 2}}

    def load_state_dict(self, state):
        self.ema = np.float32(state["ema"])
"""


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _existing_run(path: Path, config_text: str | bytes) -> Path:
    """A run stopped at step 7 with a checkpoint at 5: what a resume would rewind, if it ran.
    The checkpoint is a valid one (test_resume.py covers damaged ones), so a resume reaches the
    input checks."""
    from checkpoint_files import write_checkpoint

    (path / "checkpoints" / "step-0000010").mkdir(parents=True)  # never committed
    raw = config_text if isinstance(config_text, bytes) else config_text.encode()
    (path / "config.yaml").write_bytes(raw)
    (path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (5, 7)))
    (path / "decisions.jsonl").write_text(json.dumps({"step": 0, "stage": 0}) + "\n")
    write_checkpoint(path, 5)  # the student's files, controller.json, then the manifest
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
    (root / "init_policy_mod.py").write_text(RAISING_INIT_POLICY)
    (root / "bind_policy_mod.py").write_text(RAISING_BIND_POLICY)
    # A model with the task's own tokenizer, so external data reaches the stage split.
    task_tok = build_char_tokenizer()
    task_model = build_model(ModelSpec(n_layer=1, n_embd=16, n_head=2), task_tok)
    task_model.save_pretrained(root / "task_vocab")
    task_tok.save_pretrained(root / "task_vocab")
    # 12 rows: 6 held out for evaluation, 3 for probes, 3 to train on.
    one_step = [
        {"question": f"{i}+1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"} for i in range(12)
    ]
    (root / "one_step.jsonl").write_text("".join(json.dumps(r) + "\n" for r in one_step))
    (root / "four_rows.jsonl").write_text(
        "".join(
            json.dumps({**r, "answer": "a\n" * i + r["answer"]}) + "\n"
            for i, r in enumerate(one_step[:4])
        )
    )
    return root


def _ladder_with(path: Path | str) -> str:
    from conftest import TINY_LADDER

    return "teachers.ladder=" + json.dumps([*TINY_LADDER[:2], {"name": "ext", "path": str(path)}])


def _external_data(name: str) -> list[str]:
    """Overrides for a dataset of ``inputs`` with three teachers (and the student) that share
    its tokenizer, so the workload builds and the stage split is reached."""
    ladder = [{"name": f"x{i}", "path": "{root}/task_vocab"} for i in range(3)]
    return [
        f"data.path={{root}}/{name}",
        "data.eval_fraction=0.5",
        "student.path={root}/task_vocab",
        "teachers.ladder=" + json.dumps(ladder),
    ]


DUPLICATED_TRAIN = "train:\n  total_steps: 5\nseed: 0\ntrain:\n  batch_size: 4\n"
ESCAPING_TEACHER = [{"name": "../../../escaped-x", "n_layer": 1, "n_embd": 16, "n_head": 2}]


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
    "policy_init_raises": (
        ["scheduler.policy=init_policy_mod:RaisesInInit"],
        [
            "policy 'raises_in_init' raised RuntimeError: no config for me in __init__(**{})",
            "init_policy_mod.py:8)",
            "fix the policy or scheduler.kwargs",
        ],
    ),
    "policy_bind_raises": (
        ["scheduler.policy=bind_policy_mod:RaisesInBind"],
        [
            "policy 'raises_in_bind' raised KeyError: 'window' in bind(num_stages=3, num_teachers=3",
            "bind_policy_mod.py:8)",
            "fix the policy",
        ],
    ),
    "seed_negative": (["seed=-1"], ["seed: -1 is out of range", "[0, 4294967295]"]),
    "seed_over_32_bits": (["seed=18446744073709551616"], ["seed", "[0, 4294967295]"]),
    "boundaries_nan": (
        ["curriculum.boundaries=[.nan, .nan]"],
        ["curriculum.boundaries: [nan, nan]", "not a finite number"],
    ),
    "boundaries_beyond_the_task": (
        ["curriculum.boundaries=[2.5, 3.5]"],
        ["curriculum.boundaries=[2.5, 3.5]", "difficulties 1..3", "stage 2", "is empty"],
    ),
    "duplicated_section": (
        DUPLICATED_TRAIN,
        ["config.yaml: key 'train' appears twice (lines 1 and 4)", "merge them into one"],
    ),
    "not_utf8": (
        b"seed: 0\n# caf\xe9\n",
        [
            "config.yaml: not UTF-8 text: byte 0xe9 at byte position 13 (line 2, column 6)",
            "save the file as UTF-8",
        ],
    ),
    "teacher_name_escapes": (
        ["teachers.ladder=" + json.dumps(ESCAPING_TEACHER)],
        ["teachers.ladder.0.name", "'../../../escaped-x' cannot be used", "rename it"],
    ),
    "task_levels_below_stages": (
        ["task.max_difficulty=2"],
        [
            "task.max_difficulty=2 gives 2 difficulty levels",
            "curriculum.num_stages=3",
            "policy 'clpd'",
            "standard_kd",
        ],
    ),
    "dataset_too_small_for_stages": (
        _external_data("four_rows.jsonl"),
        # 2 rows held out for evaluation, 1 for probes (data.probe_rows, at most half): 1 left.
        ["four_rows.jsonl", "1 examples cannot fill 3 curriculum stages", "at most 1 stages"],
    ),
    "all_rows_same_difficulty": (
        _external_data("one_step.jsonl"),
        [
            "one_step.jsonl",
            "3 training examples have 1 distinct difficulty score(s) (1;",
            "num_stages=3",
            "policy 'clpd'",
            "another curriculum.scorer",
        ],
    ),
}
# Mistakes found from the config alone: `clpd validate` refuses them too, with the same words.
CONFIG_LEVEL = [
    "seed_negative",
    "seed_over_32_bits",
    "boundaries_nan",
    "boundaries_beyond_the_task",
    "duplicated_section",
    "not_utf8",
    "teacher_name_escapes",
    "task_levels_below_stages",
    "policy_init_raises",
    "policy_bind_raises",
]


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


def _case_text(spec: str | bytes | list[str], inputs: Path, tiny_config) -> bytes:
    """The config file of a case: raw text or bytes as given, or the tiny config + overrides."""
    if isinstance(spec, bytes):
        return spec
    if isinstance(spec, str):
        return spec.encode()
    overrides = [o.replace("{root}", str(inputs)) for o in spec]
    return yaml.safe_dump(apply_overrides(tiny_config().to_dict(), overrides)).encode()


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_and_writes_nothing(
    case, inputs, tiny_config, tmp_path, capsys, monkeypatch, no_runs
):
    monkeypatch.syspath_prepend(str(inputs))
    text = _case_text(CASES[case][0], inputs, tiny_config)
    needles = CASES[case][1]

    # 1. A new run: refused, and no run directory appears.
    cfg = tmp_path / "config.yaml"
    cfg.write_bytes(text)
    new = tmp_path / "new-run"
    _check_error(capsys, main(["run", str(cfg), "--out", str(new)]), needles)
    assert not new.exists()

    # 2. Resuming a run whose config holds the mistake: refused before anything is rewound.
    existing = _existing_run(tmp_path / "existing", text)
    before = _snapshot(existing)
    _check_error(capsys, main(["run", "--resume", str(existing)]), needles)
    assert _snapshot(existing) == before


@pytest.mark.parametrize("case", CONFIG_LEVEL)
def test_validate_refuses_what_the_run_refuses(
    case, inputs, tiny_config, tmp_path, capsys, monkeypatch, no_runs
):
    monkeypatch.syspath_prepend(str(inputs))
    cfg = tmp_path / "config.yaml"
    cfg.write_bytes(_case_text(CASES[case][0], inputs, tiny_config))
    _check_error(capsys, main(["validate", str(cfg)]), CASES[case][1])


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
    # Same size, other content: the manifest's hash tells.
    (run / "checkpoints" / "step-0000005" / "controller.json").write_text(
        json.dumps({"step": 6}, indent=2)
    )
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
    # sft: the student and the scheduler alone (no teacher actor); the policy is what fails. It
    # reads probes, which an sft run takes without teachers (no KL part, no teacher accuracy):
    # it reaches step 12 only if they work.
    config = tiny_config(
        "distill.objective=sft",
        "scheduler.policy=bad_policy_mod:BadAt12",
        "train.total_steps=20",
        "train.checkpoint_every=5",
        "scheduler.probe_every=5",
        **ONE_RUNG,
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
    assert ckpt is not None and ckpt.endswith("step-0000005")
    assert (out / "checkpoints" / "step-0000005" / "manifest.json").is_file()
    state = run.read_checkpoint(ckpt)
    assert state["step"] == 5 and state["policy_name"] == "bad_at_12"
    tok = tmp_path / "tok"
    from clpd_ray.data.tokenizer import build_char_tokenizer

    build_char_tokenizer().save_pretrained(tok)
    assert StudentTrainer(config, tok).restore(ckpt) == 5


@pytest.mark.ray
@pytest.mark.slow
def test_a_policy_that_blocks_is_stopped_by_the_timeout(
    ray_cluster, tiny_config, tmp_path, capsys, monkeypatch
):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "blocking_policy_mod.py").write_text(BLOCKING_POLICY)
    config = tiny_config(
        "distill.objective=sft",  # no teacher actor: the policy is what fails
        "scheduler.policy=blocking_policy_mod:BlocksAt6",
        "scheduler.timeout_s=2",
        "train.total_steps=12",
        "train.checkpoint_every=0",
        **ONE_RUNG,
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config.to_dict()))
    start = time.monotonic()
    _check_error(
        capsys,
        main(["run", str(cfg), "--out", str(tmp_path / "run")]),
        ["policy 'blocks_at_6': decide() at step 6 did not return", "scheduler.timeout_s=2"],
    )
    assert time.monotonic() - start < 120


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
    from clpd_ray.runtime.executor import unwrap

    class Loader:
        def __init__(self) -> None:
            raise ModelLoadError("cannot load a causal LM from /models/x: broken shard; fix it")

        def ping(self) -> int:
            return 1

    actor = ray.remote(Loader).options(max_restarts=-1, max_task_retries=-1).remote()
    with pytest.raises(ClpdError, match=r"^cannot load a causal LM from /models/x: broken shard"):
        unwrap(actor.ping.remote(), timeout=120)


# --- policy code that raises or keeps numpy state ------------------------------------------------


def _scheduler(policy: str, tiny_config, tmp_path: Path, kwargs: dict | None = None):
    from clpd_ray.data.tokenizer import build_char_tokenizer
    from clpd_ray.runtime.actors.scheduler import SchedulerService

    build_char_tokenizer().save_pretrained(tmp_path / "tok")
    return SchedulerService(
        policy,
        kwargs,
        num_stages=3,
        teacher_names=["t0", "t1", "t2"],
        total_steps=10,
    )


def _obs(step: int):
    from clpd_ray.messages import Observation

    return Observation(
        step=step,
        total_steps=10,
        stage=0,
        num_stages=3,
        teacher=0,
        num_teachers=3,
        steps_in_stage=0,
    )


def test_numpy_policy_state_is_stored_as_json(tiny_config, tmp_path, monkeypatch):
    """np.float32 and friends in state_dict() used to crash the first checkpoint's json.dump."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "numpy_state_mod.py").write_text(NUMPY_STATE_POLICY)
    service = _scheduler("numpy_state_mod:NumpyState", tiny_config, tmp_path)
    _, before = service.decide(_obs(0))
    assert before == {"ema": 0.25, "seen": [0, 1, 2], "steps": [2, True]}
    state = service.state_dict()
    assert json.loads(json.dumps(state)) == state == {**before, "ema": 0.125}
    assert all(type(v) in (float, list) for v in state.values())
    service.load_state_dict(state)  # what a restore gives the policy back
    assert service.state_dict() == state


def test_policy_state_json_cannot_hold_is_named(tiny_config, tmp_path, monkeypatch):
    from clpd_ray.errors import PolicyError

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "numpy_state_mod.py").write_text(NUMPY_STATE_POLICY)
    service = _scheduler("numpy_state_mod:NumpyState", tiny_config, tmp_path, {"extra": True})
    with pytest.raises(PolicyError, match=r"policy 'numpy_state': state_dict\(\) holds a set at "):
        service.decide(_obs(0))
    with pytest.raises(PolicyError, match=r"state\['extra'\], which JSON cannot store"):
        service.state_dict()


def test_to_jsonable_converts_numpy_and_names_the_rest():
    import numpy as np

    from clpd_ray.policies import to_jsonable

    value = {np.int64(1): [np.float32(0.5), (np.bool_(False), np.zeros((2, 1)))], "s": np.str_("x")}
    out = to_jsonable(value)
    assert out == {1: [0.5, [False, [[0.0], [0.0]]]], "s": "x"}
    assert type(next(iter(out))) is int and type(out[1][0]) is float
    with pytest.raises(TypeError, match=r"holds a object at state\['a'\]\[1\]"):
        to_jsonable({"a": [1, object()]})


def test_a_policy_whose_state_dict_raises_is_named(tiny_config, tmp_path, monkeypatch):
    from clpd_ray.errors import PolicyError

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "state_raises_mod.py").write_text(
        NUMPY_STATE_POLICY.replace('state = {"ema"', 'state = {"x": 1 / 0, "ema"')
    )
    service = _scheduler("state_raises_mod:NumpyState", tiny_config, tmp_path)
    with pytest.raises(PolicyError) as err:
        service.state_dict()
    text = str(err.value)
    assert "policy 'numpy_state' raised ZeroDivisionError" in text and "in state_dict()" in text
    assert "state_raises_mod.py:" in text and text.endswith("fix the policy")


def test_a_builtin_policy_bug_stays_an_internal_error(tiny_config, tmp_path, capsys, monkeypatch):
    """Only user code is reported as bad input; a bug in clpd's own policies keeps its traceback."""
    from clpd_ray.policies import ClpdPolicy, bind_policy

    def broken_bind(self, **geometry):
        raise ZeroDivisionError("a clpd bug")

    monkeypatch.setattr(ClpdPolicy, "bind", broken_bind)
    with pytest.raises(ZeroDivisionError):
        bind_policy(ClpdPolicy(), num_stages=3, num_teachers=3, total_steps=30)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config().to_dict()))
    assert main(["validate", str(cfg)]) == 1
    assert "Traceback" in capsys.readouterr().err


# --- names in paths ----------------------------------------------------------------------------


def test_ladder_never_touches_paths_outside_its_cache(tiny_config, tmp_path):
    """Defence in depth behind config validation: a teacher name that escapes the cache (a
    config built without validation) is refused before anything is deleted or written."""
    from clpd_ray.config import TeacherSpec
    from clpd_ray.data.tokenizer import build_char_tokenizer
    from clpd_ray.distill.ladder import ensure_ladder, train_teacher
    from clpd_ray.errors import ConfigError

    victim = tmp_path / "escaped-x"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    cache = tmp_path / "a" / "b"
    good = tiny_config(f"teachers.cache_dir={cache}")
    bad = TeacherSpec.model_construct(**{**good.teachers.ladder[0].model_dump(), "name": "../../x"})
    config = good.model_copy(
        update={"teachers": good.teachers.model_copy(update={"ladder": [bad]})}
    )
    tok = build_char_tokenizer()
    with pytest.raises(ConfigError, match=r"teacher name '\.\./\.\./x' cannot be used"):
        ensure_ladder(config, tok, [], [], progress=False)
    with pytest.raises(ValueError, match="not a plain cache entry"):
        train_teacher(bad, tok, [], [], batch_size=2, seed=0, out_dir=cache / ".." / "escaped-x")
    assert (victim / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["escaped-x"]


@pytest.mark.parametrize("name", ["t-small", "T1.v2_x", "a" * 64])
def test_arm_slugs_of_valid_teachers_are_single_path_components(tiny_config, name):
    from clpd_ray.ablation.arms import parse_arms

    ladder = [{"name": name, "n_layer": 1, "n_embd": 16, "n_head": 2}]
    config = tiny_config("teachers.ladder=" + json.dumps(ladder), "curriculum.num_stages=1")
    (arm,) = parse_arms([f"single:{name}"], config)
    assert arm.slug == f"single_{name}" and "/" not in arm.slug


# --- stages that cannot be formed -----------------------------------------------------------------


@pytest.mark.parametrize("curriculum", ["none", "random"])
def test_equal_difficulties_are_fine_without_a_difficulty_curriculum(tiny_config, curriculum):
    import numpy as np

    from clpd_ray.curriculum.checks import check_stages

    stages = check_stages(tiny_config(), np.ones(9), "p", curriculum)
    assert [len(s) for s in stages] == [3, 3, 3]


def test_too_few_difficulty_levels_are_refused_with_the_fix(tiny_config):
    import numpy as np

    from clpd_ray.curriculum.checks import check_stages
    from clpd_ray.errors import DataError

    config = tiny_config()
    assert [len(s) for s in check_stages(config, np.array([1, 1, 2, 3.0]), "clpd", "difficulty")]
    with pytest.raises(DataError) as err:
        check_stages(config, np.array([1, 2, 1, 2.0]), "clpd", "difficulty")
    text = str(err.value)
    assert text.startswith("the embedded task (task.train_size=300): the 4 training examples")
    assert "2 distinct difficulty score(s) (1, 2;" in text and "use at most 2 stage(s)" in text


def test_boundaries_that_leave_a_stage_empty_are_refused(tiny_config):
    import numpy as np

    from clpd_ray.curriculum.checks import check_stages
    from clpd_ray.errors import DataError

    config = tiny_config("curriculum.boundaries=[10, 20]")
    with pytest.raises(DataError, match=r"curriculum stage 1 \(scores in \(10, 20\]\) is empty"):
        check_stages(config, np.arange(1.0, 9.0), "clpd", "difficulty")


# --- torn JSONL files ------------------------------------------------------------------------------

PUBLISHED = Path(__file__).resolve().parents[1] / "docs" / "results" / "fkl-long-last-stage"


def test_report_reads_the_good_rows_of_a_torn_results_file(tmp_path, capsys, caplog):
    """A crash mid-append leaves a torn last line: the report skips it and says so."""
    import shutil

    copy = tmp_path / "ablation"
    shutil.copytree(PUBLISHED, copy)
    with open(copy / "results.jsonl", "a") as f:
        f.write('{"arm": "clpd", "seed": 9, "accur')
    assert main(["report", str(copy)]) == 0, capsys.readouterr().err
    summary = json.loads((copy / "summary.json").read_text())
    assert summary == json.loads((PUBLISHED / "summary.json").read_text())
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "results.jsonl: its last line 11 is torn (not complete JSON" in warning
    assert "ignored it and read the 10 rows before it" in warning


def test_a_damaged_line_inside_a_results_file_is_named(tmp_path, capsys):
    import shutil

    copy = tmp_path / "ablation"
    shutil.copytree(PUBLISHED, copy)
    lines = (copy / "results.jsonl").read_text().splitlines(keepends=True)
    (copy / "results.jsonl").write_text("".join([*lines[:3], '{"arm": "cl\n', *lines[3:]]))
    _check_error(
        capsys,
        main(["report", str(copy)]),
        ["results.jsonl: line 4 is not valid JSON", "not the last line", "fix or delete that line"],
    )


def test_a_results_file_copied_without_its_runs_is_named(tmp_path, capsys):
    """results.jsonl and ablation.json copied alone: the report names the missing run summary."""
    import shutil

    copy = tmp_path / "ablation"
    copy.mkdir()
    for name in ("results.jsonl", "ablation.json"):
        shutil.copy(PUBLISHED / name, copy / name)
    _check_error(
        capsys,
        main(["report", str(copy)]),
        ["summary.json does not exist", "results.jsonl lists that run", "--export DST"],
    )
    assert sorted(p.name for p in copy.iterdir()) == ["ablation.json", "results.jsonl"]


def test_a_model_that_is_not_a_causal_lm_is_refused_before_any_actor(tmp_path, tiny_config):
    """A T5 checkpoint as a teacher: exit 2 from the driver's checks, naming the model type."""
    from transformers import T5Config

    from clpd_ray.errors import ModelLoadError
    from clpd_ray.runtime.run import check_models

    T5Config(d_model=8, num_layers=1, num_heads=1, d_ff=8, vocab_size=32).save_pretrained(
        tmp_path / "t5"
    )
    ladder = [{"name": "t0", "path": str(tmp_path / "t5")}]
    with pytest.raises(ModelLoadError, match=r"teachers\.ladder\[t0\]\.path: .* is a 't5' model"):
        check_models(tiny_config(teachers={"ladder": ladder}))
