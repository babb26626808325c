"""An ablation's report: summary.json, report.md and figures, from results.jsonl + run directories.

``write_report(out)`` is what ``clpd ablate`` calls at the end and ``clpd report <out>`` calls on
its own; it reads only files, so a report can be redone (or restyled) without rerunning anything.

    results.jsonl ──▶ stats.summarise ──▶ summary.json ──▶ report.md
    runs/*/metrics.jsonl, decisions.jsonl, summary.json ──▶ figures/*.png (matplotlib, Agg)
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from clpd_ray.ablation.arms import single_arm_map
from clpd_ray.ablation.results import MANIFEST, read_jsonl, read_results
from clpd_ray.ablation.stats import REACH, WILCOXON_MIN_N, summarise
from clpd_ray.errors import ClpdError
from clpd_ray.runtime.rundir import write_json_atomic

__all__ = ["write_report"]

SCHEDULE_ARMS = ("clpd", "adaptive")  # arms whose loss curves and teacher timelines are drawn


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path) if path.is_file() else []


def _save(fig: Figure, path: Path) -> str:
    FigureCanvasAgg(fig)  # attach the Agg canvas: no pyplot, no global backend state
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return f"figures/{path.name}"


def _accuracy_axis(ax: Any, ks: Sequence[int] | None = None) -> None:
    """Accuracy lives in [0, 1] (a t-interval need not); difficulties are whole steps."""
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(lo, -0.02), min(hi, 1.02))
    if ks is not None:
        ax.set_xticks(sorted(ks))
    ax.grid(alpha=0.3)


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _ci(ci: Sequence[float] | None) -> str:
    return "-" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


# ------------------------------------------------------------------ figures


def fig_accuracy(summary: dict[str, Any], path: Path) -> str:
    """Mean accuracy per arm with its 95% interval, and every seed as a dot."""
    arms = list(summary["arms"])
    fig = Figure(figsize=(max(5.0, 1.1 * len(arms) + 1.5), 3.8))
    ax = fig.add_subplot()
    for i, arm in enumerate(arms):
        a = summary["arms"][arm]
        ax.scatter([i] * len(a["values"]), a["values"], s=14, color="0.6", zorder=2)
        if a["ci95"] is not None:
            lo, hi = a["ci95"]
            ax.errorbar(
                i,
                a["mean"],
                yerr=[[a["mean"] - lo], [hi - a["mean"]]],
                fmt="none",
                ecolor="C0",
                capsize=5,
                zorder=3,
            )
        ax.scatter([i], [a["mean"]], s=40, color="C0", zorder=4)
    ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("accuracy per arm: mean and 95% t-interval over seeds (dots: seeds)")
    _accuracy_axis(ax)
    return _save(fig, path)


def fig_by_difficulty(summary: dict[str, Any], path: Path) -> str:
    """Mean accuracy per difficulty, a line per arm, with 95% intervals."""
    fig = Figure(figsize=(6.5, 4.0))
    ax = fig.add_subplot()
    arms = list(summary["arms"])
    all_ks: set[int] = set()
    for j, arm in enumerate(arms):
        by = summary["arms"][arm]["by_difficulty"]
        ks = sorted(by, key=int)
        all_ks.update(int(k) for k in ks)
        x = [int(k) + 0.06 * (j - (len(arms) - 1) / 2) for k in ks]  # dodge the error bars
        y = [by[k]["mean"] for k in ks]
        err = [
            [m - c[0] if c else 0.0 for m, c in zip(y, (by[k]["ci95"] for k in ks), strict=True)],
            [c[1] - m if c else 0.0 for m, c in zip(y, (by[k]["ci95"] for k in ks), strict=True)],
        ]
        ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, label=arm)
    ax.set_xlabel("difficulty (CoT steps)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("accuracy by difficulty (mean, 95% interval)")
    ax.legend(fontsize=8)
    _accuracy_axis(ax, sorted(all_ks))
    return _save(fig, path)


def _timeline(decisions: list[dict[str, Any]], key: str, total: int) -> tuple[list, list]:
    xs, ys = [], []
    for d in decisions:
        xs.append(d["step"])
        ys.append(d[key])
    if xs:
        xs.append(total)
        ys.append(ys[-1])
    return xs, ys


def fig_schedule(arm: str, runs: list[tuple[int, Path, int]], ladder: list[str], path: Path) -> str:
    """Student loss per seed with stage boundaries (dashed), and the teacher timeline below."""
    fig = Figure(figsize=(7.5, 5.0))
    loss_ax, teacher_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    for c, (seed, run_dir, total) in enumerate(runs):
        color = f"C{c % 10}"
        metrics = _jsonl(run_dir / "metrics.jsonl")
        loss_ax.plot(
            [m["step"] for m in metrics],
            [m["loss"] for m in metrics],
            color=color,
            lw=1.2,
            label=f"seed {seed}",
        )
        decisions = _jsonl(run_dir / "decisions.jsonl")
        stage_changes = [
            d["step"] for prev, d in itertools.pairwise(decisions) if d["stage"] != prev["stage"]
        ]
        for s in stage_changes:
            loss_ax.axvline(s, color=color, ls="--", lw=0.8, alpha=0.7)
        xs, ys = _timeline(decisions, "teacher_index", total)
        teacher_ax.step(xs, ys, where="post", color=color, lw=1.2)
    loss_ax.set_ylabel("student loss")
    loss_ax.set_title(f"{arm}: training loss, stage boundaries (dashed), teacher per step")
    loss_ax.legend(fontsize=8)
    loss_ax.grid(alpha=0.3)
    teacher_ax.set_yticks(range(len(ladder)), ladder)
    teacher_ax.set_ylim(-0.5, len(ladder) - 0.5)
    teacher_ax.set_xlabel("step")
    teacher_ax.set_ylabel("teacher")
    teacher_ax.grid(alpha=0.3)
    return _save(fig, path)


def fig_learning_curves(curves: Mapping[str, Any], floor: float | None, path: Path) -> str:
    """Held-out accuracy against step per arm: the mean over seeds and its 95% band."""
    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.add_subplot()
    for i, (arm, c) in enumerate(curves.items()):
        color = f"C{i % 10}"
        ax.plot(c["steps"], c["mean"], marker="o", ms=3, lw=1.3, color=color, label=arm)
        band = [(s, ci) for s, ci in zip(c["steps"], c["ci95"], strict=True) if ci is not None]
        if band:
            ax.fill_between(
                [s for s, _ in band],
                [ci[0] for _, ci in band],
                [ci[1] for _, ci in band],
                color=color,
                alpha=0.18,
                lw=0,
            )
    if floor is not None:
        ax.axhline(floor, color="0.3", ls=":", lw=1.0, label=f"floor {floor:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("learning curves: mean over seeds, 95% t-band")
    ax.legend(fontsize=8)
    _accuracy_axis(ax)
    return _save(fig, path)


def fig_teachers(teachers: Mapping[str, Any], path: Path) -> str | None:
    """Each teacher's own held-out accuracy by difficulty (from a run's summary.json)."""
    fig = Figure(figsize=(6.0, 3.8))
    ax = fig.add_subplot()
    all_ks: set[int] = set()
    for name, t in teachers.items():
        by = t.get("accuracy_by_difficulty") or {}
        if not by:
            continue
        ks = sorted(by, key=int)
        all_ks.update(int(k) for k in ks)
        ax.plot(
            [int(k) for k in ks],
            [by[k] for k in ks],
            marker="o",
            ms=4,
            label=f"{name} ({t.get('parameters') or 0:,} params)",
        )
    if not all_ks:
        return None  # external teachers without accuracy.json
    ax.set_xlabel("difficulty (CoT steps)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("teacher ladder: accuracy by difficulty")
    ax.legend(fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    _accuracy_axis(ax, sorted(all_ks))
    return _save(fig, path)


# ------------------------------------------------------------------ report.md


def _markdown(
    out: Path,
    summary: dict[str, Any],
    rows: list[dict[str, Any]],
    manifest: dict[str, Any],
    teachers: Mapping[str, Any],
    figures: dict[str, str],
) -> str:
    cfg = manifest.get("config", {})
    arms = summary["arms"]
    lines = [
        f"# Ablation report: {out.name}",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by `clpd report` from `results.jsonl` "
        f"({len(rows)} runs) and the run directories under `runs/`.",
        "",
        f"- metric: {summary['metric']} on {rows[0]['n_eval'] if rows else '?'} examples",
        f"- steps per run: {cfg.get('train', {}).get('total_steps', '?')}; "
        f"teacher ladder: {', '.join(manifest.get('ladder', []))}; "
        f"data and ladder seed: {manifest.get('data_seed', '?')}",
        "- per seed, every arm has the same student initialisation and sampler seed; all runs "
        "share the same training data, held-out set and teachers",
        "- 95% intervals are Student-t over seeds and are not clipped to [0, 1]",
        *_floor_note(summary.get("floor")),
        *_kwargs_note(cfg.get("scheduler", {})),
        "## Accuracy per arm",
        "",
        "| arm | n | mean | 95% CI (t) | per seed |",
        "|---|---:|---:|---|---|",
    ]
    for arm, a in arms.items():
        per_seed = ", ".join(f"{s}: {v:.3f}" for s, v in zip(a["seeds"], a["values"], strict=True))
        lines.append(f"| {arm} | {a['n']} | {a['mean']:.3f} | {_ci(a['ci95'])} | {per_seed} |")
    lines += [
        "",
        f"![accuracy per arm]({figures['accuracy']})",
        "",
        "## Accuracy by difficulty",
        "",
    ]
    ks = sorted({k for a in arms.values() for k in a["by_difficulty"]}, key=int)
    lines += [
        "| arm | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---|" + "---:|" * len(ks),
    ]
    for arm, a in arms.items():
        cells = [_fmt(a["by_difficulty"].get(k, {}).get("mean")) for k in ks]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", f"![accuracy by difficulty]({figures['by_difficulty']})", ""]
    lines += _full_chain_md(arms)
    lines += _curves_md(summary.get("learning_curves") or {}, figures)
    lines += _comparisons_md(summary["comparisons"])
    single = summary.get("single_teacher") or {}
    if single:
        lines += [
            "## Stronger teacher, worse student?",
            "",
            "Standard KD from one rung of the ladder at a time (weakest first).",
            "",
            "| teacher | params | teacher acc | arm | student mean | 95% CI |",
            "|---|---:|---:|---|---:|---|",
        ]
        for t, arm in single.items():
            info, a = teachers.get(t, {}), arms[arm]
            lines.append(
                f"| {t} | {info.get('parameters') or 0:,} | {_fmt(info.get('accuracy'))} | {arm} "
                f"| {a['mean']:.3f} | {_ci(a['ci95'])} |"
            )
        lines.append("")
    if "teachers" in figures:
        lines += ["## Teacher ladder", "", f"![teacher accuracy]({figures['teachers']})", ""]
    schedules = [k for k in figures if k.startswith("schedule:")]
    if schedules:
        lines += ["## Schedules", ""]
        lines += [f"![{k[9:]} schedule]({figures[k]})" for k in schedules] + [""]
    lines += [
        "## Runs",
        "",
        "| arm | seed | accuracy | steps | wall s | run |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['seed']} | {r['accuracy']:.3f} | {r['steps']} | "
            f"{r['wall_s']:.1f} | [{r['run_dir']}]({r['run_dir']}) |"
        )
    return "\n".join(lines) + "\n"


def _floor_note(floor: Mapping[str, Any] | None) -> list[str]:
    if not floor:
        return []
    return [
        f"- floor: always answering {floor['answer']!r} scores {floor['floor']:.3f} on this "
        "evaluation set (its most common answer); an accuracy at or below it shows no learning"
    ]


def _full_chain_md(arms: Mapping[str, Any]) -> list[str]:
    with_chain = {a: v["full_chain"] for a, v in arms.items() if "full_chain" in v}
    if not with_chain:
        return []
    lines = [
        "## Full-chain exact match",
        "",
        "The whole generation equals the reference chain of thought and answer (whitespace "
        "normalised): answer accuracy without lucky answers from wrong chains.",
        "",
        "| arm | n | mean | 95% CI (t) | answer accuracy |",
        "|---|---:|---:|---|---:|",
    ]
    for arm, c in with_chain.items():
        lines.append(
            f"| {arm} | {c['n']} | {c['mean']:.3f} | {_ci(c['ci95'])} | {arms[arm]['mean']:.3f} |"
        )
    return [*lines, ""]


def _curves_md(curves: Mapping[str, Any], figures: Mapping[str, str]) -> list[str]:
    if not curves:
        return []
    lines = [
        "## Learning curves",
        "",
        "Held-out accuracy every `train.eval_every` steps and at the end. AUC: mean accuracy "
        "over the steps evaluated (trapezoid rule), per seed, then mean and 95% t-interval. "
        f"Reaches {REACH:.2f}: the first evaluated step where the mean curve is at or above "
        f"{REACH:.2f} ('-': never), and how many seeds' own curves get there.",
        "",
        f"| arm | n | AUC | 95% CI (t) | final mean | reaches {REACH:.2f} at | seeds reaching |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for arm, c in curves.items():
        auc, reach = c["auc"], c["reach"]
        lines.append(
            f"| {arm} | {auc['n']} | {auc['mean']:.3f} | {_ci(auc['ci95'])} | "
            f"{c['mean'][-1]:.3f} | {_fmt(reach['step'], 'd')} | {reach['seeds']}/{auc['n']} |"
        )
    return [*lines, "", f"![learning curves]({figures['learning_curves']})", ""]


def _kwargs_note(scheduler: Mapping[str, Any]) -> list[str]:
    if not scheduler.get("kwargs"):
        return [""]
    return [
        f"- the config's `scheduler.kwargs` {scheduler['kwargs']} apply to its policy "
        f"`{scheduler.get('policy')}` only; the other arms use their defaults",
        "",
    ]


def _comparisons_md(comparisons: list[dict[str, Any]]) -> list[str]:
    if not comparisons:
        return []
    lines = [
        "## Paired comparisons",
        "",
        "Differences are a minus b over the seeds both arms ran. p: paired t-test "
        "(`scipy.stats.ttest_rel`, two-sided); Holm: adjusted over all comparisons below; "
        f"Wilcoxon signed-rank only for n >= {WILCOXON_MIN_N}; d_z: Cohen's d of the paired "
        "differences. '-' means undefined (n < 2, or identical differences).",
        "",
        "| a | b | n | mean diff | p (t) | p (Holm) | p (Wilcoxon) | d_z |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in comparisons:
        lines.append(
            f"| {c['a']} | {c['b']} | {c['n']} | {_fmt(c['mean_diff'], '+.3f')} | "
            f"{_fmt(c['p_value'], '.3g')} | {_fmt(c['p_holm'], '.3g')} | "
            f"{_fmt(c['wilcoxon_p'], '.3g')} | {_fmt(c['effect_size'], '+.2f')} |"
        )
    return [*lines, ""]


# ------------------------------------------------------------------ entry point


def write_report(out: str | Path) -> dict[str, Any]:
    """(Re)write ``summary.json``, ``report.md`` and ``figures/`` of the ablation in ``out``."""
    out = Path(out)
    rows = read_results(out)
    if not rows:
        raise ClpdError(f"{out / 'results.jsonl'} has no finished runs yet; nothing to report")
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    first_summary = out / rows[0]["run_dir"] / "summary.json"
    if not first_summary.is_file():
        raise ClpdError(
            f"{first_summary} does not exist: {out / 'results.jsonl'} lists that run, and the "
            "report reads the teacher ladder from it; copy the ablation with its runs/ folder, "
            "or with `clpd report SRC --export DST`, which keeps what a report needs"
        )
    first = json.loads(first_summary.read_text())
    teachers = first.get("teachers", {})
    ladder = manifest.get("ladder") or list(teachers)
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    single = single_arm_map({r["arm"]: r.get("teacher") for r in rows}, ladder)
    summary = summarise(rows, arms, single)
    summary["single_teacher"] = single
    summary["runs"] = len(rows)
    write_json_atomic(out / "summary.json", summary)

    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    figures = {
        "accuracy": fig_accuracy(summary, fig_dir / "accuracy.png"),
        "by_difficulty": fig_by_difficulty(summary, fig_dir / "accuracy_by_difficulty.png"),
    }
    if summary.get("learning_curves"):
        floor = (summary.get("floor") or {}).get("floor")
        figures["learning_curves"] = fig_learning_curves(
            summary["learning_curves"], floor, fig_dir / "learning_curves.png"
        )
    for arm in SCHEDULE_ARMS:
        runs = [(r["seed"], out / r["run_dir"], r["steps"]) for r in rows if r["arm"] == arm]
        if runs:
            figures[f"schedule:{arm}"] = fig_schedule(
                arm, runs, ladder, fig_dir / f"schedule_{arm}.png"
            )
    teacher_fig = fig_teachers(teachers, fig_dir / "teachers_by_difficulty.png")
    if teacher_fig:
        figures["teachers"] = teacher_fig
    (out / "report.md").write_text(_markdown(out, summary, rows, manifest, teachers, figures))
    return summary
