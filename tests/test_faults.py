"""Fault tolerance: killed actors, a killed driver and a lost node end with the same student.

The end-to-end tests compare the final student with an uninterrupted run of the same config,
``torch.equal`` on every tensor: on CPU with fixed seeds recovery is exact, not merely close.
The fast tests at the top check the pieces (student checkpoints, scheduler state, run-directory
rewind, Ray settings) in-process.

Run as a script (``python tests/test_faults.py node-loss CONFIG OUT HIDE``) this file is the
node-loss scenario, which needs its own multi-node Ray cluster and so its own process.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ONE_RUNG, TINY_LADDER, TWO_RUNGS

REPO = Path(__file__).resolve().parents[1]
# 40 steps, a checkpoint every 10, two rungs (tiny_config(*FAULT_RUN, **TWO_RUNGS)); the
# adaptive policy's decisions depend on probe results, so an exact replay needs the probes
# restored too; the run's own target store, so a replay is served partly from it. The killed
# actors, damaged checkpoint and killed replica tests share its uninterrupted run.
FAULT_RUN = (
    "train.total_steps=40",
    "train.checkpoint_every=10",
    "scheduler.policy=adaptive",
    "scheduler.probe_every=10",
    "teachers.target_store=run",
)
# 30 steps on one teacher, a checkpoint every 5 (tiny_config(*NODE_RUN, **ONE_RUNG)): the run of
# the driver and node faults (a SIGKILLed driver, a SIGTERM to the process group, a lost node),
# which start a Ray of their own or a node per run; they share its uninterrupted run.
NODE_RUN = ("train.total_steps=30", "train.checkpoint_every=5", "scheduler.policy=standard_kd")


# ---------------------------------------------------------------------------- helpers


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _student(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "student" / "model.safetensors"))


def assert_same_run(run: Path, reference: Path) -> None:
    """Same final student (every tensor equal), same decisions, same metrics values and steps."""
    a, b = _student(run), _student(reference)
    assert a.keys() == b.keys()
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"tensors differ from the uninterrupted run: {unequal}"
    assert _jsonl(run / "decisions.jsonl") == _jsonl(reference / "decisions.jsonl")
    keys = ("step", "stage", "teacher", "loss", "kd_loss", "ce_loss", "lr")
    metrics = [{k: m[k] for k in keys} for m in _jsonl(run / "metrics.jsonl")]
    assert metrics == [{k: m[k] for k in keys} for m in _jsonl(reference / "metrics.jsonl")]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == sorted(p.name for p in (reference / "checkpoints").iterdir())
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (run, reference))
    assert sa["stages"] == sb["stages"] and sa["student"] == sb["student"]


def _pid(handle) -> int:
    import ray

    return ray.get(handle.__ray_call__.remote(lambda self: os.getpid()))


def node_run(tiny_config, uninterrupted, tmp_path: Path) -> tuple[Path, Path, Path]:
    """The NODE_RUN config written to ``tmp_path/cfg.yaml`` for a driver of its own, that
    config's uninterrupted run, and an empty working directory for the driver: (cfg, reference,
    cwd)."""
    config = tiny_config(*NODE_RUN, **ONE_RUNG)
    reference = uninterrupted(config)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config.to_dict()))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cfg, reference, cwd


# ---------------------------------------------------------------------------- fast pieces


def _tiny_trainer(tmp_path, config):
    from clpd_ray.data.tokenizer import build_char_tokenizer
    from clpd_ray.runtime.actors.student import StudentTrainer

    tok_dir = tmp_path / "tok"
    if not tok_dir.exists():
        build_char_tokenizer().save_pretrained(tok_dir)
    return StudentTrainer(config, tok_dir, threads=1)


def _batches(n: int):
    from clpd_ray.data.batching import encode_examples
    from clpd_ray.data.task import generate_examples
    from clpd_ray.data.tokenizer import build_char_tokenizer
    from clpd_ray.messages import Batch

    tok = build_char_tokenizer()
    examples = generate_examples(8 * n, 3, 0, "train")
    out = []
    for i in range(n):
        e = encode_examples(tok, examples[8 * i : 8 * i + 8])
        out.append(
            Batch(i, 0, e.input_ids, e.attention_mask, e.loss_mask, example_ids=np.arange(8))
        )
    return out


def test_student_restore_continues_bit_for_bit(tmp_path, tiny_config):
    """Model, optimizer, LR schedule, RNG and step come back from a checkpoint exactly."""
    config = tiny_config("train.total_steps=6")
    batches = _batches(6)
    a = _tiny_trainer(tmp_path, config)
    for b in batches[:3]:
        a.train_step(b)
    a.checkpoint(tmp_path / "ckpt")
    rng_after_checkpoint = torch.get_rng_state()
    expected = [a.train_step(b) for b in batches[3:]]
    final = {k: v.clone() for k, v in a.model.state_dict().items()}

    b = _tiny_trainer(tmp_path, config)  # a restarted actor: __init__ again, then restore
    b.train_step(batches[0])  # state that restore must overwrite
    torch.manual_seed(123)
    assert b.restore(tmp_path / "ckpt") == 3
    assert torch.equal(torch.get_rng_state(), rng_after_checkpoint)
    got = [b.train_step(x) for x in batches[3:]]
    assert [r.loss for r in got] == [r.loss for r in expected]
    assert [r.lr for r in got] == [r.lr for r in expected]
    assert all(torch.equal(v, final[k]) for k, v in b.model.state_dict().items())
    assert b.step == 6

    # No checkpoint yet: restore(None) is a fresh start, the same as a new actor's.
    c = _tiny_trainer(tmp_path, config)
    b.restore(None)
    assert b.step == 0
    assert all(torch.equal(v, c.model.state_dict()[k]) for k, v in b.model.state_dict().items())


def test_scheduler_state_round_trip_gives_the_same_decisions(tmp_path, tiny_config):
    """A restarted scheduler loaded with the saved policy state decides as the original would."""
    from clpd_ray.messages import Observation, ProbeResult
    from clpd_ray.runtime.actors.scheduler import SchedulerService

    def service():
        return SchedulerService(
            "adaptive",
            {"min_steps_per_stage": 2},
            num_stages=3,
            teacher_names=["t0", "t1", "t2"],
            total_steps=40,
        )

    def obs(j: int, loss: float) -> Observation:
        probes = tuple(ProbeResult(s, loss + s, 0.5, (0.3, 0.2, 0.1)) for s in range(3))
        return Observation(
            step=j,
            total_steps=40,
            stage=0,
            num_stages=3,
            teacher=0,
            num_teachers=3,
            steps_in_stage=j,
            probe_step=j - 1 if j else None,
            probes=probes if j else (),
        )

    losses = [2.0, 1.9, 1.9, 1.9, 1.5, 1.5, 1.5, 1.5]
    a = service()
    for j in range(4):
        a.decide(obs(j, losses[j]))
    saved = json.loads(json.dumps(a.state_dict()))  # as controller.json holds it
    expected = [a.decide(obs(j, losses[j]))[0] for j in range(4, 8)]
    b = service()
    b.load_state_dict(saved)
    assert [b.decide(obs(j, losses[j]))[0] for j in range(4, 8)] == expected


def test_local_ray_keeps_auth_on_and_the_dashboard_on_localhost(tiny_config, monkeypatch):
    from clpd_ray.runtime.run import local_init_kwargs

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    kwargs = local_init_kwargs(tiny_config())
    assert kwargs["dashboard_host"] == "127.0.0.1"
    assert "RAY_AUTH_MODE" not in os.environ
    assert not any("auth" in str(k).lower() for k in kwargs)
    # The user may ask for another address, explicitly.
    assert local_init_kwargs(tiny_config("cluster.dashboard_host=0.0.0.0"))["dashboard_host"] == (
        "0.0.0.0"
    )


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _is_auth_key(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value == "RAY_AUTH_MODE"


def test_package_never_disables_auth_and_loads_weights_safely():
    """No source sets RAY_AUTH_MODE (only reads it); every torch.load is weights_only=True."""
    for path in sorted((REPO / "clpd_ray").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Subscript) and _is_auth_key(node.slice):
                assert isinstance(node.ctx, ast.Load), f"{where} sets RAY_AUTH_MODE"
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            args = [a.value for a in node.args if isinstance(a, ast.Constant)]
            if "RAY_AUTH_MODE" in args:
                assert name in ("os.environ.get", "os.getenv"), f"{where}: {name}(RAY_AUTH_MODE)"
            if name == "torch.load":
                kw = {k.arg: k.value for k in node.keywords}
                flag = kw.get("weights_only")
                assert isinstance(flag, ast.Constant) and flag.value is True, where
            assert name not in ("pickle.load", "pickle.loads"), where


# ---------------------------------------------------------------------------- end to end


@pytest.mark.ray
@pytest.mark.slow
def test_killed_teachers_student_and_scheduler_give_the_uninterrupted_result(
    ray_cluster, tiny_config, uninterrupted, tmp_path
):
    """Teachers (t0 three times: its restarts, TEACHER_MAX_RESTARTS, all used; then one of t1's
    two replicas, its requests in flight and its store writes perhaps half done), the scheduler
    and the student SIGKILLed during one run: it ends with the student, decisions and metrics of
    the uninterrupted run with one replica per teacher, bit for bit (CPU)."""
    import ray

    from clpd_ray.runtime.actors.launcher import NAMESPACE
    from clpd_ray.runtime.run import run_distillation

    reference = uninterrupted(tiny_config(*FAULT_RUN, **TWO_RUNGS))
    two_replicas = [TINY_LADDER[0], {**TINY_LADDER[1], "replicas": 2}]
    config = tiny_config(*FAULT_RUN, **{**TWO_RUNGS, "teachers": {"ladder": two_replicas}})
    decisions = _jsonl(reference / "decisions.jsonl")
    t1_from = next(d["step"] for d in decisions if d["teacher"] == "t1")  # the same step here
    out = tmp_path / "run"
    # step -> what to kill; each fires once (replayed steps call on_step again).
    plan = {3: "teacher", 7: "scheduler", 15: "teacher", 24: "student", 27: "teacher"}
    plan[t1_from + 3] = "teacher-t1-r1"  # t1's second replica, 3 steps into t1's stage
    killed: list[tuple[int, str, int]] = []

    def on_step(done: int) -> None:
        what = plan.pop(done, None)
        if what is None:
            return
        if what == "teacher":  # the teacher the latest decision uses: it has requests in flight
            what = f"teacher-{_jsonl(out / 'decisions.jsonl')[-1]['teacher']}"
        # Actor names carry the run id (student-<id>, teacher-<name>-<id>, a second replica
        # teacher-<name>-r1-<id>); one run at a time here.
        [name] = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == NAMESPACE and a["name"].startswith(f"{what}-")
        ]
        pid = _pid(ray.get_actor(name, namespace=NAMESPACE))
        os.kill(pid, signal.SIGKILL)
        killed.append((done, what, pid))

    summary = run_distillation(config, out, progress=False, on_step=on_step)

    assert not plan, f"kills not reached: {plan}"
    assert [w for _, w, _ in killed if w.startswith("teacher-")] == [
        "teacher-t0",
        "teacher-t0",
        "teacher-t0",
        "teacher-t1-r1",
    ]
    for _, _, pid in killed:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    # The student and scheduler failures each replayed from a checkpoint (the scheduler's, from
    # step 0: it failed before the first one); teacher failures were retried by Ray alone.
    assert summary["recoveries"] == 2
    assert_same_run(out, reference)
    # t1's store counts, summed over its replicas: the killed replica's new process counts from
    # zero, so the whole requests it had served before the kill (training batches of 8 rows, the
    # adaptive policy's probes of 4) are missing from the sum, and only those.
    counts = summary["target_store"]["t1"]
    ref_counts = json.loads((reference / "summary.json").read_text())["target_store"]["t1"]
    served, asked = (c["hits"] + c["misses"] for c in (counts, ref_counts))
    assert asked >= (config.train.total_steps - t1_from) * config.train.batch_size
    assert 0 < served <= asked and (asked - served) % config.scheduler.probe_size == 0
    assert (out / "targets").is_dir()  # teachers.target_store=run: in the run directory


def _session_pids(sid: int) -> list[int]:
    """Processes in session ``sid`` (a child started with start_new_session and its children)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == sid:
                    pids.append(int(d.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a child we started with start_new_session=True and everything it started."""
    for _ in range(3):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in _session_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait(timeout=30)
        time.sleep(0.5)
        if not _session_pids(proc.pid):
            return


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTEST_CURRENT_TEST")}
    env["RAY_DEDUP_LOGS"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.ray
@pytest.mark.slow
def test_lost_node_with_the_run_in_s3_gives_the_uninterrupted_result(
    ray_cluster, tiny_config, uninterrupted, tmp_path, s3_bucket, session_dir
):
    """A 3-node cluster (ray.cluster_utils.Cluster, in a subprocess) whose run directory lives
    only in S3. The teacher starts on a worker that cannot see the driver's files (its own mount
    namespace, an empty /tmp: no ladder cache, no test directories), so it loads its model from
    the run's storage. That node is killed mid-run; Ray restarts the teacher on the third node,
    and the run ends with the student of an uninterrupted run."""
    from clpd_ray.runtime import storage

    cfg, reference, cwd = node_run(tiny_config, uninterrupted, tmp_path)
    out = f"{s3_bucket}/run"
    proc = subprocess.Popen(
        # session_dir holds every test directory of the session, the config, the ladder cache
        # and the reference runs: the hidden worker sees none of it.
        [sys.executable, __file__, "node-loss", str(cfg), out, str(session_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_clean_env(),
        cwd=cwd,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        _kill_session(proc)
    assert proc.returncode == 0, output[-4000:]
    result = json.loads(output.strip().splitlines()[-1])
    assert result["steps"] == 30
    # The teacher ran on the node that cannot see the driver's disk, until that node died.
    assert result["teacher_node_before"] == result["hidden_node"] == result["removed_node"]
    assert result["teacher_node_after"] == result["other_node"]
    assert list(cwd.iterdir()) == [], "a local run directory was created"
    assert_same_run(storage.download_dir(out, tmp_path / "downloaded"), reference)


def _hidden_worker(address: str, hide: list[Path]) -> subprocess.Popen:
    """``ray start`` for a worker node in its own mount namespace where each directory of
    ``hide`` is an empty tmpfs: it sees none of the driver's temporary files (test directories,
    ladder cache, models cache), like a node with its own disk. Only those directories are
    hidden, not all of /tmp: the checkout and its virtual environment may live there (CI clones
    anywhere). Needs root (``unshare -m``)."""
    ray_bin = Path(sys.executable).parent / "ray"
    resources = json.dumps({"teacher_slot": 1})
    start = f"{ray_bin} start --address={address} --num-cpus=1 --resources='{resources}' --block"
    for d in hide:
        d.mkdir(parents=True, exist_ok=True)
    mounts = " && ".join(f"mount -t tmpfs tmpfs {shlex.quote(str(d))}" for d in hide)
    return subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", f"{mounts} && exec {start}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _node_loss(cfg: str, out: str, hide: str) -> None:
    """The node-loss scenario (run in its own process: one Ray connection per process); the
    hidden worker sees neither ``hide`` nor the node-local models cache."""
    import tempfile

    import ray
    from ray.cluster_utils import Cluster

    from clpd_ray.config import load_config
    from clpd_ray.runtime.run import run_distillation

    # Cluster() records its address for `ray.init(address="auto")`: put the old one back after.
    marker = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    saved = marker.read_text() if marker.exists() else None
    fast_health = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "resources": {"student_slot": 1},
            "include_dashboard": False,
            "_system_config": fast_health,
        },
    )
    # Hide the test session's directories (the config, ladder cache and test dirs: ``hide``) and
    # the node-local models cache.
    models_cache = Path(
        os.environ.get("CLPD_MODEL_CACHE", Path(tempfile.gettempdir()) / "clpd-models")
    )
    hidden = _hidden_worker(cluster.address, [Path(hide).resolve(), models_cache])
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        deadline = time.monotonic() + 120
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert hidden.poll() is None and time.monotonic() < deadline, "hidden worker failed"
            time.sleep(0.5)
        head = ray.get_runtime_context().get_node_id()
        events: dict = {
            "hidden_node": next(n["NodeID"] for n in ray.nodes() if n["NodeID"] != head)
        }

        def teacher_node() -> str:
            name, ns = next(
                (a["name"], a["namespace"])
                for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("teacher-t0")
            )
            t = ray.get_actor(name, namespace=ns)
            return ray.get(
                t.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
            )

        def on_step(done: int) -> None:
            if done == 2 and "other_node" not in events:  # the node the teacher moves to
                events["other_node"] = cluster.add_node(
                    num_cpus=1, resources={"teacher_slot": 1}
                ).node_id
            if done == 5 and "removed_node" not in events:
                events["teacher_node_before"] = teacher_node()
                _kill_session(hidden)
                events["removed_node"] = events["hidden_node"]
            if done == 15 and "teacher_node_after" not in events:
                events["teacher_node_after"] = teacher_node()

        summary = run_distillation(load_config(cfg), out, progress=False, on_step=on_step)
        events["steps"] = summary["steps"]
        events["recoveries"] = summary["recoveries"]
        print(json.dumps(events))
    finally:
        ray.shutdown()
        _kill_session(hidden)
        cluster.shutdown()
        if saved is not None:
            marker.write_text(saved)
        elif marker.exists():
            marker.unlink()


if __name__ == "__main__":
    if sys.argv[1:2] == ["node-loss"] and len(sys.argv) == 5:
        _node_loss(*sys.argv[2:5])
    else:
        raise SystemExit("usage: python tests/test_faults.py node-loss CONFIG OUT HIDE")


def test_a_non_finite_step_is_not_applied_and_names_the_setting(tmp_path, tiny_config):
    """distill.temperature=1e-45 makes every loss NaN: the first such step stops the run (exit
    2 through ClpdError) instead of writing NaN into every weight."""
    from clpd_ray.errors import DivergedError
    from clpd_ray.messages import TeacherTargets

    config = tiny_config("distill.temperature=1e-45")
    trainer = _tiny_trainer(tmp_path, config)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    batch = _batches(1)[0]
    shape = (*batch.input_ids.shape, 4)
    rng = np.random.default_rng(0)
    targets = TeacherTargets(
        teacher="t0",
        step=0,
        logprobs=np.log(rng.dirichlet(np.ones(4), size=shape[:2])).astype(np.float32),
        ids=rng.integers(0, 10, size=shape),
        temperature=1e-45,
    )
    with pytest.raises(DivergedError, match=r"step 0: .* not finite.*distill\.temperature=1e-45"):
        trainer.train_step(batch, targets)
    assert trainer.step == 0
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    # A sane temperature trains on.
    ok = replace(targets, temperature=1.0)
    assert np.isfinite(trainer.train_step(batch, ok).loss) and trainer.step == 1
