"""Resume integrity (issue 15): damaged checkpoints, edited configs, changed model weights, the
run directory's lock, and full or read-only storage. Each refusal exits 2 with one line naming
what is wrong and the fix, and leaves the run directory byte for byte as it was. No Ray."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from checkpoint_files import controller_state, rehash, write_checkpoint
from conftest import TWO_RUNGS

from clpd_ray.cli import main
from clpd_ray.errors import ModelLoadError, RunDirError
from clpd_ray.runtime import resume, storage
from clpd_ray.runtime.identity import (
    check_models_unchanged,
    config_changes,
    model_fingerprint,
)
from clpd_ray.runtime.lock import LOCK_FILE, run_lock
from clpd_ray.runtime.rundir import RunDir
from clpd_ray.runtime.verify import choose_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _run(path: Path, config, steps: tuple[int, ...] = (5,)) -> Path:
    """A run directory made as a run makes it, stopped after checkpoints at ``steps``."""
    RunDir.create(path, config, models={})
    (path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (5, 7)))
    for step in steps:
        write_checkpoint(path, step)
    return path


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:07d}"


def _refused(capsys, code: int, needles: list[str]) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.count("clpd: error:") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# ---------------------------------------------------------------------- damaged checkpoints


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-20])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00garbage, not what was written" * 3)


def _drop_key(path: Path) -> None:
    state = json.loads(path.read_text())
    del state["stage_ranges"]
    path.write_text(json.dumps(state))


# (file, damage, what the hashes report, what the deeper checks report once hashes match)
DAMAGE = {
    "truncated student.safetensors": (
        "student.safetensors",
        _truncate,
        "student.safetensors has",
        "student.safetensors does not open with safetensors (SafetensorError",
    ),
    "garbage student_optim.pt": (
        "student_optim.pt",
        _garbage,
        "student_optim.pt has",
        "student_optim.pt does not load with torch.load(weights_only=True) (UnpicklingError",
    ),
    "truncated student_optim.pt": (
        "student_optim.pt",
        _truncate,
        "student_optim.pt has",
        "student_optim.pt does not load with torch.load(weights_only=True) (OSError",
    ),
    "garbage student.json": (
        "student.json",
        _garbage,
        "student.json has",
        "student.json is not valid JSON",
    ),
    "controller.json missing a key": (
        "controller.json",
        _drop_key,
        "controller.json",
        "controller.json lacks 'stage_ranges', which a resume needs",
    ),
}


@pytest.mark.parametrize("rehashed", [False, True], ids=["manifest-stale", "manifest-rewritten"])
@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_only_checkpoint_is_refused_before_anything_changes(
    tmp_path, capsys, tiny_config, case, rehashed
):
    name, damage, by_hash, by_content = DAMAGE[case]
    run = _run(tmp_path / "run", tiny_config())
    damage(_ckpt(run, 5) / name)
    if rehashed:  # the manifest vouches for the damaged file: only the content checks see it
        rehash(_ckpt(run, 5), name)
    before = _snapshot(run)
    err = _refused(
        capsys,
        main(["run", "--resume", str(run)]),
        [
            "no checkpoint can be resumed from",
            "step-0000005 is incomplete or damaged",
            by_content if rehashed else by_hash,
            "delete it to start the run again from step 0",
        ],
    )
    assert "weights_only=False" not in err  # torch's advice to run the pickle is not repeated
    assert _snapshot(run) == before


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before_with_a_warning(
    tmp_path, tiny_config, caplog
):
    run = _run(tmp_path / "run", tiny_config(), steps=(5, 10))
    _garbage(_ckpt(run, 10) / "student_optim.pt")
    rehash(_ckpt(run, 10), "student_optim.pt")
    (run / "checkpoints" / "step-0000015").mkdir()  # an uncommitted leftover: no warning
    before = _snapshot(run)
    run_dir = RunDir.open(run)
    with caplog.at_level(logging.WARNING):
        plan = resume.check_start(run_dir)
    assert plan.step == 5 and plan.choice.checkpoint == str(_ckpt(run, 5))
    warned = [r.getMessage() for r in caplog.records if "cannot be resumed from" in r.getMessage()]
    assert len(warned) == 1 and "step-0000010" in warned[0] and "UnpicklingError" in warned[0]
    assert f"using the one before it, {_ckpt(run, 5)}" in warned[0]
    assert _snapshot(run) == before  # the checks only read

    resume.commit(run_dir, plan)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000005"]
    (row,) = [json.loads(x) for x in (run / "resumes.jsonl").read_text().splitlines()]
    assert row["from_step"] == 5 and row["config_changes"] == {}
    assert row["skipped_checkpoints"][0]["checkpoint"] == str(_ckpt(run, 10))
    assert "UnpicklingError" in row["skipped_checkpoints"][0]["problem"]
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [5]


def test_a_run_without_checkpoints_resumes_from_step_0_and_a_good_one_is_used(
    tmp_path, tiny_config
):
    run = _run(tmp_path / "run", tiny_config(), steps=())
    assert choose_checkpoint(RunDir.open(run)).step == 0
    write_checkpoint(run, 5)
    write_checkpoint(run, 10)
    choice = choose_checkpoint(RunDir.open(run))
    assert (choice.step, choice.skipped) == (10, ())


def test_a_checkpoint_of_another_format_version_or_step_is_refused(tmp_path, tiny_config):
    run = _run(tmp_path / "run", tiny_config())
    ckpt = _ckpt(run, 5)
    state = {**controller_state(5), "version": 99}
    (ckpt / "controller.json").write_text(json.dumps(state))
    rehash(ckpt, "controller.json")
    with pytest.raises(RunDirError, match=r"format version 99; this clpd reads version 1"):
        choose_checkpoint(RunDir.open(run))
    (ckpt / "controller.json").write_text(json.dumps(controller_state(6)))
    rehash(ckpt, "controller.json")
    with pytest.raises(RunDirError, match=r"controller.json is the state of step 6, not of step 5"):
        choose_checkpoint(RunDir.open(run))


@pytest.mark.parametrize(
    ("manifest", "needle"),
    [
        ("{not json", "an unreadable manifest.json"),
        ('{"step": 5, "files": ["student.safetensors"]}', "'files' is not an object of objects"),
        ('{"step": 6, "files": {}}', "manifest.json is for step 6, not this directory's"),
    ],
)
def test_a_damaged_manifest_is_named_not_a_traceback(tmp_path, tiny_config, manifest, needle):
    run = _run(tmp_path / "run", tiny_config())
    (_ckpt(run, 5) / "manifest.json").write_text(manifest)
    with pytest.raises(RunDirError, match=re.escape(needle)):
        choose_checkpoint(RunDir.open(run))


def test_checkpoints_in_s3_are_verified_the_same_way(s3_bucket, tiny_config, caplog):
    uri = s3_bucket + "/run"
    RunDir.create(uri, tiny_config(), models={})
    write_checkpoint(uri, 5)
    write_checkpoint(uri, 10)
    weights = storage.join(uri, "checkpoints", "step-0000010", "student.safetensors")
    storage.write_bytes(weights, storage.read_bytes(weights)[:-8])
    rehash(storage.join(uri, "checkpoints", "step-0000010"), "student.safetensors")
    with caplog.at_level(logging.WARNING):
        choice = choose_checkpoint(RunDir.open(uri))
    assert choice.step == 5 and "SafetensorError" in choice.skipped[0][1]


# ---------------------------------------------------------------------- edited config.yaml


def _edit(run: Path, **changes) -> None:
    raw = yaml.safe_load((run / "config.yaml").read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = raw
        for p in parents:
            node = node[p]
        node[leaf] = value
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ({"seed": 7}, "seed: 0 -> 7"),
        ({"scheduler__policy": "standard_kd"}, "scheduler.policy: 'clpd' -> 'standard_kd'"),
        ({"scheduler__kwargs": {"patience": 3}}, "scheduler.kwargs.patience: '(absent)' -> 3"),
        ({"scheduler__probe_every": 20}, "scheduler.probe_every: 10 -> 20"),
        ({"train__total_steps": 60}, "train.total_steps: 30 -> 60"),
        ({"train__log_every": 10}, "train.log_every: 5 -> 10"),
        ({"task__train_size": 400}, "task.train_size: 300 -> 400"),
        ({"student__n_embd": 32}, "student.n_embd: 16 -> 32"),
        ({"distill__temperature": 2.0}, "distill.temperature: 1.0 -> 2.0"),
        ({"curriculum__num_stages": 2}, "curriculum.num_stages: 3 -> 2"),
    ],
)
def test_config_edits_that_change_the_run_are_refused_before_anything_changes(
    tmp_path, capsys, tiny_config, edit, needle
):
    run = _run(tmp_path / "run", tiny_config())
    _edit(run, **edit)
    before = _snapshot(run)
    _refused(
        capsys,
        main(["run", "--resume", str(run)]),
        ["config.yaml was edited since the run started", needle, "run.json", "clpd run CONFIG"],
    )
    assert _snapshot(run) == before


def test_a_teacher_edit_names_each_changed_key(tmp_path, capsys, tiny_config):
    run = _run(tmp_path / "run", tiny_config())
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["teachers"]["ladder"][1]["train_steps"] = 11
    raw["train"]["batch_size"] = 4
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    _refused(
        capsys,
        main(["run", "--resume", str(run)]),
        ["teachers.ladder.1.train_steps: 10 -> 11", "train.batch_size: 8 -> 4"],
    )


def test_harmless_config_edits_are_allowed_and_recorded(tmp_path, tiny_config, caplog):
    run = _run(tmp_path / "run", tiny_config())
    _edit(run, cluster__num_cpus=3, train__keep_checkpoints=5, scheduler__timeout_s=60.0)
    run_dir = RunDir.open(run)
    plan = resume.check_start(run_dir)
    assert plan.config_changes == {
        "cluster.num_cpus": [None, 3],
        "scheduler.timeout_s": [300.0, 60.0],
        "train.keep_checkpoints": [2, 5],
    }
    with caplog.at_level(logging.WARNING):
        resume.commit(run_dir, plan)
    assert "cluster.num_cpus: None -> 3" in caplog.text
    (row,) = [json.loads(x) for x in (run / "resumes.jsonl").read_text().splitlines()]
    assert row["config_changes"]["train.keep_checkpoints"] == [2, 5]
    assert row["pid"] == os.getpid() and row["checkpoint"] == str(_ckpt(run, 5))


def test_config_changes_split_harmless_from_refused_keys():
    old = {"seed": 0, "cluster": {"num_cpus": None}, "teachers": {"ladder": [{"name": "a"}]}}
    new = {"seed": 0, "cluster": {"num_cpus": 2}, "teachers": {"ladder": [{"name": "b"}, {}]}}
    refused, allowed = config_changes(old, new)
    assert allowed == {"cluster.num_cpus": (None, 2)}
    assert refused == {"teachers.ladder.0.name": ("a", "b"), "teachers.ladder.1": ("(absent)", {})}


def test_a_run_from_before_run_json_resumes_with_a_warning_and_gets_one(
    tmp_path, tiny_config, caplog
):
    run = _run(tmp_path / "run", tiny_config())
    (run / "run.json").unlink()
    run_dir = RunDir.open(run)
    with caplog.at_level(logging.WARNING):
        plan = resume.check_start(run_dir)
    assert "has no run.json" in caplog.text and plan.step == 5
    resume.commit(run_dir, plan)
    assert json.loads((run / "run.json").read_text())["config"] == tiny_config().to_dict()


# ---------------------------------------------------------------------- model fingerprints


def _save_model(path: Path, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    save_file(
        {"w": torch.randn(4, generator=torch.Generator().manual_seed(seed))},
        path / "model.safetensors",
    )


def test_fingerprints_cover_the_weights_and_name_a_changed_model(tmp_path):
    _save_model(tmp_path / "t", seed=0)
    then = model_fingerprint(tmp_path / "t")
    (tmp_path / "t" / "config.json").write_text('{"edited": true}')  # not weights
    assert model_fingerprint(tmp_path / "t") == then
    _save_model(tmp_path / "t", seed=1)
    now = model_fingerprint(tmp_path / "t")
    assert now["sha256"] != then["sha256"]
    with pytest.raises(ModelLoadError) as err:
        check_models_unchanged("RUN", {"teacher t": then}, {"teacher t": now})
    msg = str(err.value)
    assert f"teacher t at {tmp_path / 't'}" in msg and then["sha256"][:16] in msg
    assert now["sha256"][:16] in msg and "Restore the original weights" in msg
    check_models_unchanged("RUN", {"teacher t": then}, {"teacher t": then})
    hub = model_fingerprint("no-such-org/no-such-model-xyz")  # not cached: nothing to compare
    assert hub["sha256"] is None and hub["hub_id"] == "no-such-org/no-such-model-xyz"
    check_models_unchanged("RUN", {"student": hub}, {"student": then})


def test_resume_refuses_a_teacher_whose_cached_weights_changed(
    tmp_path, capsys, tiny_config, ladder_cache
):
    """The issue's case: a teacher's cache entry replaced by other weights under the same key."""
    from clpd_ray.runtime.identity import model_fingerprints
    from clpd_ray.runtime.models_store import localise
    from clpd_ray.workload import build_workload

    config = tiny_config()
    # The session's tiny teachers, trained once; only their entries are copied (other tests
    # may be writing other entries into the shared cache meanwhile).
    cache = tmp_path / "cache"
    for entry in build_workload(config, progress=False).ladder:
        shutil.copytree(entry.path, cache / entry.path.relative_to(ladder_cache))
    config = tiny_config(f"teachers.cache_dir={cache}")
    workload = build_workload(config, progress=False)
    models = model_fingerprints(localise(config), [e.path for e in workload.ladder])
    run = tmp_path / "run"
    RunDir.create(run, config, models=models)
    t1 = workload.ladder[1].path
    shutil.copy(workload.ladder[2].path / "model.safetensors", t1 / "model.safetensors")
    before = _snapshot(run)
    _refused(
        capsys,
        main(["run", "--resume", str(run)]),
        [f"the weights of teacher t1 at {t1}", "changed since the run started", "Restore"],
    )
    assert _snapshot(run) == before


# ---------------------------------------------------------------------- the lock


def test_a_locked_run_directory_refuses_a_second_user_naming_the_holder(
    tmp_path, capsys, tiny_config
):
    run = _run(tmp_path / "run", tiny_config())
    before = _snapshot(run)
    with run_lock(str(run)):
        holder = json.loads((run / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid()
        with (
            pytest.raises(RunDirError, match=rf"in use by pid {os.getpid()} on host \S+, started"),
            run_lock(str(run)),
        ):
            pass
        _refused(
            capsys,
            main(["run", "--resume", str(run)]),
            [f"run directory {run} is in use by pid {os.getpid()}", "wait for that run to end"],
        )
    assert _snapshot(run) == before  # released: the lock file is gone
    with run_lock(str(run)):
        pass


def test_a_new_run_directory_made_by_the_lock_is_removed_if_nothing_was_written(tmp_path):
    with pytest.raises(RuntimeError), run_lock(str(tmp_path / "new")):
        raise RuntimeError("the run failed before writing anything")
    assert not (tmp_path / "new").exists()
    RunDir.check_new(tmp_path / "new")


def test_a_new_run_is_created_under_its_own_lock(tmp_path, tiny_config):
    out = tmp_path / "new"
    with run_lock(str(out)):
        RunDir.check_new(out)  # the lock file alone does not make --out taken
        RunDir.create(out, tiny_config(), models={"teacher t0": {"path": "p", "sha256": "ab"}})
        with pytest.raises(RunDirError, match=r"in use by pid"), run_lock(str(out)):
            pass  # a racing `clpd run --out` with the same directory
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml", "run.json"]
    identity = json.loads((out / "run.json").read_text())
    assert identity["config"] == tiny_config().to_dict()
    assert identity["models"] == {"teacher t0": {"path": "p", "sha256": "ab"}}
    with pytest.raises(RunDirError, match="already exists and is not empty"):
        RunDir.check_new(out)


def test_the_lock_of_a_killed_process_is_free_at_once(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom clpd_ray.runtime.lock import run_lock\n"
            f"with run_lock({str(run)!r}):\n    print('held', flush=True)\n    time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=rf"in use by pid {holder.pid}"), run_lock(str(run)):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / LOCK_FILE).exists()  # left by the killed process, but not held
    with run_lock(str(run)):
        pass


def test_an_s3_lock_names_its_holder_and_a_stale_one_is_taken_over(s3_bucket):
    uri = s3_bucket + "/run"
    with (
        run_lock(uri, settle_s=0.01),
        pytest.raises(RunDirError, match=rf"in use by pid {os.getpid()} on host"),
        run_lock(uri, settle_s=0.01),
    ):
        pass
    assert not storage.exists(storage.join(uri, LOCK_FILE))  # released
    # A holder that died: its heartbeat stops, and after stale_s the lock is taken over.
    with run_lock(uri, settle_s=0.01, heartbeat_s=0.05):
        time.sleep(0.2)
        beat = json.loads(storage.read_text(storage.join(uri, LOCK_FILE)))["heartbeat"]
        assert time.time() - beat < 0.2  # the heartbeat runs
    stale = {"host": "gone", "pid": 1, "started": "then", "heartbeat": time.time() - 5}
    storage.write_text(storage.join(uri, LOCK_FILE), json.dumps(stale))
    with (
        pytest.raises(RunDirError, match="in use by pid 1 on host gone"),
        run_lock(uri, settle_s=0.01, stale_s=60),
    ):
        pass
    with run_lock(uri, settle_s=0.01, stale_s=2):
        mine = json.loads(storage.read_text(storage.join(uri, LOCK_FILE)))
        assert mine["pid"] == os.getpid()
    # A holder on this machine whose process is gone (a killed driver): taken over at once.
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    storage.write_text(
        storage.join(uri, LOCK_FILE),
        json.dumps({**mine, "pid": int(gone.stdout), "heartbeat": time.time(), "token": "x"}),
    )
    with run_lock(uri, settle_s=0.01):
        pass


# ---------------------------------------------------------------------- full / read-only disks


def _can_mount() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt && umount /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(
    not _can_mount(),
    reason="needs root and `unshare -m` with mount permission (a private mount namespace) to "
    "make a full (tmpfs) or read-only (bind, remount ro) directory; root ignores chmod",
)


def _in_namespace(setup: str, script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (Python) after the shell ``setup`` in a private mount namespace: mounts
    vanish with it, so nothing needs unmounting even if the test fails."""
    code = textwrap.dedent(script)
    return subprocess.run(
        ["unshare", "-m", "sh", "-ec", f'{setup}\nexec "{sys.executable}" -c "$0"', code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"},
    )


@needs_mount
def test_a_full_disk_gives_a_storage_error_and_leaves_nothing_half_written(
    tmp_path, tiny_config, big_src
):
    disk = tmp_path / "disk"
    disk.mkdir()
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_config().to_dict()))
    out = _in_namespace(
        f"mount -t tmpfs -o size=64k tmpfs {disk}",
        f"""
        import os
        from pathlib import Path
        from clpd_ray.config import load_config
        from clpd_ray.errors import StorageError
        from clpd_ray.runtime import storage
        from clpd_ray.runtime.rundir import RunDir
        disk = Path({str(disk)!r})
        big = os.urandom(200_000)
        for call in (
            lambda: storage.write_bytes(str(disk / "w.bin"), big),
            lambda: storage.upload_dir({str(tmp_path)!r} + "/src", str(disk / "up")),
        ):
            try:
                call()
            except StorageError as err:
                print("ERR", err)
        storage.write_text(str(disk / "m.jsonl"), "row\\n")
        try:
            storage.append_text(str(disk / "m.jsonl"), "x" * 200_000)
        except StorageError as err:
            print("ERR", err)
        print("APPENDED", repr((disk / "m.jsonl").read_text()))
        with open(disk / "filler", "wb") as f:  # fill the disk, then try to make a run
            try:
                f.write(b"f" * 200_000)
            except OSError:
                pass
        try:
            RunDir.create(str(disk / "run"), load_config({str(tmp_path / "c.yaml")!r}))
        except StorageError as err:
            print("ERR", err)
        print("LEFT", sorted(p.name for p in disk.rglob("*")))
        """,
    )
    assert out.returncode == 0, out.stderr
    errors = [x for x in out.stdout.splitlines() if x.startswith("ERR")]
    assert len(errors) == 4, out.stdout
    assert all("the disk is full: free space there" in e for e in errors), errors
    assert f"cannot write {disk}/w.bin: [Errno 28] No space left on device" in errors[0]
    assert f"cannot upload to {disk}/up/big.bin" in errors[1]
    assert f"cannot append to {disk}/m.jsonl" in errors[2]
    assert f"{disk}/run/" in errors[3]
    assert "APPENDED 'row\\n'" in out.stdout  # cut back: no partial row
    left = out.stdout.split("LEFT ")[1]
    assert left.strip() in ("['filler', 'm.jsonl', 'run', 'up']", "['filler', 'm.jsonl', 'up']")
    assert ".tmp" not in left and "big.bin" not in left and "config.yaml" not in left


@pytest.fixture
def big_src(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "big.bin").write_bytes(os.urandom(200_000))


@needs_mount
def test_resume_of_a_read_only_run_directory_exits_2_naming_the_path(tmp_path, tiny_config):
    run = _run(tmp_path / "run", tiny_config())
    before = _snapshot(run)
    out = _in_namespace(
        f"mount --bind {run} {run}\nmount -o remount,ro,bind {run}",
        f"""
        import sys
        from clpd_ray.errors import StorageError
        from clpd_ray.runtime import storage
        try:
            storage.write_text({str(run / "summary.json")!r}, "{{}}")
        except StorageError as err:
            print("ERR", err)
        from clpd_ray.cli import main
        sys.exit(main(["run", "--resume", {str(run)!r}]))
        """,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"ERR cannot write {run}/summary.json: [Errno 30] Read-only file system" in out.stdout
    assert "the filesystem is read-only: choose a writable location" in out.stdout
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("clpd: error:")]
    assert f"{run}/{LOCK_FILE}" in line and "the filesystem is read-only" in line, out.stderr
    assert "Traceback" not in out.stderr
    assert _snapshot(run) == before


# ---------------------------------------------------------------------- end to end (Ray)


@pytest.mark.slow
@pytest.mark.ray
def test_a_resume_past_a_damaged_checkpoint_ends_with_the_uninterrupted_student(
    ray_cluster, tiny_config, uninterrupted, tmp_path, caplog
):
    """A driver that died after its checkpoint at step 30, which was then damaged (its manifest
    rewritten to match): the resume warns, replays from step 20 and ends where a run that never
    stopped ends. The lock is released and the resume recorded. (The uninterrupted run is the
    one the fault tests share.)"""
    from test_faults import FAULT_RUN, assert_same_run

    from clpd_ray.runtime.run import resume_distillation

    config = tiny_config(*FAULT_RUN, **TWO_RUNGS)
    reference = uninterrupted(config)
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == [
        "step-0000020",
        "step-0000030",
    ]
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "student")  # the driver died before the end
    (run / "summary.json").unlink()
    _garbage(_ckpt(run, 30) / "student_optim.pt")
    rehash(_ckpt(run, 30), "student_optim.pt")
    with caplog.at_level(logging.WARNING):
        summary = resume_distillation(run, progress=False)
    assert "step-0000030 cannot be resumed from: student_optim.pt does not load" in caplog.text
    assert summary["resumed_from_step"] == 20
    assert_same_run(run, reference)
    assert not (run / LOCK_FILE).exists()
    (row,) = [json.loads(x) for x in (run / "resumes.jsonl").read_text().splitlines()]
    assert row["from_step"] == 20 and len(row["skipped_checkpoints"]) == 1
