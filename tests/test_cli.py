"""The ``clpd`` command line: exit codes and messages for good and bad input, and runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import ONE_RUNG

from clpd_ray.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _write(tmp_path: Path, config, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(config.to_dict()))
    return p


def test_validate_accepts_the_demo_config(capsys):
    assert (
        main(["validate", str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")]) == 0
    )
    assert "valid" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "overrides", "needle"),
    [
        ("train: {total_steps: 0}\n", [], "train.total_steps"),
        ("train: [unclosed\n", [], "line"),
        ("bogus: 1\n", [], "unknown key 'bogus'"),
        ("distill: {loss: kl}\n", [], "distill.loss"),
        ("", ["distill.beta=1.5"], "distill.beta"),
        ("", ["scheduler.policy=no_such_policy"], "no_such_policy"),
        ("", ["scheduler.policy=nowhere.mod:Cls"], "nowhere.mod"),
        ("", ["curriculum.num_stages=2"], "stages"),
    ],
)
def test_bad_config_exits_2_with_one_message(tmp_path, capsys, content, overrides, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    argv = ["validate", str(path)] + [x for o in overrides for x in ("--set", o)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("clpd: error:") and needle in err
    assert "Traceback" not in err


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run"])
    assert exc.value.code == 2


def test_existing_out_is_refused_and_left_untouched(tmp_path, tiny_config, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cfg = _write(tmp_path, tiny_config())
    assert main(["run", str(cfg), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.ray
@pytest.mark.slow
def test_run_with_a_user_policy_from_outside_the_package(
    ray_cluster, tmp_path, tiny_config, monkeypatch, capsys
):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    cfg = _write(
        tmp_path, tiny_config("train.total_steps=12", "train.checkpoint_every=0", **ONE_RUNG)
    )
    out = tmp_path / "run"
    rc = main(
        [
            "run",
            str(cfg),
            "--out",
            str(out),
            "--set",
            "scheduler.policy=custom_policy:CompetencePolicy",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "student" in printed and "t0" in printed  # the accuracy table
    decisions = [json.loads(x) for x in (out / "decisions.jsonl").read_text().splitlines()]
    assert decisions and all(d["policy"] == "competence" for d in decisions)
    assert all("competence" in d["reason"] for d in decisions)
