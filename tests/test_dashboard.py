"""The shipped Grafana dashboard: its queries name metrics RunMetrics exports and parse as PromQL,
`clpd dashboard install` puts it where Ray's Grafana provisioning looks, and (slow) after a short
run on a dashboard-enabled Ray head every panel's query returns data from a real Prometheus."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ONE_RUNG

from clpd_ray.cli import main
from clpd_ray.errors import ClpdError
from clpd_ray.runtime import dashboard as dash
from clpd_ray.runtime import metrics as run_metrics
from clpd_ray.runtime.metrics import RunMetrics

ROOT = Path(__file__).resolve().parents[1]
METRIC = re.compile(r"\bray_clpd_[a-z_]+")


# ---------------------------------------------------------------------------- the metrics


class _Instrument:
    """Stands in for ray.util.metrics.Counter/Gauge/Histogram: records the calls."""

    def __init__(self, kind: str, name: str, description: str = "", tag_keys=(), **kw: Any):
        if kind == "histogram":  # Histogram(name, description, boundaries, tag_keys)
            tag_keys = kw.get("tag_keys", tag_keys)
        self.kind, self.name, self.tag_keys = kind, name, tuple(tag_keys)
        self.calls: list[tuple[str, float, dict[str, str]]] = []

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("set", value, dict(tags)))

    def inc(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("inc", value, dict(tags)))

    def observe(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("observe", value, dict(tags)))


def _fake_instruments(monkeypatch) -> dict[str, _Instrument]:
    """The instruments RunMetrics makes, built with recording stand-ins for Ray's classes."""
    import ray.util.metrics as rum

    monkeypatch.setattr(rum, "Counter", lambda *a, **k: _Instrument("counter", *a, **k))
    monkeypatch.setattr(rum, "Gauge", lambda *a, **k: _Instrument("gauge", *a, **k))
    monkeypatch.setattr(rum, "Histogram", lambda *a, **k: _Instrument("histogram", *a, **k))
    return run_metrics._make_instruments()


def _exported(instruments: dict[str, _Instrument]) -> dict[str, str]:
    """Exported series name -> instrument name, by Ray's and Prometheus' naming rules."""
    out = {}
    for inst in instruments.values():
        base = f"ray_{inst.name}"
        suffixes = {
            "counter": ["_total"],
            "gauge": [""],
            "histogram": ["_bucket", "_sum", "_count"],
        }
        for suffix in suffixes[inst.kind]:
            out[base + suffix] = inst.name
    return out


def test_every_query_names_an_exported_metric_and_every_metric_is_charted(monkeypatch):
    instruments = _fake_instruments(monkeypatch)
    exported = _exported(instruments)
    queries = dash.panel_queries()
    used = set()
    for q in queries:
        names = METRIC.findall(q.expr)
        assert names, f"{q.panel} {q.ref}: no ray_clpd_ metric in {q.expr!r}"
        for name in names:
            assert name in exported, f"{q.panel}: {name} is not exported by RunMetrics"
            used.add(exported[name])
    assert used == {i.name for i in instruments.values()}, "metrics with no panel"


def test_dashboard_has_the_panels_the_issue_asks_for():
    queries = dash.panel_queries()
    exprs = {q.expr for q in queries}
    text = "\n".join(exprs)

    def charted(fragment: str) -> bool:
        return any(fragment in e for e in exprs)

    for metric in (
        "ray_clpd_student_loss",
        "ray_clpd_kd_loss",
        "ray_clpd_ce_loss",
        "ray_clpd_stage",
        "ray_clpd_teacher_active",
        "ray_clpd_tokens_per_s",
        "ray_clpd_probe_accuracy",
        "ray_clpd_recoveries",
    ):
        assert charted(metric), metric
    for q in (0.5, 0.95):  # latency quantiles, per teacher
        assert re.search(
            rf"histogram_quantile\({q}, sum by \(teacher, le\) \(rate\(ray_clpd_teacher_latency_seconds_bucket",
            text,
        ), q
    assert re.search(r"sum by \(teacher\) \(rate\(ray_clpd_teacher_tokens_total", text)
    assert re.search(r"sum by \(teacher\) \(rate\(ray_clpd_target_bytes_total", text)
    annotations = [q for q in queries if q.panel.startswith("annotation:")]
    assert [a.panel for a in annotations] == ["annotation: Decisions"]
    assert "ray_clpd_decisions_total" in annotations[0].expr
    decisions = next(
        a for a in dash.dashboard_json()["annotations"]["list"] if a["name"] == "Decisions"
    )
    assert "{{stage}}" in decisions["titleFormat"] and "{{teacher}}" in decisions["titleFormat"]
    assert decisions["textFormat"] == "{{reason}}"


def test_dashboard_is_well_formed_grafana_json():
    d = dash.dashboard_json()
    assert d["uid"] == "clpd-distillation" and d["title"]
    names = [v["name"] for v in d["templating"]["list"]]
    assert names == ["datasource", "run"]
    panels = d["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        for t in p.get("targets", []):
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert '{run=~"$run"}' in t["expr"], (p["title"], t["expr"])
    assert json.loads(json.dumps(d)) == d


def test_queries_parse_as_promql(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus package) is not installed")
    queries = dash.panel_queries()
    rules = {
        "groups": [
            {
                "name": "clpd",
                "rules": [
                    {"record": f"clpd:q{i}", "expr": dash.render_expr(q.expr, "ab12cd34")}
                    for i, q in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(queries)} rules found" in proc.stdout


def test_render_expr_fills_grafana_variables():
    expr = 'sum by (teacher) (rate(ray_clpd_teacher_tokens_total{run=~"$run"}[$__rate_interval]))'
    out = dash.render_expr(expr, "ab12-arm.x", "30s")
    assert out == (
        'sum by (teacher) (rate(ray_clpd_teacher_tokens_total{run=~"ab12\\\\-arm\\\\.x"}[30s]))'
    )


def test_run_metrics_record_what_the_new_panels_read(monkeypatch):
    inst = _fake_instruments(monkeypatch)
    monkeypatch.setattr(run_metrics, "_make_instruments", lambda: inst)
    monkeypatch.setattr(RunMetrics, "active", property(lambda self: True))
    m = RunMetrics("r1", keepalive_s=0)
    m.student_step(1.5, 100.0, 1e-3, kd_loss=1.25, ce_loss=0.25, target_bytes={"t0": 96, "t1": 0})
    assert inst["kd_loss"].calls == [("set", 1.25, {"run": "r1"})]
    assert inst["ce_loss"].calls == [("set", 0.25, {"run": "r1"})]
    assert inst["target_bytes"].calls == [("inc", 96.0, {"run": "r1", "teacher": "t0"})]
    # A decision is counted when stage or teacher changes, with its reason on one bounded line.
    m.schedule(0, 0, "t0", "start\n at  stage 0")
    m.schedule(0, 0, "t0", "same stage, same teacher")
    m.schedule(1, 0, "t0", "x" * 500)
    m.schedule(1, 1, "t1", None)
    tags = [c[2] for c in inst["decisions"].calls]
    assert [c[1] for c in inst["decisions"].calls] == [1.0, 1.0, 1.0]
    assert [(t["stage"], t["teacher"]) for t in tags] == [("0", "t0"), ("1", "t0"), ("1", "t1")]
    assert tags[0]["reason"] == "start at stage 0"
    assert tags[1]["reason"] == "x" * 120 and tags[2]["reason"] == ""

    class Probe:
        def __init__(self, stage, loss, accuracy, kls):
            self.stage, self.loss, self.accuracy, self.kl_to_teacher = stage, loss, accuracy, kls

    m.probe([Probe(0, 2.0, 0.5, (0.1, 0.2)), Probe(1, 3.0, 0.25, (0.3, 0.4))], ["t0", "t1"])
    assert inst["probe_accuracy"].calls == [
        ("set", 0.5, {"run": "r1", "stage": "0"}),
        ("set", 0.25, {"run": "r1", "stage": "1"}),
    ]
    assert [c[1] for c in inst["probe_loss"].calls] == [2.0, 3.0]
    assert [(c[1], c[2]["stage"], c[2]["teacher"]) for c in inst["probe_kl"].calls] == [
        (0.1, "0", "t0"),
        (0.2, "0", "t1"),
        (0.3, "1", "t0"),
        (0.4, "1", "t1"),
    ]
    m.recoveries(0)
    m.recoveries(2)
    assert inst["recoveries"].calls == [
        ("set", 0.0, {"run": "r1"}),
        ("set", 2.0, {"run": "r1"}),
    ]


# ---------------------------------------------------------------------------- install


def _fake_session(root: Path, dashboards: Path | None = None) -> Path:
    """A session directory laid out as Ray's metrics head writes it (metrics_head.py)."""
    session = root / "session_2026-01-01_00-00-00_000000_1"
    grafana = session / "metrics" / "grafana"
    folder = dashboards or grafana / "dashboards"
    folder.mkdir(parents=True)
    (folder / "default_grafana_dashboard.json").write_text("{}")
    prov = grafana / "provisioning" / "dashboards"
    prov.mkdir(parents=True)
    (prov / "default.yml").write_text(
        "apiVersion: 1\n\nproviders:\n  - name: Ray\n    folder: Ray\n    type: file\n"
        f"    options:\n      path: {folder}\n"
    )
    (root / "session_latest").symlink_to(session)
    return session


def test_install_writes_the_dashboard_where_ray_provisions_dashboards(tmp_path):
    session = _fake_session(tmp_path)
    path = dash.install(tmp_path / "session_latest")
    assert path == session / "metrics" / "grafana" / "dashboards" / dash.DASHBOARD_FILE
    assert json.loads(path.read_text()) == dash.dashboard_json()
    assert dash.install(tmp_path) == path  # a Ray temp dir: its session_latest
    assert sorted(p.name for p in path.parent.iterdir()) == [
        dash.DASHBOARD_FILE,
        "default_grafana_dashboard.json",
    ]  # no temporary file left behind


def test_install_follows_a_moved_dashboards_folder(tmp_path):
    moved = tmp_path / "elsewhere" / "dashboards"  # RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR
    session = _fake_session(tmp_path / "ray", dashboards=moved)
    assert dash.install(session) == moved / dash.DASHBOARD_FILE


def test_install_defaults_to_the_latest_local_session(tmp_path, monkeypatch):
    _fake_session(tmp_path)
    monkeypatch.setattr(dash, "DEFAULT_SESSION", tmp_path / "session_latest")
    assert dash.install().name == dash.DASHBOARD_FILE


def test_install_errors_name_the_problem_and_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ClpdError, match=r"does not exist \(no Ray session there\).*--session"):
        dash.install(tmp_path / "missing")
    (tmp_path / "nodash").mkdir()
    with pytest.raises(ClpdError, match=r"no metrics/grafana/.*only when its dashboard runs"):
        dash.install(tmp_path / "nodash")
    session = _fake_session(tmp_path / "a")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(dash.tempfile, "mkstemp", refuse)
    with pytest.raises(ClpdError, match=r"cannot write .*permission denied.*--session"):
        dash.install(session)
    monkeypatch.undo()
    blocked = _fake_session(tmp_path / "b", dashboards=tmp_path / "b" / "file" / "dashboards")
    shutil.rmtree(tmp_path / "b" / "file")
    (tmp_path / "b" / "file").write_text("a file where a folder should be")
    with pytest.raises(ClpdError, match=r"cannot write .*--session"):
        dash.install(blocked)


def test_cli_dashboard_install(tmp_path, capsys):
    session = _fake_session(tmp_path)
    assert main(["dashboard", "install", "--session", str(session)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {session / 'metrics/grafana/dashboards' / dash.DASHBOARD_FILE}" in out
    assert main(["dashboard", "install", "--session", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clpd: error: --session: ") and err.count("\n") == 1


# ---------------------------------------------------------------------------- real Prometheus


def _finite_points(result: list[dict]) -> int:
    return sum(1 for s in result for _, v in s["values"] if math.isfinite(float(v)))


@pytest.mark.slow
def test_every_panel_returns_data_from_a_real_prometheus(tiny_config, tmp_path):
    """Ray head with its dashboard (so it writes prometheus.yml and the Grafana folders) ->
    `clpd dashboard install` -> Prometheus with Ray's prometheus.yml (scrape every 1 s) -> a
    150-step tiny run as a driver joining that head -> each panel's query over the run."""
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (apt-get install -y prometheus)")
    from prom_stack import prom_get, prometheus_for, query_panels, run_on_head  # tests/
    from ray_head import start_head  # tests/ray_head.py

    # Ray exports every metrics_report_interval_ms (10 s by default): 1 s here, so a run of a
    # few seconds still gives rate() several points.
    head = start_head(extra_env={"RAY_metrics_report_interval_ms": "1000"})
    try:
        session = head.session_dir.resolve()
        installed = dash.install(head.temp_dir)
        assert installed.parent == session / "metrics" / "grafana" / "dashboards"
        with prometheus_for(head, tmp_path) as base:
            # Long enough that Ray exports (every 1 s) and Prometheus scrapes (every 1 s) several
            # times during training: rate() and histogram_quantile() need an increase between
            # two scrapes. The adaptive policy reads probes (the clock policies such as clpd do
            # not).
            config = tiny_config(
                "train.total_steps=150",
                "train.checkpoint_every=75",
                "scheduler.policy=adaptive",
                "scheduler.probe_every=25",
                **ONE_RUNG,
            )
            run = run_on_head(head, config, tmp_path)
            summary = run.summary
            print(
                f"run {run.run_id}: {summary['train_wall_s']} s training, "
                f"{summary['wall_s']} s in all"
            )
            # Ray's file_sd lists the node's metrics port (and the dashboard's own): the
            # node's, where the actors' ray_clpd_* series are, must have been scraped.
            targets = prom_get(base, "/api/v1/targets")["data"]["activeTargets"]
            node = [t for t in targets if t["labels"]["instance"].endswith(f":{head.metrics_port}")]
            assert node and node[0]["health"] == "up", targets
            results = query_panels(base, run)
        empty = [
            f"{q.panel} {q.ref}: {q.expr}" for q, res in results.items() if not _finite_points(res)
        ]
        if os.environ.get("CLPD_DASHBOARD_PNG"):  # docs/observability.md's picture
            _draw_panels(results, run.start, Path(os.environ["CLPD_DASHBOARD_PNG"]), run.run_id)
        assert not empty, "panels with no data:\n" + "\n".join(empty)
    finally:
        head.stop()


def _draw_panels(
    results: dict[dash.PanelQuery, list[dict]], t0: float, path: Path, run_id: str
) -> None:
    """Every panel's series as Prometheus returned them, one subplot per panel (matplotlib: a
    picture of the data the dashboard shows, not Grafana's rendering of it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, list[tuple[dash.PanelQuery, list[dict]]]] = {}
    for q, res in results.items():
        panels.setdefault(q.panel, []).append((q, res))
    titles = [t for t in panels if not t.startswith("annotation:")]
    decisions = [r for t, v in panels.items() if t.startswith("annotation:") for _, r in v]
    cols = 3
    rows = -(-len(titles) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(15, 3.1 * rows), squeeze=False)
    legend_of = {
        (p["title"], t["refId"]): t["legendFormat"]
        for p in dash.dashboard_json()["panels"]
        for t in p.get("targets", [])
    }
    for ax, title in zip(axes.flat, titles, strict=False):
        for q, res in panels[title]:
            for series in res:
                xs = [float(t) - t0 for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                label = re.sub(
                    r"\{\{(\w+)\}\}",
                    lambda m, s=series: s["metric"].get(m.group(1), ""),
                    legend_of[(title, q.ref)],
                )
                ax.plot(xs, ys, label=label, linewidth=1.2)
        for res in decisions:
            for series in res:
                ax.axvline(float(series["values"][0][0]) - t0, color="orange", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[len(titles) :]:
        ax.axis("off")
    fig.suptitle(
        f"clpd dashboard panels for run {run_id}: each panel's PromQL over a 150-step tiny run "
        "(x: seconds since the run started; orange: decisions)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
