"""train.report_to: each tracker's files read back with that library's own reader (no Ray)."""

from __future__ import annotations

import struct
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from clpd_ray.config import load_config
from clpd_ray.errors import ConfigError
from clpd_ray.runtime import storage
from clpd_ray.runtime.rundir import RunDir
from clpd_ray.runtime.tracking import (
    Reporter,
    accuracy_table,
    check_report_to,
    decision_text,
    make_loggers,
    scalars,
)

ROWS = [
    {"step": s, "stage": s // 20, "teacher": "t0", "loss": 2.0 / s, "kd_loss": 1.5 / s,
     "ce_loss": 0.5 / s, "lr": 1e-3, "tokens_per_s": 100.0 * s, "student_busy_s": 0.5}
    for s in (10, 20, 30)
]  # fmt: skip
DECISION = {"step": 20, "stage": 1, "teacher": "t1", "policy": "clpd", "reason": "plateau"}
EVAL = {"step": 20, "accuracy": 0.5, "accuracy_by_difficulty": {"1": 0.75, "3": 0.25}, "n": 8}
SUMMARY = {
    "steps": 30,
    "student": {
        "accuracy": 0.5,
        "accuracy_by_difficulty": {"1": 0.75, "3": 0.25},
        "parameters": 1000,
    },
    "teachers": {
        "t0": {"accuracy": 0.9, "accuracy_by_difficulty": {"1": 1.0, "3": 0.8}, "parameters": 5}
    },
}


def _report(tmp_path: Path, names: list[str]) -> RunDir:
    """A run directory whose reporter got ROWS, DECISION, EVAL and SUMMARY, then closed."""
    config = load_config(None, [f"train.report_to=[{','.join(names)}]"])
    run_dir = RunDir.create(tmp_path / "run", config)
    reporter = Reporter.for_run(config, run_dir, "abcd1234")
    for row in ROWS[:2]:
        reporter.metrics(row)
    reporter.decision(DECISION)
    reporter.evaluation(EVAL)
    reporter.metrics(ROWS[2])
    reporter.summary(SUMMARY)
    reporter.close()
    return run_dir


def test_scalars_decision_text_and_accuracy_table() -> None:
    assert scalars("eval", EVAL) == {
        "eval/accuracy": 0.5,
        "eval/accuracy_by_difficulty/1": 0.75,
        "eval/accuracy_by_difficulty/3": 0.25,
        "eval/n": 8.0,
    }
    assert "train/teacher" not in scalars("train", ROWS[0])  # strings are not curves
    assert scalars("train", {"step": 1, "time": 5.0, "replay": True}) == {}
    assert decision_text(DECISION) == "step 20: stage 1, teacher t1 (clpd): plateau"
    columns, rows = accuracy_table(SUMMARY)
    assert columns == ["model", "parameters", "accuracy", "k=1", "k=3"]
    assert rows == [["student", 1000, 0.5, 0.75, 0.25], ["t0", 5, 0.9, 1.0, 0.8]]


def test_report_to_is_validated_once_at_load() -> None:
    assert load_config(None).train.report_to == ["jsonl"]
    assert load_config(None, ["train.report_to=wandb"]).train.report_to == ["wandb"]
    with pytest.raises(ConfigError, match="names tensorboard more than once"):
        load_config(None, ["train.report_to=[tensorboard,jsonl,tensorboard]"])
    with pytest.raises(ConfigError, match="'comet'"):
        load_config(None, ["train.report_to=[comet]"])


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'clpd_ray\[wandb\]'"):
        check_report_to(["jsonl", "wandb"])
    check_report_to(["jsonl"])  # jsonl needs nothing
    config = load_config(None, ["train.report_to=[wandb]"])
    with pytest.raises(ConfigError, match=r"drop 'wandb' from train\.report_to"):
        make_loggers(config, "/nowhere", "x")


def test_reporter_writes_the_run_directory_with_time_and_survives_a_failing_tracker(
    tmp_path: Path,
) -> None:
    class Broken:
        def log_row(self, step: int, row: Any) -> None:
            raise OSError("disk full")

        log_decision = log_eval = log_row

        def log_summary(self, summary: Any) -> None: ...

        def close(self) -> None: ...

    run_dir = RunDir.create(tmp_path / "run", load_config(None))
    reporter = Reporter(run_dir, [Broken()], clock=lambda: 1234.5)
    reporter.metrics(ROWS[0])
    reporter.metrics(ROWS[1])
    reporter.close()
    assert reporter.loggers == []
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"time": 1234.5' in lines[1]


def test_tensorboard_reads_back(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _report(tmp_path, ["jsonl", "tensorboard"])
    acc = EventAccumulator(str(tmp_path / "run" / "tracking" / "tensorboard"))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [10, 20, 30]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in ROWS])
    assert [e.value for e in acc.Scalars("eval/accuracy_by_difficulty/3")] == [0.25]
    assert acc.Scalars("final/t0/accuracy")[0].value == pytest.approx(0.9)
    texts = acc.Tensors("decisions/text_summary")
    assert texts[0].step == 20
    assert b"teacher t1 (clpd): plateau" in texts[0].tensor_proto.string_val[0]
    table = acc.Tensors("summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| student | 1000 | 0.5000 | 0.7500 | 0.2500 |" in table


def test_mlflow_reads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this test's reader too
    _report(tmp_path, ["mlflow"])
    uri = (tmp_path / "run" / "tracking" / "mlruns").resolve().as_uri()
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("clpd").experiment_id])
    assert run.info.run_name == "run-abcd1234" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(r["step"], r["loss"]) for r in ROWS]
    assert client.get_metric_history(run.info.run_id, "eval/accuracy")[0].step == 20
    assert run.data.metrics["final/student/accuracy_by_difficulty/1"] == 0.75
    assert "plateau" in run.data.tags["clpd.last_decision"]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "summary.json", "summary.md", "decisions.md"} <= names


def _wandb_records(path: Path) -> list[Any]:
    """The records of a ``.wandb`` file: W&B's LevelDB-style log (a 7-byte ``:W&B`` header, then
    32 KiB blocks of chunks: crc32 (4), length (2), type (1: whole, 2/3/4: first/middle/last))
    of ``wandb_internal_pb2.Record`` protos. wandb >= 0.24 ships no Python reader for it."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, part, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


def test_wandb_offline_reads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    import json

    monkeypatch.setenv("WANDB_SILENT", "true")
    _report(tmp_path, ["wandb"])
    (offline,) = (tmp_path / "run" / "tracking" / "wandb" / "wandb").glob("offline-run-*")
    (log,) = offline.glob("*.wandb")
    # wandb-core (a separate process) may still be writing the file when finish() returns.
    deadline = time.monotonic() + 60
    while not [r for r in _wandb_records(log) if r.WhichOneof("record_type") == "exit"]:
        assert time.monotonic() < deadline, f"{log} has no exit record after 60 s"
        time.sleep(0.2)
    history = []
    for record in _wandb_records(log):
        if record.WhichOneof("record_type") == "history":
            history.append(
                {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
            )
    train = [
        (json.loads(h["train/step"]), json.loads(h["train/loss"]))
        for h in history
        if "train/loss" in h
    ]
    assert train == [(r["step"], r["loss"]) for r in ROWS]
    evals = [h for h in history if "eval/accuracy" in h]
    assert [json.loads(h["eval/step"]) for h in evals] == [20]
    tables = {p.name.split("_")[0] for p in (offline / "files" / "media" / "table").rglob("*.json")}
    assert tables == {"accuracy", "decisions"}  # summary/accuracy and decisions


def test_an_s3_run_gets_its_tracking_files_at_close(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("CLPD_CACHE", str(tmp_path / "cache"))
    config = load_config(None, ["train.report_to=[tensorboard]"])
    run_dir = RunDir.create(f"{s3_bucket}/run", config)
    reporter = Reporter.for_run(config, run_dir, "abcd1234")
    reporter.metrics(ROWS[0])
    reporter.close()
    files = storage.file_sizes(f"{s3_bucket}/run/tracking")
    assert [n for n in files if n.startswith("tensorboard/events.out.tfevents.")], files
