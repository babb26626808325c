"""A separate Ray head (``ray start --head --block``) for the tests that need a dashboard-enabled
cluster: the job server (tests/test_job_submit.py) and the Prometheus/Grafana files Ray writes
into its session directory (tests/test_dashboard.py). The session ``ray_cluster`` fixture runs
without a dashboard, so neither exists there.

The head gets its own temp dir (so it never touches /tmp/ray/session_latest or
ray_current_cluster of other clusters), free ports for everything Ray listens on, token
authentication with its own token, and its own process group: :meth:`RayHead.stop` ends exactly
the processes it started (never ``ray stop``, which ends every Ray cluster of the user).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["RayHead", "free_port", "start_head"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RayHead:
    proc: subprocess.Popen
    temp_dir: Path
    gcs_address: str
    dashboard_url: str
    metrics_port: int
    token: str
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def session_dir(self) -> Path:
        return self.temp_dir / "session_latest"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client_env(self) -> dict[str, str]:
        """Environment for a driver or CLI that joins this cluster (token auth on)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(self.env)
        env["RAY_ADDRESS"] = self.gcs_address
        return env

    def stop(self) -> None:
        """End the head and everything it spawned (its process group), then remove its files."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        # Stragglers of the group (workers that outlived the head): by group id, which is ours.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_head(*, num_cpus: int = 2, extra_env: dict[str, str] | None = None) -> RayHead:
    """Start a token-auth head with a dashboard on 127.0.0.1; waits until its job server answers.

    Raises RuntimeError with the head's log tail when it does not come up within 90 s."""
    # Short: Ray's unix sockets live under the temp dir (108-byte path limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="clpdh-", dir="/tmp"))
    token = secrets.token_hex(32)
    gcs, dash, metrics = free_port(), free_port(), free_port()
    env = {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        **(extra_env or {}),
    }
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    full_env.update(env)
    # The head's python is this interpreter's (the venv), so jobs find clpd_ray's dependencies.
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [
        ray_bin,
        "start",
        "--head",
        "--block",
        f"--temp-dir={temp_dir}",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--metrics-export-port={metrics}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--disable-usage-stats",
    ]
    log = temp_dir / "head.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
    head = RayHead(
        proc=proc,
        temp_dir=temp_dir,
        gcs_address=f"127.0.0.1:{gcs}",
        dashboard_url=f"http://127.0.0.1:{dash}",
        metrics_port=metrics,
        token=token,
        log=log,
        env=env,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            req = urllib.request.Request(f"{head.dashboard_url}/api/version", headers=head.headers)
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == 200 and (head.session_dir / "metrics").is_dir():
                    return head
        except OSError:
            pass
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    head.stop()
    raise RuntimeError(f"ray start --head did not come up within 90 s:\n{tail}")
