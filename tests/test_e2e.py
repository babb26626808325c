"""End-to-end runs on the shared local Ray cluster: the run directory contract and the schedule."""

from __future__ import annotations

import json

import pytest
import ray
from conftest import TWO_RUNGS
from transformers import AutoModelForCausalLM

from clpd_ray.runtime.run import run_distillation

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_clpd_run_writes_the_contract_and_follows_the_schedule(ray_cluster, tiny_config, tmp_path):
    config = tiny_config("train.eval_every=10", **TWO_RUNGS)
    out = tmp_path / "run"
    summary = run_distillation(config, out, progress=False)

    for name in ("config.yaml", "metrics.jsonl", "decisions.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(out / "student")
    assert model.config.n_embd == 16
    assert (out / "student" / "tokenizer.json").is_file()
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-0000015"]

    metrics = _jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [5, 10, 15, 20, 25, 30]
    # Rows carry the stage and teacher of the steps they aggregate (stage clock: 15 steps each).
    assert [(m["stage"], m["teacher"]) for m in metrics] == [
        (0, "t0"),
        (0, "t0"),
        (0, "t0"),
        (1, "t1"),
        (1, "t1"),
        (1, "t1"),
    ]
    evals = _jsonl(out / "eval.jsonl")  # train.eval_every=10, not after the last step
    assert [e["step"] for e in evals] == [10, 20]
    assert all(0.0 <= e["accuracy"] <= 1.0 and e["n"] == 30 for e in evals)
    for m in metrics:
        assert {"step", "stage", "teacher", "loss", "lr", "tokens_per_s"} <= m.keys()
        assert m["loss"] > 0 and m["tokens_per_s"] > 0

    decisions = _jsonl(out / "decisions.jsonl")
    assert [(d["step"], d["stage"], d["teacher"]) for d in decisions] == [
        (0, 0, "t0"),
        (15, 1, "t1"),
    ]
    for d in decisions:
        assert d["policy"] == "clpd" and d["reason"]

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert summary["steps"] == 30 and summary["wall_s"] > 0
    assert 0.0 <= summary["student"]["accuracy"] <= 1.0
    assert set(summary["student"]["accuracy_by_difficulty"]) == {"1", "2", "3"}
    assert set(summary["teachers"]) == {"t0", "t1"}
    assert summary["stages"] == {"0": [0, 14], "1": [15, 29]}
    # The actors are gone afterwards: nothing named is left in the namespace.
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert not {"student", "scheduler", "teacher-t0"} & names
