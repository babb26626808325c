"""The clpd Grafana dashboard and ``clpd dashboard install``.

The dashboard (``clpd_ray/runtime/grafana/clpd.json``, package data) charts the ``ray_clpd_*``
metrics of :mod:`clpd_ray.runtime.metrics` from the Prometheus data source Ray provisions:
loss and its KD/CE parts, stage and teacher over time with each decision as an annotation,
student tokens/s, teacher latency p50/p95 and tokens/s per teacher, target bytes/s, probe
results and recoveries. ``$run`` picks the run (the run id the header prints).

Where it goes. When Ray's dashboard runs, the head writes Grafana provisioning files into its
session directory::

    <session>/metrics/grafana/grafana.ini
    <session>/metrics/grafana/provisioning/dashboards/default.yml   -> options.path: the folder
    <session>/metrics/grafana/dashboards/*.json                        Grafana loads ("Ray")

:func:`install` copies the dashboard into that folder (the one ``default.yml`` names, which
``RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR`` can move), so a Grafana started with that
``grafana.ini`` lists it next to Ray's own. Ray empties ``metrics/grafana`` when a head starts:
install again for a new session. The Ray dashboard's Metrics tab embeds only Ray's built-in
dashboards; it links to Grafana ("View in Grafana"), where this one sits in the Ray folder.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from clpd_ray.errors import ClpdError

__all__ = [
    "DASHBOARD_FILE",
    "DEFAULT_SESSION",
    "PanelQuery",
    "dashboard_json",
    "dashboards_dir",
    "install",
    "panel_queries",
    "render_expr",
    "resolve_session",
]

DEFAULT_SESSION = Path("/tmp/ray/session_latest")
DASHBOARD_FILE = "clpd_grafana_dashboard.json"  # next to Ray's *_grafana_dashboard.json
_FIX = (
    "start Ray with its dashboard first (`ray start --head`, or a `clpd run` in progress), "
    "or give the session directory with --session DIR (e.g. /tmp/ray/session_latest, or "
    "<temp dir>/session_latest for `ray start --temp-dir`)"
)


@dataclass(frozen=True)
class PanelQuery:
    """One PromQL expression of the dashboard: a panel target or an annotation."""

    panel: str  # the panel's title, or "annotation: <name>"
    ref: str  # the target's refId ("" for an annotation)
    expr: str  # as in the JSON: with $run and $__rate_interval


def dashboard_json() -> dict[str, Any]:
    """The shipped dashboard, parsed."""
    text = (resources.files("clpd_ray") / "runtime" / "grafana" / "clpd.json").read_text("utf-8")
    return json.loads(text)


def panel_queries(dashboard: dict[str, Any] | None = None) -> list[PanelQuery]:
    """Every Prometheus expression of the dashboard (rows excluded; annotations included)."""
    d = dashboard if dashboard is not None else dashboard_json()
    out = []
    for panel in d["panels"]:
        for t in panel.get("targets", []):
            out.append(PanelQuery(panel["title"], t["refId"], t["expr"]))
    for a in d.get("annotations", {}).get("list", []):
        if "expr" in a:
            out.append(PanelQuery(f"annotation: {a['name']}", "", a["expr"]))
    return out


def render_expr(expr: str, run: str, rate_interval: str = "1m") -> str:
    """``expr`` as Grafana sends it to Prometheus for one run: ``$run`` (a regex match, so
    escaped) and ``$__rate_interval`` filled in."""
    out = expr.replace("$__rate_interval", rate_interval)
    return out.replace("$run", re.escape(run).replace("\\", "\\\\"))


def resolve_session(session: str | Path | None = None) -> Path:
    """The Ray session directory: ``session`` (a session directory, or a Ray temp dir holding
    ``session_latest``), else /tmp/ray/session_latest; symlinks resolved. ClpdError if absent."""
    given = Path(session).expanduser() if session is not None else DEFAULT_SESSION
    where = "--session" if session is not None else "the latest Ray session"
    if not given.exists():
        raise ClpdError(f"{where}: {given} does not exist (no Ray session there); {_FIX}")
    if not given.is_dir():
        raise ClpdError(f"{where}: {given} is not a directory; {_FIX}")
    if (given / "session_latest").is_dir() and not (given / "metrics").exists():
        given = given / "session_latest"  # a --temp-dir was given
    return given.resolve()


def dashboards_dir(session: Path) -> Path:
    """The folder Grafana loads dashboards from for ``session`` (ClpdError if Ray wrote none)."""
    grafana = session / "metrics" / "grafana"
    if not grafana.is_dir():
        raise ClpdError(
            f"{session} has no metrics/grafana/: Ray writes it only when its dashboard runs "
            "(not with include_dashboard=False or `ray start --include-dashboard=false`); "
            "start the head with the dashboard, or give another --session"
        )
    provisioning = grafana / "provisioning" / "dashboards" / "default.yml"
    try:
        spec = yaml.safe_load(provisioning.read_text("utf-8"))
        path = spec["providers"][0]["options"]["path"]
        if isinstance(path, str) and path:
            return Path(path)
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError):
        pass
    return grafana / "dashboards"


def install(session: str | Path | None = None) -> Path:
    """Write the dashboard into ``session``'s Grafana dashboards folder; returns the file.

    Written atomically (a temporary file renamed over the old one), so a Grafana that reloads
    the folder never reads half a file. ClpdError (exit 2) when there is no session, Ray wrote
    no Grafana files there, or the folder is not writable."""
    folder = dashboards_dir(resolve_session(session))
    target = folder / DASHBOARD_FILE
    text = json.dumps(dashboard_json(), indent=2) + "\n"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".clpd-dashboard-", suffix=".json", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except PermissionError:
        raise ClpdError(
            f"cannot write {target}: permission denied; run as the user that started Ray, "
            "or give a session directory you can write with --session DIR"
        ) from None
    except OSError as err:
        raise ClpdError(
            f"cannot write {target}: {err.strerror or err}; give a writable session "
            "directory with --session DIR"
        ) from None
    return target
