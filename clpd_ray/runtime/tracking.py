"""Experiment tracking: the run's rows also go to TensorBoard, W&B or MLflow (``train.report_to``).

The run directory stays the source of truth: ``metrics.jsonl``, ``decisions.jsonl``,
``eval.jsonl`` and ``summary.json`` are written whatever ``report_to`` says (``clpd status`` and
``--resume`` read them). A :class:`Reporter` writes each row there first, then hands it to every
:class:`MetricLogger` (modelled on torchtune's ``MetricLogger`` Protocol)::

    executor ── reporter.metrics(row) ──▶ RunDir (metrics.jsonl) ──▶ TensorBoard / W&B / MLflow

What each tracker gets, under the same names everywhere:

- ``train/<field>`` for each number of a metrics row (``train/loss``, ``train/kd_loss``, ...),
  ``eval/accuracy`` and ``eval/accuracy_by_difficulty/<k>`` for each evaluation row;
- the scheduler's decisions as text (TensorBoard text at the decision's step; a ``decisions``
  table in W&B and ``decisions.md`` in MLflow, written when the run closes);
- the final evaluation table (student and teachers by difficulty) and ``final/...`` numbers.

Files: ``<run>/tracking/{tensorboard,wandb,mlruns}`` for a local run directory. For an ``s3://``
one the trackers write to a local directory (under the teacher cache) that is uploaded to
``<run>/tracking/`` when the run closes. W&B runs offline (``wandb sync`` uploads it later) and
MLflow uses a local file store, so nothing here needs a network. Each package is an optional
extra; :func:`check_report_to` says which ``pip install`` a missing one needs, before the run
directory is made.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from clpd_ray.config import Config, default_cache_dir
from clpd_ray.errors import ConfigError
from clpd_ray.runtime import storage
from clpd_ray.runtime.rundir import RunDir

__all__ = [
    "EXTRAS",
    "JsonlLogger",
    "MetricLogger",
    "MlflowLogger",
    "Reporter",
    "TensorBoardLogger",
    "WandbLogger",
    "accuracy_table",
    "check_report_to",
    "decision_text",
    "make_loggers",
    "scalars",
    "tracking_dir",
]

_log = logging.getLogger(__name__)

# report_to name -> (module imported, pip extra)
EXTRAS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}
_NOT_NUMBERS = ("step", "time")  # a row's x axis and wall clock, not curves


class MetricLogger(Protocol):
    """Where a run's rows go besides the run directory. ``step``: the training step."""

    def log_row(self, step: int, row: Mapping[str, Any]) -> None: ...

    def log_decision(self, step: int, row: Mapping[str, Any]) -> None: ...

    def log_eval(self, step: int, row: Mapping[str, Any]) -> None: ...

    def log_summary(self, summary: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------- what every tracker gets


def scalars(prefix: str, row: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of ``row`` as ``{prefix/key: value}``; a dict of numbers one level down
    becomes ``prefix/key/subkey`` (``accuracy_by_difficulty``). Strings, bools, ``step`` and
    ``time`` are left out."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in _NOT_NUMBERS:
            continue
        if isinstance(value, Mapping):
            for sub, v in value.items():
                if _is_number(v):
                    out[f"{prefix}/{key}/{sub}"] = float(v)
        elif _is_number(value):
            out[f"{prefix}/{key}"] = float(value)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def decision_text(row: Mapping[str, Any]) -> str:
    """One line for a ``decisions.jsonl`` row: ``step 120: stage 1, teacher t1 (clpd) ...``."""
    replay = " (replay)" if row.get("replay") else ""
    return (
        f"step {row.get('step')}: stage {row.get('stage')}, teacher {row.get('teacher')} "
        f"({row.get('policy')}){replay}: {row.get('reason', '')}"
    )


def accuracy_table(summary: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The final evaluation table of ``summary.json``: columns ``model, parameters, accuracy,
    k=<d>...`` and one row for the student, then one per teacher (None where not measured)."""
    student = summary["student"]
    models = {"student": student, **summary.get("teachers", {})}
    diffs = sorted(
        {str(k) for m in models.values() for k in (m.get("accuracy_by_difficulty") or {})}, key=int
    )
    columns = ["model", "parameters", "accuracy", *(f"k={d}" for d in diffs)]
    rows = []
    for name, m in models.items():
        by = {str(k): v for k, v in (m.get("accuracy_by_difficulty") or {}).items()}
        rows.append([name, m.get("parameters"), m.get("accuracy"), *(by.get(d) for d in diffs)])
    return columns, rows


def _markdown(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _final_scalars(summary: Mapping[str, Any]) -> dict[str, float]:
    columns, rows = accuracy_table(summary)
    out: dict[str, float] = {}
    for row in rows:
        for col, value in zip(columns[2:], row[2:], strict=True):
            if _is_number(value) and math.isfinite(value):
                name = "accuracy" if col == "accuracy" else f"accuracy_by_difficulty/{col[2:]}"
                out[f"final/{row[0]}/{name}"] = float(value)
    return out


# ---------------------------------------------------------------------- the trackers


class JsonlLogger:
    """``jsonl``: nothing to add, the run directory writes its jsonl files itself."""

    def log_row(self, step: int, row: Mapping[str, Any]) -> None: ...

    def log_decision(self, step: int, row: Mapping[str, Any]) -> None: ...

    def log_eval(self, step: int, row: Mapping[str, Any]) -> None: ...

    def log_summary(self, summary: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class TensorBoardLogger:
    """Scalars and text in ``log_dir`` (``tensorboard --logdir <run>/tracking/tensorboard``)."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_row(self, step: int, row: Mapping[str, Any]) -> None:
        for key, value in scalars("train", row).items():
            self.writer.add_scalar(key, value, step)

    def log_decision(self, step: int, row: Mapping[str, Any]) -> None:
        self.writer.add_text("decisions", decision_text(row), step)

    def log_eval(self, step: int, row: Mapping[str, Any]) -> None:
        for key, value in scalars("eval", row).items():
            self.writer.add_scalar(key, value, step)

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        step = int(summary.get("steps", 0))
        self.writer.add_text("summary", _markdown(*accuracy_table(summary)), step)
        for key, value in _final_scalars(summary).items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """An offline W&B run in ``directory``/wandb (``wandb sync`` uploads it later).

    Rows use ``train/step`` and ``eval/step`` as their x axes rather than W&B's own step, which
    only grows: an evaluation may be recorded after a later training row, and a replay after a
    recovery logs earlier steps again."""

    def __init__(self, directory: Path, *, name: str, config: dict[str, Any]) -> None:
        import wandb

        self._wandb = wandb
        settings = wandb.Settings(
            console="off", x_disable_stats=True, save_code=False, disable_git=True, quiet=True
        )
        self.run = wandb.init(
            mode="offline",
            dir=str(directory),
            project="clpd",
            name=name,
            config=config,
            settings=settings,
            reinit="create_new",
        )
        self.run.define_metric("train/step")
        self.run.define_metric("train/*", step_metric="train/step")
        self.run.define_metric("eval/step")
        self.run.define_metric("eval/*", step_metric="eval/step")
        self.decisions: list[list[Any]] = []

    def log_row(self, step: int, row: Mapping[str, Any]) -> None:
        self.run.log({"train/step": step, **scalars("train", row)})

    def log_decision(self, step: int, row: Mapping[str, Any]) -> None:
        self.decisions.append([step, row.get("stage"), row.get("teacher"), decision_text(row)])

    def log_eval(self, step: int, row: Mapping[str, Any]) -> None:
        self.run.log({"eval/step": step, **scalars("eval", row)})

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        columns, rows = accuracy_table(summary)
        table = self._wandb.Table(columns=list[Any](columns), data=rows)
        self.run.log({"summary/accuracy": table})
        self.run.summary.update(_final_scalars(summary))

    def close(self) -> None:
        if self.decisions:
            table = self._wandb.Table(
                columns=["step", "stage", "teacher", "decision"], data=self.decisions
            )
            self.run.log({"decisions": table})
        self.run.finish()


class MlflowLogger:
    """An MLflow run (experiment ``clpd``) in ``tracking_uri``: a local file store
    (``file:...``), or whatever ``MLFLOW_TRACKING_URI`` names (a server, ``sqlite:...``).

    MLflow 3 keeps the file store in maintenance mode and refuses it unless
    ``MLFLOW_ALLOW_FILE_STORE=true``; it needs no database package (``mlflow-skinny`` suffices),
    so clpd opts in for its own process. ``MLFLOW_ALLOW_FILE_STORE=true mlflow ui
    --backend-store-uri <uri>`` shows the run."""

    def __init__(self, tracking_uri: str, *, name: str, config: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        if tracking_uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name("clpd")
        experiment = found.experiment_id if found else self.client.create_experiment("clpd")
        run = self.client.create_run(experiment, run_name=name, tags={"clpd.run": name})
        self.run_id = run.info.run_id
        self.client.log_dict(self.run_id, config, "config.json")
        self.decisions: list[str] = []

    def _log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_row(self, step: int, row: Mapping[str, Any]) -> None:
        self._log(step, scalars("train", row))

    def log_decision(self, step: int, row: Mapping[str, Any]) -> None:
        self.decisions.append(decision_text(row))
        self.client.set_tag(self.run_id, "clpd.last_decision", decision_text(row)[:5000])

    def log_eval(self, step: int, row: Mapping[str, Any]) -> None:
        self._log(step, scalars("eval", row))

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        self._log(int(summary.get("steps", 0)), _final_scalars(summary))
        self.client.log_text(self.run_id, _markdown(*accuracy_table(summary)), "summary.md")
        self.client.log_dict(self.run_id, dict(summary), "summary.json")

    def close(self) -> None:
        if self.decisions:
            self.client.log_text(self.run_id, "\n".join(self.decisions) + "\n", "decisions.md")
        self.client.set_terminated(self.run_id)


# ---------------------------------------------------------------------- choosing and wiring


def check_report_to(names: Sequence[str]) -> None:
    """Raise :class:`ConfigError` (exit 2) naming the ``pip install`` for each tracker in
    ``names`` whose package is missing: call it before the run directory is made."""
    for name in names:
        if name not in EXTRAS:
            continue
        module, extra = EXTRAS[name]
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(
                f"train.report_to includes {name!r} but {module} cannot be imported ({err}); "
                f"install it with: pip install 'clpd_ray[{extra}]', or drop {name!r} from "
                "train.report_to"
            ) from None


def tracking_dir(config: Config, run_dir_uri: str, run_id: str) -> Path:
    """Where the trackers write: ``<run>/tracking`` for a local run directory; for S3, a local
    directory (uploaded to ``<run>/tracking`` by :meth:`Reporter.close`)."""
    if not storage.is_s3(run_dir_uri):
        return Path(run_dir_uri, "tracking")
    slug = run_dir_uri.removeprefix("s3://").strip("/").replace("/", "_")
    return default_cache_dir(config) / "tracking" / f"{slug}-{run_id}"


def make_loggers(config: Config, run_dir_uri: str, run_id: str) -> list[MetricLogger]:
    """The trackers of ``train.report_to`` for the run at ``run_dir_uri`` (its id: ``run_id``)."""
    names = config.train.report_to
    check_report_to(names)
    where = tracking_dir(config, run_dir_uri, run_id)
    name = f"{Path(run_dir_uri.rstrip('/')).name}-{run_id}"
    loggers: list[MetricLogger] = []
    for tracker in names:
        if tracker == "jsonl":
            loggers.append(JsonlLogger())
        elif tracker == "tensorboard":
            loggers.append(TensorBoardLogger(where / "tensorboard"))
        elif tracker == "wandb":
            (where / "wandb").mkdir(parents=True, exist_ok=True)
            loggers.append(WandbLogger(where / "wandb", name=name, config=config.to_dict()))
        elif tracker == "mlflow":
            uri = os.environ.get("MLFLOW_TRACKING_URI") or (where / "mlruns").resolve().as_uri()
            loggers.append(MlflowLogger(uri, name=name, config=config.to_dict()))
    return loggers


class Reporter:
    """Writes each row to the run directory, then to every tracker.

    A tracker that fails (a full disk, a bug in a tracking library) is dropped with a warning:
    the run and its run directory go on. ``clock``: the wall clock stamped on metrics rows as
    ``time`` (unix seconds; ``clpd status`` computes the ETA from it)."""

    def __init__(
        self,
        run_dir: RunDir,
        loggers: Sequence[MetricLogger] = (),
        *,
        upload: tuple[Path, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.run_dir = run_dir
        self.loggers = list(loggers)
        self._upload = upload  # (local tracking directory, where it goes) for an S3 run
        self._clock = clock

    @classmethod
    def for_run(cls, config: Config, run_dir: RunDir, run_id: str) -> Reporter:
        """The reporter of ``train.report_to`` for ``run_dir`` (run id ``run_id``)."""
        loggers = make_loggers(config, run_dir.uri, run_id)
        upload = None
        if storage.is_s3(run_dir.uri) and set(config.train.report_to) - {"jsonl"}:
            local = tracking_dir(config, run_dir.uri, run_id)
            upload = (local, storage.join(run_dir.uri, "tracking"))
        return cls(run_dir, loggers, upload=upload)

    def _each(self, method: str, *args: Any) -> None:
        for logger in list(self.loggers):
            try:
                getattr(logger, method)(*args)
            except Exception as err:  # a tracker never stops the run
                _log.warning(
                    "clpd: warning: %s.%s failed (%s: %s); it gets no more rows this run "
                    "(the run directory has them all)",
                    type(logger).__name__,
                    method,
                    type(err).__name__,
                    err,
                )
                self.loggers.remove(logger)

    def metrics(self, row: dict[str, Any]) -> None:
        row = {**row, "time": round(self._clock(), 3)} if "time" not in row else row
        self.run_dir.metrics(row)
        self._each("log_row", int(row["step"]), row)

    def decision(self, row: dict[str, Any]) -> None:
        self.run_dir.decision(row)
        self._each("log_decision", int(row["step"]), row)

    def evaluation(self, row: dict[str, Any]) -> None:
        self.run_dir.evaluation(row)
        self._each("log_eval", int(row["step"]), row)

    def summary(self, payload: dict[str, Any]) -> None:
        self.run_dir.summary(payload)
        self._each("log_summary", payload)

    def close(self) -> None:
        """Close every tracker (flushes their files); for an S3 run, upload them."""
        self._each("close")
        self.loggers = []
        upload, self._upload = self._upload, None
        if upload is not None and upload[0].is_dir():
            storage.upload_dir(*upload)
