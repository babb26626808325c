"""A real screenshot of the dashboard's queries on a real run: Prometheus' own web UI, rendered
by headless Chromium (docs/observability.md's picture; Grafana cannot be installed on the
project's machines: it is not in Debian main, nor on PyPI or npm).

What it does is what the slow test tests/test_dashboard.py does (with its helpers,
tests/prom_stack.py and tests/ray_head.py): a Ray head with its dashboard, ``clpd dashboard
install``, Debian's Prometheus scraping the head every second with the ``prometheus.yml`` Ray
writes, and a short tiny run (3 tiny teachers, the adaptive policy, so stage and teacher move)
as a driver joining that head. Then, while Prometheus still holds the data, headless Chromium
opens Prometheus' graph page (Debian ships its classic UI, ``/classic/graph``) with several of
the shipped dashboard's panel queries (``clpd_ray/runtime/grafana/clpd.json``, rendered with the
run's id, as Grafana would send them) and saves a tall PNG. Each query must return data first.

Needs ``prometheus`` and ``chromium`` (Debian packages; as root)::

    apt-get install -y prometheus chromium

    python benchmarks/dashboard_screenshot.py                    # -> docs/img/prometheus-panels.png
    python benchmarks/dashboard_screenshot.py --steps 300 --ray-metrics-tab /tmp/ray-metrics.png

``--ray-metrics-tab`` also captures the Ray dashboard's Metrics tab (it embeds Grafana's
panels; without a Grafana it has nothing to show).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from prom_stack import prometheus_for, query_panels, run_on_head  # noqa: E402 (tests/)
from ray_head import start_head  # noqa: E402

from clpd_ray.config import Config, config_from_dict  # noqa: E402
from clpd_ray.runtime import dashboard as dash  # noqa: E402

# (panel title, query ref) of the shipped dashboard, in the order they are drawn.
PANELS = [
    ("Student loss", "A"),
    ("Loss parts: KD and CE", "A"),  # the KD part
    ("Stage and teacher", "A"),  # the stage
    ("Stage and teacher", "C"),  # which teacher is active, by teacher
    ("Student tokens/s", "A"),
    ("Teacher latency p50 / p95", "B"),  # p95
    ("Probe loss by stage", "A"),  # (probe accuracy drew no curve for the tiny student)
]
_GRAPH_PX = 800  # window height per graph: the page must fit, or Chromium scrolls it
_RATE_INTERVAL = "10s"


def tiny_config(cache: Path, steps: int) -> Config:
    """The tests' tiny end-to-end config (tests/conftest.py) with a longer budget."""
    ladder = [
        {"name": "t0", "n_layer": 1, "n_embd": 16, "n_head": 2, "train_steps": 10},
        {"name": "t1", "n_layer": 1, "n_embd": 24, "n_head": 2, "train_steps": 10},
        {"name": "t2", "n_layer": 2, "n_embd": 32, "n_head": 2, "train_steps": 10},
    ]
    return config_from_dict(
        {
            "seed": 0,
            "task": {"max_difficulty": 3, "train_size": 300, "eval_size": 30},
            "teachers": {"ladder": ladder, "cache_dir": str(cache), "top_k": 8, "batch_size": 16},
            "student": {"n_layer": 1, "n_embd": 16, "n_head": 2},
            "curriculum": {"num_stages": 3},
            "scheduler": {"policy": "adaptive", "probe_every": 25, "probe_size": 4},
            "train": {
                "total_steps": steps,
                "batch_size": 8,
                "log_every": 5,
                "checkpoint_every": steps // 2,
            },
            "cluster": {"gpus_per_actor": 0},
        },
        "dashboard screenshot config",
    )


def graph_url(base: str, exprs: list[str], range_s: int) -> str:
    """Prometheus' classic graph page with one graph tab per expression over the last range_s."""
    params: dict[str, str] = {}
    for i, expr in enumerate(exprs):
        params.update(
            {
                f"g{i}.expr": expr,
                f"g{i}.tab": "0",  # the graph, not the table
                f"g{i}.range_input": f"{range_s}s",
                f"g{i}.step_input": "1",
                f"g{i}.stacked": "0",
            }
        )
    return f"{base}/classic/graph?{urllib.parse.urlencode(params)}"


def screenshot(url: str, path: Path, width: int, height: int) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-headless-shell")
    if chromium is None:
        sys.exit("chromium is not installed: apt-get install -y chromium (as root)")
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        chromium,
        "--headless",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={width},{height}",
        "--virtual-time-budget=20000",  # the page's queries answered and drawn first
        f"--screenshot={path}",
        url,
    ]
    if os.geteuid() == 0:
        cmd.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not path.is_file():
        sys.exit(f"chromium failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    _trim_bottom(path)


def _trim_bottom(path: Path, margin: int = 16) -> None:
    """Cut the blank window below the page (the window is taller than the page, so that
    Chromium does not scroll it)."""
    import numpy as np
    from PIL import Image

    img = Image.open(path).convert("RGB")
    rows = np.asarray(img).min(axis=(1, 2)) < 250  # rows with anything but white
    last = int(np.nonzero(rows)[0].max()) if rows.any() else img.height - 1
    img.crop((0, 0, img.width, min(img.height, last + margin))).save(path, optimize=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "prometheus-panels.png")
    p.add_argument("--steps", type=int, default=1200, help="the run's training steps")
    p.add_argument("--width", type=int, default=1300)
    p.add_argument("--ray-metrics-tab", type=Path, help="also capture the Ray dashboard's tab")
    args = p.parse_args()
    if shutil.which("prometheus") is None:
        sys.exit("prometheus is not installed: apt-get install -y prometheus (as root)")
    work = Path(tempfile.mkdtemp(prefix="clpd-shot-"))
    head = start_head(extra_env={"RAY_metrics_report_interval_ms": "1000"})
    try:
        print(f"Ray head {head.gcs_address}, dashboard {head.dashboard_url}", flush=True)
        print(f"installed {dash.install(head.temp_dir)}", flush=True)
        with prometheus_for(head, work) as base:
            run = run_on_head(head, tiny_config(work / "cache", args.steps), work)
            s = run.summary
            print(
                f"run {run.run_id}: {s['steps']} steps, {s['train_wall_s']} s training, "
                f"{s['wall_s']} s in all",
                flush=True,
            )
            results = query_panels(base, run, rate_interval=_RATE_INTERVAL)
            by_key = {(q.panel, q.ref): (q, res) for q, res in results.items()}
            exprs, first = [], time.time()
            for key in PANELS:
                q, res = by_key[key]
                points = sum(
                    1 for series in res for _, v in series["values"] if math.isfinite(float(v))
                )
                if points == 0:
                    sys.exit(f"{key}: no data from Prometheus for {q.expr}")
                print(f"{key[0]} ({key[1]}): {len(res)} series, {points} points", flush=True)
                exprs.append(dash.render_expr(q.expr, run.run_id, rate_interval=_RATE_INTERVAL))
                first = min([first] + [float(s["values"][0][0]) for s in res if s["values"]])
            # The graphs end "now" (when the page loads) and start a little before the first
            # point: the training, not the teacher ladder and start-up before it.
            range_s = math.ceil(time.time() - first) + 10
            height = _GRAPH_PX * len(exprs) + 200
            screenshot(graph_url(base, exprs, range_s), args.out, args.width, height)
            print(f"wrote {args.out}")
            if args.ray_metrics_tab is not None:
                screenshot(
                    f"{head.dashboard_url}/#/metrics", args.ray_metrics_tab, args.width, 1200
                )
                print(f"wrote {args.ray_metrics_tab}")
    finally:
        head.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
