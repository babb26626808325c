"""The ``clpd`` command line: demo, run, validate, ladder, ablate, report.

Exit codes: 0 success, 2 bad input (config, data, arguments, policy) with one message naming the
cause and the fix and no traceback, 1 internal error (with traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from importlib import resources
from pathlib import Path

from clpd_ray.config import Config, load_config
from clpd_ray.errors import ClpdError

__all__ = ["QUICK_OVERRIDES", "main"]

# --quick: a smoke test of the same pipeline: same task and (cached) teacher ladder, a short
# student budget. User --set overrides come after these, so they win.
QUICK_OVERRIDES = [
    "train.total_steps=60",
    "train.checkpoint_every=30",
    "scheduler.probe_every=20",
    "scheduler.probe_size=8",
]


def demo_config_path() -> Path:
    return Path(str(resources.files("clpd_ray") / "configs" / "demo.yaml"))


def _load(path: str | Path | None, overrides: list[str], quick: bool) -> Config:
    return load_config(path, [*QUICK_OVERRIDES, *overrides] if quick else overrides)


def _default_out(config: Config) -> Path:
    return (
        Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.scheduler.policy.split(':')[-1]}"
    )


def _table(summary: dict) -> str:
    student = summary["student"]
    diffs = sorted(student["accuracy_by_difficulty"], key=int)
    head = f"{'model':<14}{'params':>9}{'all':>7}" + "".join(f"{'k=' + str(d):>7}" for d in diffs)
    lines = [head, "-" * len(head)]

    def row(name: str, params: int | None, acc: float | None, by: dict | None) -> str:
        by = {str(k): v for k, v in (by or {}).items()}
        cells = "".join(f"{by[str(d)]:>7.2f}" if str(d) in by else f"{'-':>7}" for d in diffs)
        a = f"{acc:>7.2f}" if acc is not None else f"{'-':>7}"
        return f"{name:<14}{(params or 0):>9,}{a}{cells}"

    lines.append(
        row(
            "student",
            student.get("parameters"),
            student["accuracy"],
            student["accuracy_by_difficulty"],
        )
    )
    for name, t in summary["teachers"].items():
        lines.append(
            row(name, t.get("parameters"), t.get("accuracy"), t.get("accuracy_by_difficulty"))
        )
    return "\n".join(lines)


def _print_result(summary: dict, out: str) -> None:
    print()
    print(
        f"policy {summary['policy']}: {summary['steps']} steps in {summary['wall_s']:.1f} s; stages {summary['stages']}"
    )
    print("held-out exact-match accuracy by difficulty (CoT steps):")
    print(_table(summary))
    print(f"\nrun directory: {out}")


def cmd_run(args: argparse.Namespace, config_path: str | Path | None) -> int:
    from clpd_ray.runtime.run import resume_distillation, run_distillation
    from clpd_ray.runtime.storage import resolve

    resume = getattr(args, "resume", None)
    if resume is not None:
        given = {"--set": args.set, "--out": args.out, "--quick": args.quick}
        extra = [name for name, value in given.items() if value]
        if extra:
            raise ClpdError(
                f"--resume {resume} continues that run with its own config.yaml; drop "
                f"{', '.join(extra)} (a run cannot change its config midway)"
            )
        where = resolve(resume)
        summary = resume_distillation(where, address=getattr(args, "address", None))
        _print_result(summary, where)
        return 0
    config = _load(config_path, args.set or [], args.quick)
    # A local path is made absolute here, on the driver: actors on other nodes never see it
    # relative to their own working directory.
    out = resolve(args.out or _default_out(config))
    summary = run_distillation(config, out, address=getattr(args, "address", None))
    _print_result(summary, out)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from clpd_ray.runtime.run import resolve_run_policy

    config = _load(args.config, args.set or [], False)
    policy = resolve_run_policy(config)
    print(
        f"{args.config}: valid ({len(config.teachers.ladder)} teachers, {config.curriculum.num_stages} stages, policy {policy.name})"
    )
    return 0


def cmd_ladder(args: argparse.Namespace) -> int:
    from clpd_ray.distill.ladder import accuracy_table
    from clpd_ray.workload import build_workload

    config = _load(args.config or demo_config_path(), args.set or [], args.quick)
    workload = build_workload(config)
    print(accuracy_table(workload.ladder))
    if args.json:
        print(json.dumps([e.accuracy for e in workload.ladder], indent=2))
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from clpd_ray.ablation.arms import DEFAULT_ARMS, parse_arms
    from clpd_ray.ablation.runner import run_ablation

    if args.seeds < 1:
        raise ClpdError(f"--seeds {args.seeds}: an ablation needs at least one seed per arm")
    config = _load(args.config, args.set or [], args.quick)
    names = args.arms.split(",") if args.arms is not None else list(DEFAULT_ARMS)
    arms = parse_arms(names, config, single_teachers=args.single_teachers)
    out = (
        Path(args.out) if args.out else Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-ablation"
    )
    summary = run_ablation(
        config, out, arms, range(args.seeds), parallel=args.parallel, address=args.address
    )
    for arm, a in summary["arms"].items():
        ci = "n/a" if a["ci95"] is None else f"[{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]"
        print(f"{arm:<24} n={a['n']}  accuracy {a['mean']:.3f}  95% CI {ci}")
    print(f"\nreport: {out / 'report.md'} (resume or extend: rerun with --out {out})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    if args.export:
        from clpd_ray.ablation.export import export_ablation

        summary = export_ablation(args.dir, args.export)
        print(
            f"exported {summary['runs']} runs (no weights) to {args.export}; wrote its "
            f"summary.json, report.md and figures/ (`clpd report {args.export}` redoes them)"
        )
        return 0
    from clpd_ray.ablation.report import write_report

    write_report(args.dir)
    print(f"wrote {Path(args.dir) / 'summary.json'}, report.md and figures/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clpd", description="Curriculum Learning-Guided Progressive Distillation on Ray"
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override a config key, e.g. train.total_steps=100",
        )
        sp.add_argument(
            "--out",
            help="run directory to create: a local path (shared by all nodes on a multi-node "
            "cluster) or s3://bucket/prefix (default: runs/<time>-<policy>)",
        )
        sp.add_argument("--quick", action="store_true", help="shrink budgets to a smoke test")

    d = sub.add_parser("demo", help="the embedded default end to end on local Ray")
    common(d)
    r = sub.add_parser("run", help="run any config")
    what = r.add_mutually_exclusive_group(required=True)  # a config, or a run to continue
    what.add_argument("config", nargs="?")
    what.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a stopped run (its --out: a path or s3:// URI) from its last checkpoint "
        "(same config, same final result)",
    )
    common(r)
    r.add_argument(
        "--address",
        help="Ray address to join ('auto' = the running cluster); default: start a local one",
    )
    v = sub.add_parser("validate", help="validate a config without running it")
    v.add_argument("config")
    v.add_argument("--set", action="append", metavar="KEY=VALUE")
    lad = sub.add_parser(
        "ladder", help="train (or load) the teacher ladder and print its accuracy table"
    )
    lad.add_argument("config", nargs="?")
    lad.add_argument("--set", action="append", metavar="KEY=VALUE")
    lad.add_argument("--quick", action="store_true")
    lad.add_argument("--json", action="store_true")
    ab = sub.add_parser(
        "ablate", help="run arms x seeds on the same data and teachers; resumable; then report"
    )
    ab.add_argument("config")
    ab.add_argument(
        "--arms",
        help="comma-separated built-in policies and single:<teacher> arms (default: the six "
        "built-ins)",
    )
    ab.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per arm (default 3)")
    ab.add_argument(
        "--single-teachers",
        action="store_true",
        help="add single:<teacher> arms: standard KD from each rung of the ladder",
    )
    ab.add_argument(
        "--parallel", type=int, help="runs at once (default: as many as the cluster fits)"
    )
    ab.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    ab.add_argument(
        "--out",
        help="ablation directory; an existing one is resumed (default: runs/<time>-ablation)",
    )
    ab.add_argument("--quick", action="store_true", help="shrink budgets to a smoke test")
    ab.add_argument("--address", help="Ray address to join; default: start a local one")
    rep = sub.add_parser(
        "report", help="rewrite an ablation's summary.json, report.md and figures from its files"
    )
    rep.add_argument("dir")
    rep.add_argument(
        "--export",
        metavar="DST",
        help="copy the report's inputs (no weights or checkpoints) to the new directory DST and "
        "report there: a small, shareable copy that `clpd report DST` rebuilds",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return cmd_run(args, demo_config_path())
        if args.command == "run":
            return cmd_run(args, args.config)
        if args.command == "validate":
            return cmd_validate(args)
        if args.command == "ablate":
            return cmd_ablate(args)
        if args.command == "report":
            return cmd_report(args)
        return cmd_ladder(args)
    except ClpdError as err:
        print(f"clpd: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clpd: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(
            "clpd: internal error (exit 1); please report it with the traceback above",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
