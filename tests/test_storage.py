"""The storage layer, the run directory and model fetching, on a local directory and on a real
S3 server (moto, see s3_server.py): the same calls, the same results. No Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clpd_ray.errors import RunDirError, StorageError
from clpd_ray.runtime import models_store, storage
from clpd_ray.runtime.rundir import RunDir


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> str:
    """A fresh, absent location: a local directory or a prefix in a new bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/some/prefix"


def test_files_round_trip(where, tmp_path):
    assert not storage.exists(where) and storage.list_dir(where) == []
    storage.write_text(storage.join(where, "a.txt"), "hello")
    storage.write_bytes(storage.join(where, "sub", "b.bin"), b"\x00\x01")
    assert storage.read_text(storage.join(where, "a.txt")) == "hello"
    assert storage.read_bytes(storage.join(where, "sub/b.bin")) == b"\x00\x01"
    storage.write_text(storage.join(where, "a.txt"), "replaced")  # a whole new version
    assert storage.read_text(storage.join(where, "a.txt")) == "replaced"
    assert storage.list_dir(where) == ["a.txt", "sub"]
    assert storage.file_sizes(where) == {"a.txt": 8, "sub/b.bin": 2}
    assert storage.is_file(storage.join(where, "a.txt"))
    assert not storage.is_file(storage.join(where, "missing"))

    src = tmp_path / "src"
    (src / "deep").mkdir(parents=True)
    (src / "x.json").write_text("{}")
    (src / "deep" / "y.txt").write_text("y")
    storage.upload_dir(src, storage.join(where, "up"), last=("x.json",))
    back = storage.download_dir(storage.join(where, "up"), tmp_path / "back")
    assert (back / "x.json").read_text() == "{}" and (back / "deep" / "y.txt").read_text() == "y"

    storage.delete_tree(storage.join(where, "sub"))
    storage.delete_file(storage.join(where, "a.txt"))
    assert storage.list_dir(where) == ["up"]
    with pytest.raises(StorageError, match=r"cannot read .*missing"):
        storage.read_bytes(storage.join(where, "missing"))


def test_concurrent_writers_of_one_file_each_land_whole(tmp_path):
    """Two runs of an ablation may write the same target-store part at once (same rows, same
    bytes): each writes its own temporary file, so no rename finds its file taken by the other."""
    from concurrent.futures import ThreadPoolExecutor

    target = str(tmp_path / "store" / "part-x.npz")
    data = bytes(range(256)) * 512

    def write(_: int) -> None:
        for _ in range(25):
            storage.write_bytes(target, data)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(8)))  # raises what a writer raised
    assert storage.read_bytes(target) == data
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["part-x.npz"]  # no temp left


def test_locations_are_resolved_or_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("runs/a") == str(tmp_path / "runs" / "a")  # absolute on the driver
    assert storage.resolve("s3://bucket/a/b/") == "s3://bucket/a/b"
    assert storage.join("s3://bucket/a", "c", "d.json") == "s3://bucket/a/c/d.json"
    with pytest.raises(StorageError, match=r"unsupported storage scheme 'gs'.*s3://bucket/prefix"):
        storage.resolve("gs://bucket/x")
    with pytest.raises(StorageError, match="not a usable S3 URI"):
        storage.resolve("s3:///x")


def test_missing_bucket_and_unreachable_endpoint_fail_with_one_clear_line(
    s3_endpoint, monkeypatch, tmp_path, tiny_config, capsys
):
    import yaml

    from clpd_ray.cli import main

    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        RunDir.check_new("s3://no-such-bucket/run")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config().to_dict()))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    storage._s3_fs.cache_clear()
    assert main(["run", str(cfg), "--out", "s3://bucket/run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach s3://bucket" in err[0] and "AWS_ENDPOINT_URL" in err[0]
    assert main(["run", "--resume", "ftp://host/run"]) == 2
    assert "unsupported storage scheme" in capsys.readouterr().err
    storage._s3_fs.cache_clear()


# ---------------------------------------------------------------------------- run directory


def _trainer(tmp_path: Path, config):
    from clpd_ray.data.tokenizer import build_char_tokenizer
    from clpd_ray.runtime.actors.student import StudentTrainer

    tok = tmp_path / "tok"
    if not tok.exists():
        build_char_tokenizer().save_pretrained(tok)
    return StudentTrainer(config, str(tok), threads=1)


def _state(step: int) -> dict:
    return {"step": step, "sampler": {"n": step}}


def test_run_directory_checkpoints_commit_prune_and_rewind(where, tmp_path, tiny_config):
    config = tiny_config("train.keep_checkpoints=2")
    run = RunDir.create(where, config)
    with pytest.raises(RunDirError, match=r"already exists and is not empty.*--resume"):
        RunDir.create(where, config)
    for step in (5, 10, 15, 20, 25):
        run.metrics({"step": step, "loss": 1.0})
    for step in (0, 9, 10, 14):
        run.decision({"step": step})
    student = _trainer(tmp_path, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.model.parameters():
            p.add_(torch.randn_like(p))
    student.step = 10
    expected = {k: v.clone() for k, v in student.model.state_dict().items()}
    for step in (10, 20, 30):
        student.checkpoint(run.checkpoint_dir(step))
        assert run.commit_checkpoint(step, _state(step)).endswith(f"step-{step:07d}")
    names = storage.list_dir(run.checkpoints)
    assert names == ["step-0000020", "step-0000030"]  # pruned to keep_checkpoints

    # A crash after the student wrote step 40 but before the driver committed it: never picked.
    student.checkpoint(run.checkpoint_dir(40))
    assert run.latest_checkpoint() == storage.join(run.checkpoints, "step-0000030")
    # A manifest that does not match its files (a torn upload) is not a checkpoint either.
    torn = storage.join(run.checkpoints, "step-0000030", "student_optim.pt")
    good = storage.read_bytes(torn)
    storage.write_bytes(torn, good[:-10])
    assert run.latest_checkpoint() == storage.join(run.checkpoints, "step-0000020")
    with pytest.raises(
        RunDirError, match=r"step-0000030 is incomplete or damaged: student_optim.pt has \d+"
    ):
        run.read_checkpoint(storage.join(run.checkpoints, "step-0000030"))
    storage.write_bytes(torn, good)

    opened = RunDir.open(where)
    assert opened.config == config and opened.keep_checkpoints == 2
    latest = opened.latest_checkpoint()
    assert latest is not None and opened.read_checkpoint(latest) == _state(30)
    opened.rewind(20)
    assert storage.list_dir(opened.checkpoints) == ["step-0000020", "step-0000030"]
    metrics = storage.read_text(storage.join(where, "metrics.jsonl")).splitlines()
    assert [json.loads(x)["step"] for x in metrics] == [5, 10, 15, 20]
    opened.metrics({"step": 25, "loss": 2.0})  # appends after the rewind
    decisions = storage.read_text(storage.join(where, "decisions.jsonl")).splitlines()
    assert [json.loads(x)["step"] for x in decisions] == [0, 9, 10, 14]
    assert json.loads(storage.read_text(storage.join(where, "metrics.jsonl")).splitlines()[-1]) == {
        "step": 25,
        "loss": 2.0,
    }

    # The student restores from storage (downloaded on its node), hashes checked first.
    fresh = _trainer(tmp_path, config)
    assert fresh.restore(latest) == 10
    got = fresh.model.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    storage.write_bytes(storage.join(latest, "student_optim.pt"), b"x" * len(good))
    with pytest.raises(RunDirError, match=r"student_optim.pt is missing or differs"):
        fresh.restore(latest)

    student.save_pretrained(opened.student_dir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(
        storage.list_dir(opened.student_dir())
    )


def test_a_torn_local_jsonl_line_is_dropped_on_rewind(tmp_path, tiny_config):
    run = RunDir.create(tmp_path / "run", tiny_config())
    run.metrics({"step": 5})
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "lo')  # a crash mid-append
    run.rewind(10)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"step": 5}\n'


def test_resume_refuses_what_is_not_a_run(where):
    with pytest.raises(RunDirError, match=r"not a run directory.*--out location of an earlier"):
        RunDir.open(where)


# ---------------------------------------------------------------------------- models


def test_models_are_published_once_and_fetched_into_a_node_cache(where, tmp_path, monkeypatch):
    monkeypatch.setenv("CLPD_MODEL_CACHE", str(tmp_path / "node-cache"))
    model = tmp_path / "teacher"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    dest = storage.join(where, "models", "t0")
    assert models_store.publish(model, dest) == dest
    index = storage.join(dest, models_store.INDEX)
    first = storage.read_text(index)
    storage.write_text(storage.join(dest, "marker"), "kept")  # a second publish uploads nothing
    models_store.publish(model, dest)
    assert storage.read_text(storage.join(dest, "marker")) == "kept"
    (model / "model.safetensors").write_bytes(b"new weights")  # changed content: uploaded again
    models_store.publish(model, dest)
    assert not storage.exists(storage.join(dest, "marker")) and storage.read_text(index) != first

    local = models_store.fetch(dest)
    if storage.is_s3(dest):
        digest = json.loads(storage.read_text(index))["sha256"]
        assert local == str(tmp_path / "node-cache" / digest[:32])
        assert (Path(local) / "model.safetensors").read_bytes() == b"new weights"
        assert models_store.fetch(dest) == local  # cached
    else:
        assert local == dest  # a local run directory is read in place
    assert models_store.fetch("gpt2") == "gpt2"  # a hub id: as given
