"""`clpd run` submitted as a Ray job (JobSubmissionClient, token auth, the project as the
runtime_env working_dir) to a separate `ray start --head` cluster: it finishes with a complete run
directory, and `ray job stop` ends a longer one at a step boundary with a checkpoint that
`clpd run --resume` continues (the SIGTERM path of runtime/stopping.py).

The session `ray_cluster` fixture has no dashboard, hence no job server: these tests start their
own head (tests/ray_head.py) and end only its processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ONE_RUNG
from ray_head import RayHead, start_head  # tests/ray_head.py (tests/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# The runtime_env working_dir: the checkout without what a job does not need (Ray also skips
# what .gitignore lists, .venv and caches included).
EXCLUDES = [".git", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache", "runs", "benchmarks"]
# Ray's job supervisor sends SIGTERM on `ray job stop` and SIGKILL 3 s later by default: a run
# needs longer to write its stop checkpoint (docs/cluster.md).
STOP_WAIT_S = "60"


def _client(head: RayHead):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.dashboard_url, headers=head.headers)


def _config(tiny_config, path: Path, *overrides: str) -> Path:
    # sft (the student alone, no teacher actor): what is under test is the job around a run;
    # stops of runs with teachers are test_signals.py's.
    config = tiny_config("distill.objective=sft", *overrides, **ONE_RUNG)
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


def _submit(head: RayHead, config: Path, out: Path) -> str:
    # The job server answers before the head's dashboard agent has registered with it; until
    # then a submission fails with "No available agent to submit job, please try again later"
    # (seen on a loaded machine): try again, as the message says, for up to a minute.
    deadline = time.monotonic() + 60
    while True:
        try:
            return _client(head).submit_job(
                # `clpd run` in the job: RAY_ADDRESS (set by Ray for the entrypoint) is the
                # cluster.
                entrypoint=f"python -m clpd_ray.cli run {config} --out {out}",
                runtime_env={
                    "working_dir": str(ROOT),
                    "excludes": EXCLUDES,
                    "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": STOP_WAIT_S, "PYTHONUNBUFFERED": "1"},
                },
            )
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def _wait(head: RayHead, job: str, timeout: float, until=None) -> str:
    from ray.job_submission import JobStatus

    client = _client(head)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            return str(status)
        if until is not None and until():
            return str(status)
        time.sleep(1)
    raise AssertionError(
        f"job {job} still {client.get_job_status(job)} after {timeout:g} s:\n"
        + client.get_job_logs(job)[-3000:]
    )


def test_ray_jobs_finish_or_stop_at_a_step_boundary_on_a_head_that_checks_tokens(
    tiny_config, tmp_path
):
    """One head, two jobs at once (their start-ups overlap): a short run finishes with a complete
    run directory; `ray job stop` ends a long one at a step boundary, resumable. A client with a
    wrong token is refused first."""
    from ray.job_submission import JobSubmissionClient

    from clpd_ray.runtime.rundir import RunDir

    head = start_head()
    try:
        with pytest.raises(Exception, match=r"401|[Uu]nauthori[sz]ed|[Aa]uthentication"):
            JobSubmissionClient(head.dashboard_url, headers={"Authorization": "Bearer wrong"})

        short, long = tmp_path / "short", tmp_path / "long"
        over = ("train.total_steps=20", "train.checkpoint_every=10")
        short_job = _submit(head, _config(tiny_config, tmp_path / "short.yaml", *over), short)
        over = ("train.total_steps=3000", "train.checkpoint_every=1000")
        long_job = _submit(head, _config(tiny_config, tmp_path / "long.yaml", *over), long)

        # `ray job stop` once the long run has logged a row.
        metrics = long / "metrics.jsonl"
        _wait(head, long_job, 300, until=lambda: metrics.exists() and metrics.stat().st_size > 0)
        assert _client(head).stop_job(long_job)  # what `ray job stop` asks the job server
        status = _wait(head, long_job, timeout=120)
        logs = _client(head).get_job_logs(long_job)
        assert status == "STOPPED", logs[-3000:]
        m = re.search(
            r"clpd: stopped by SIGTERM at step (\d+); continue with: clpd run --resume (\S+)", logs
        )
        assert m, logs[-3000:]
        step, where = int(m.group(1)), m.group(2)
        assert 0 < step < 3000 and Path(where) == long
        # Resumable: a committed checkpoint at the stop step, the lock released, no summary.
        run = RunDir.open(long)
        latest = run.latest_checkpoint()
        assert latest is not None and run.read_checkpoint(latest)["step"] == step
        assert not (long / "summary.json").exists()
        status_out = subprocess.run(
            [sys.executable, "-m", "clpd_ray.cli", "status", str(long)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
            timeout=60,
        )
        assert status_out.returncode == 0, status_out.stderr
        assert f"clpd run --resume {long}" in status_out.stdout

        # The short run finished, in the uploaded working_dir, not in this checkout.
        status = _wait(head, short_job, timeout=300)
        logs = _client(head).get_job_logs(short_job)
        assert status == "SUCCEEDED", logs[-3000:]
        info = _client(head).get_job_info(short_job)
        assert info.runtime_env["working_dir"].startswith("gcs://"), info.runtime_env
        # The run directory is complete: config, rows, a checkpoint, the student, the summary.
        summary = json.loads((short / "summary.json").read_text())
        assert summary["steps"] == 20 and summary["recoveries"] == 0
        rows = [json.loads(x) for x in (short / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [5, 10, 15, 20]
        assert (short / "student" / "config.json").is_file()
        run = RunDir.open(short)
        latest = run.latest_checkpoint()
        assert latest is not None and run.read_checkpoint(latest)["step"] == 10
        assert summary["run_id"] in logs  # the run header went to the job's log
    finally:
        head.stop()
