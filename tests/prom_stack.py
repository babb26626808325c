"""A real Prometheus scraping a Ray head, and a short run on that head: shared by the dashboard
test (tests/test_dashboard.py: every panel's query returns data) and the screenshot script
(benchmarks/dashboard_screenshot.py: Prometheus' own UI graphing those queries).

    head = start_head(extra_env={"RAY_metrics_report_interval_ms": "1000"})   # tests/ray_head.py
    with prometheus_for(head, work) as base:          # http://127.0.0.1:<port>, scraping every 1 s
        run = run_on_head(head, config, work)         # `clpd run --address <head>` as a subprocess
        results = query_panels(base, run)             # each panel's query over the run

Prometheus is Debian's ``prometheus`` binary, started on 127.0.0.1 with the ``prometheus.yml``
Ray writes into its session directory (only the intervals rewritten), in its own process group.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from clpd_ray.config import Config
from clpd_ray.runtime import dashboard as dash

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ShortRun", "prom_get", "prometheus_for", "query_panels", "run_on_head"]


@dataclass(frozen=True)
class ShortRun:
    summary: dict
    run_id: str
    start: float  # epoch seconds, before the run was started
    end: float  # epoch seconds, after its last metrics were exported and scraped
    out: Path


def prom_get(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


@contextmanager
def prometheus_for(head: Any, work: Path, *, interval: str = "1s") -> Iterator[str]:
    """Prometheus with the head's own prometheus.yml, scraping every ``interval``; yields its
    base URL and ends it (its process group) on exit. Asserts Ray's file_sd layout."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        raise FileNotFoundError("prometheus is not installed (apt-get install -y prometheus)")
    from ray_head import free_port  # tests/ray_head.py

    session = head.session_dir.resolve()
    ray_yml = yaml.safe_load((session / "metrics" / "prometheus" / "prometheus.yml").read_text())
    sd_files = ray_yml["scrape_configs"][0]["file_sd_configs"][0]["files"]
    assert sd_files == [str(session / "prom_metrics_service_discovery.json")]
    ray_yml["global"].update(scrape_interval=interval, evaluation_interval=interval)
    work.mkdir(parents=True, exist_ok=True)
    (work / "prometheus.yml").write_text(yaml.safe_dump(ray_yml))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with open(work / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [
                prometheus,
                f"--config.file={work / 'prometheus.yml'}",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--storage.tsdb.path={work / 'tsdb'}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, (work / "prometheus.log").read_text()
                time.sleep(0.5)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)


def run_on_head(head: Any, config: Config, work: Path, *, settle_s: float = 4.0) -> ShortRun:
    """``clpd run`` of ``config`` as a driver joining ``head``; waits ``settle_s`` after it for
    the last export and scrape."""
    (work / "run.yaml").write_text(yaml.safe_dump(config.to_dict()))
    out = work / "run"
    start = time.time()
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "clpd_ray.cli", "run", str(work / "run.yaml")),
            *("--out", str(out), "--address", head.gcs_address),
        ],
        env=head.client_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    time.sleep(settle_s)
    return ShortRun(summary, summary["run_id"], start, time.time(), out)


def query_panels(
    base: str, run: ShortRun, *, rate_interval: str = "10s"
) -> dict[dash.PanelQuery, list[dict]]:
    """Each panel query of the shipped dashboard over the run, as Prometheus returns it."""
    results = {}
    for q in dash.panel_queries():
        expr = dash.render_expr(q.expr, run.run_id, rate_interval=rate_interval)
        res = prom_get(
            base,
            "/api/v1/query_range",
            query=expr,
            start=f"{run.start - 5:.3f}",
            end=f"{run.end:.3f}",
            step="1",
        )
        assert res["status"] == "success", (q, res)
        results[q] = res["data"]["result"]
    return results
