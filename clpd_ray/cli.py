"""The ``clpd`` command line: demo, run, validate, ladder, ablate, report, status, dashboard.

Exit codes: 0 success, 2 bad input (config, data, arguments, policy) with one message naming the
cause and the fix and no traceback, 1 internal error (with traceback), 130 stopped by SIGINT
(Ctrl-C), 143 stopped by SIGTERM: a run stops at a step boundary with a checkpoint and prints
``clpd: stopped by SIGTERM at step N; continue with: clpd run --resume DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from importlib import resources
from pathlib import Path

from clpd_ray.config import Config, load_config
from clpd_ray.errors import ClpdError

__all__ = ["QUICK_OVERRIDES", "main"]

# --quick: a smoke test of the same pipeline: the same task, a short student budget and a
# smoke-test ladder (built teachers train at most QUICK_TEACHER_STEPS steps, cached apart from the
# full ladder), so that it is quick on an empty cache too. User --set overrides come after these,
# so they win.
QUICK_STUDENT_STEPS = 60
QUICK_TEACHER_STEPS = 400
QUICK_HELP = (
    f"a smoke test: a {QUICK_STUDENT_STEPS}-step student budget, built teachers capped at "
    f"{QUICK_TEACHER_STEPS} steps (teachers.max_train_steps; a ladder cached apart from the "
    "full one)"
)
QUICK_OVERRIDES = [
    f"teachers.max_train_steps={QUICK_TEACHER_STEPS}",
    f"train.total_steps={QUICK_STUDENT_STEPS}",
    "train.checkpoint_every=30",
    "scheduler.probe_every=20",
    "scheduler.probe_size=8",
]


def demo_config_path() -> Path:
    return Path(str(resources.files("clpd_ray") / "configs" / "demo.yaml"))


def _load(path: str | Path | None, overrides: list[str], quick: bool) -> Config:
    if not quick:
        return load_config(path, overrides)
    config = load_config(path, [*QUICK_OVERRIDES, *overrides])
    cap = config.teachers.max_train_steps
    print(
        f"--quick: a smoke test: {config.train.total_steps} student steps"
        + (f", built teachers train at most {cap} steps (not the full ladder)" if cap else ""),
        flush=True,
    )
    return config


def _default_out(config: Config) -> Path:
    return (
        Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.scheduler.policy.split(':')[-1]}"
    )


def _table(summary: dict) -> str:
    student = summary["student"]
    diffs = sorted(student["accuracy_by_difficulty"], key=int)
    head = f"{'model':<14}{'params':>9}{'all':>7}" + "".join(f"{'k=' + str(d):>7}" for d in diffs)
    lines = [head, "-" * len(head)]

    def row(
        name: str, params: int | None, acc: float | None, by: dict | None, model: bool = True
    ) -> str:
        by = {str(k): v for k, v in (by or {}).items()}
        cells = "".join(f"{by[str(d)]:>7.2f}" if str(d) in by else f"{'-':>7}" for d in diffs)
        a = f"{acc:>7.2f}" if acc is not None else f"{'-':>7}"
        size = f"{(params or 0):>9,}" if model else " " * 9  # a measure, not a model: no size
        return f"{name:<14}{size}{a}{cells}"

    lines.append(
        row(
            "student",
            student.get("parameters"),
            student["accuracy"],
            student["accuracy_by_difficulty"],
        )
    )
    if "full_chain" in student:  # the whole chain of thought right, not just the answer
        chain = student["full_chain_by_difficulty"]
        lines.append(row("  full chain", None, student["full_chain"], chain, model=False))
    for name, t in summary["teachers"].items():
        lines.append(
            row(name, t.get("parameters"), t.get("accuracy"), t.get("accuracy_by_difficulty"))
        )
    if "floor" in student:  # what always giving the most common answer scores
        floor = f"floor '{student['floor_answer']}'"[:13]
        by = student.get("floor_by_difficulty")
        lines.append(row(floor, None, student["floor"], by, model=False))
    return "\n".join(lines)


def _print_result(summary: dict, out: str) -> None:
    print()
    # train_wall_s: the training loop; wall_s: the whole run (teacher ladder, start-up, evaluation).
    train_s = summary.get("train_wall_s", summary["wall_s"])
    print(
        f"policy {summary['policy']}: {summary['steps']} steps in {train_s:.1f} s of training "
        f"({summary['wall_s']:.1f} s in all); stages {summary['stages']}"
    )
    print("held-out exact-match accuracy by difficulty (CoT steps):")
    print(_table(summary))
    print(f"\nrun directory: {out}")


def cmd_run(args: argparse.Namespace, config_path: str | Path | None) -> int:
    from clpd_ray.runtime.phases import phase

    with phase("loading torch, transformers and Ray"):
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
    """Schema, policy, then the deep checks (runtime/preflight.py): data files load and map,
    model paths hold a causal LM config and a tokenizer (no weights read), tokenizers agree for
    token-level KD, and every model reads the training length. The first failure exits 2."""
    import datasets

    from clpd_ray.data.prompt_format import PromptFormat
    from clpd_ray.runtime import preflight
    from clpd_ray.runtime.run import check_tokenizers, resolve_run_policy
    from clpd_ray.workload import load_data

    config = _load(args.config, args.set or [], False)
    policy = resolve_run_policy(config)
    datasets.disable_progress_bars()  # one report, not a progress bar per file
    train, held_out, probe, _ = load_data(config)
    # Token-level KD: check_tokenizers below loads every model's tokenizer anyway.
    infos = preflight.inspect_models(config, load_tokenizers=config.distill.objective != "token")
    tokenizer = preflight.shared_tokenizer(config)
    PromptFormat.from_config(config).check(tokenizer, "the run's tokenizer")  # chat_template
    check_tokenizers(config)  # token-level KD: one token map for every teacher and the student
    preflight.check_rows(infos, tokenizer)
    length, source = preflight.training_length(config, tokenizer, train + probe)
    preflight.check_lengths(infos, length, source)
    print(
        f"{args.config}: valid ({len(config.teachers.ladder)} teachers, "
        f"{config.curriculum.num_stages} stages, policy {policy.name})"
    )
    data = config.data.path or "the embedded task"
    print(
        f"  data: {data}: {len(train):,} train, {len(held_out):,} eval, {len(probe):,} probe rows"
    )
    for m in infos:
        where = m.tokenizer_source if m.key.endswith(".path") else "built"
        rows = f"{m.rows:,} rows" if m.rows else "a row per token"
        print(f"  {m.name}: {where}, {m.max_positions or '?'} positions, {rows}")
    kd = (
        "one token map (token-level KD)"
        if config.distill.objective == "token"
        else "sequence-level KD"
    )
    print(f"  tokenizer: {len(tokenizer):,} tokens, {kd}")
    print(f"  length: {length} tokens, from {source}: fits every model")
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
    from clpd_ray.ablation.arms import DEFAULT_ARMS, parse_arms, parse_seeds, split_arms
    from clpd_ray.ablation.runner import run_ablation

    seeds = parse_seeds(args.seeds)
    config = _load(args.config, args.set or [], args.quick)
    names = split_arms(args.arms) if args.arms is not None else list(DEFAULT_ARMS)
    arms = parse_arms(names, config, single_teachers=args.single_teachers)
    out = (
        Path(args.out) if args.out else Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-ablation"
    )
    summary = run_ablation(config, out, arms, seeds, parallel=args.parallel, address=args.address)
    floor = summary.get("floor")
    for arm, a in summary["arms"].items():
        ci = "n/a" if a["ci95"] is None else f"[{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]"
        chain = f"  full chain {a['full_chain']['mean']:.3f}" if "full_chain" in a else ""
        print(f"{arm:<24} n={a['n']}  accuracy {a['mean']:.3f}  95% CI {ci}{chain}")
    if floor:
        print(f"{'floor':<24} always answering {floor['answer']!r}: {floor['floor']:.3f}")
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


def cmd_status(args: argparse.Namespace) -> int:
    from clpd_ray.runtime.status import format_status, read_status, watch

    if args.watch is None:
        print(format_status(read_status(args.run_dir)))
        return 0
    if args.watch <= 0:
        raise ClpdError(f"--watch {args.watch:g}: give a refresh period in seconds > 0, e.g. 5")
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a watch ends: not an error
        watch(args.run_dir, args.watch)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from clpd_ray.runtime.dashboard import install

    path = install(args.session)
    print(
        f"wrote {path}: Grafana started with {path.parents[1] / 'grafana.ini'} lists it as "
        "'CLPD distillation' in the Ray folder (docs/observability.md)"
    )
    return 0


EXIT_CODES = """exit codes:
  0    ok
  1    internal error (with a traceback to report)
  2    bad input: a config, data, argument, model or run directory (one message naming
       the cause and the fix, no traceback)
  130  stopped by Ctrl-C (SIGINT); 143 stopped by SIGTERM. A run stops at a step boundary
       with a checkpoint; continue it with: clpd run --resume DIR"""


def _epilog(*examples: str) -> str:
    return "examples:\n" + "".join(f"  {e}\n" for e in examples) + "\n" + EXIT_CODES


def build_parser() -> argparse.ArgumentParser:
    from clpd_ray import __version__

    p = argparse.ArgumentParser(
        prog="clpd",
        description="Curriculum Learning-Guided Progressive Distillation on Ray",
        epilog=_epilog(
            "clpd demo --quick",
            "clpd run configs/demo.yaml --out runs/a --set train.total_steps=300",
            "clpd status runs/a --watch",
            "clpd <command> --help",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, what: str, *examples: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=what,
            description=what,
            epilog=_epilog(*examples),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

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
        sp.add_argument("--quick", action="store_true", help=QUICK_HELP)

    d = command(
        "demo",
        "the embedded default end to end on local Ray",
        "clpd demo --quick",
        "clpd demo --out runs/demo --set train.report_to=[jsonl,tensorboard]",
    )
    common(d)
    r = command(
        "run",
        "run any config, or continue a stopped run",
        "clpd run configs/demo.yaml --out runs/a",
        "clpd run configs/demo.yaml --out s3://bucket/runs/a --address auto",
        "clpd run --resume runs/a",
    )
    what = r.add_mutually_exclusive_group(required=True)  # a config, or a run to continue
    what.add_argument("config", nargs="?", help="the YAML config to run, e.g. configs/demo.yaml")
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
    v = command(
        "validate",
        "validate a config without running it",
        "clpd validate configs/demo.yaml --set train.total_steps=100",
    )
    v.add_argument("config", help="the YAML config to check, e.g. configs/demo.yaml")
    v.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. train.total_steps=100",
    )
    lad = command(
        "ladder",
        "train (or load) the teacher ladder and print its accuracy table",
        "clpd ladder",
        "clpd ladder configs/demo.yaml --json",
    )
    lad.add_argument(
        "config", nargs="?", help="the YAML config whose ladder to show (default: the demo's)"
    )
    lad.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. teachers.cache_dir=/tmp/clpd-cache",
    )
    lad.add_argument("--quick", action="store_true", help=QUICK_HELP)
    lad.add_argument(
        "--json", action="store_true", help="also print each teacher's accuracies as JSON"
    )
    ab = command(
        "ablate",
        "run arms x seeds on the same data and teachers; resumable; then report",
        "clpd ablate configs/ablation.yaml --seeds 5 --out runs/ablation",
        "clpd ablate configs/ablation.yaml --arms clpd,sft,standard_kd --seeds 5-9",
        "clpd ablate configs/ablation.yaml --arms 'clpd@boundaries=[300,600],sft' --seeds 0,2,4",
        "clpd ablate configs/ablation.yaml --arms 'kd-T2=standard_kd@distill.temperature=2'",
        "clpd ablate configs/ablation.yaml --arms clpd,adaptive --set train.eval_every=100",
        "clpd ablate configs/ablation.yaml --arms clpd --single-teachers --quick",
    )
    ab.epilog = (
        "arms: [LABEL=]BASE[@KEY=VALUE...], comma-separated (commas inside [...] stay in a value)\n"
        "  BASE   a built-in policy (standard_kd, data_only, teacher_only, clpd,\n"
        "         random_curriculum, adaptive); sft: no teacher, cross-entropy on the gold\n"
        "         chains, same batches and budget; single:<teacher>: standard KD from that rung\n"
        "  KEY    a policy kwarg (no dot, e.g. boundaries=[300,600], patience=3) or a dotted\n"
        "         config key as --set takes it (student.lr=0.001, distill.temperature=2,\n"
        "         curriculum.replay=0.2); data.*, task.*, teachers.ladder, seed and\n"
        "         scheduler.policy/kwargs are shared by all arms and cannot differ\n"
        "  LABEL  the arm's name in the results (default: the spec itself)\n"
        "learning curves: --set train.eval_every=N evaluates every run on the held-out set every\n"
        "  N steps; the report plots them per arm with a 95% band\n\n" + (ab.epilog or "")
    )
    ab.add_argument(
        "config", help="the YAML config every arm starts from, e.g. configs/ablation.yaml"
    )
    ab.add_argument(
        "--arms",
        metavar="SPEC,...",
        help="comma-separated arm specs (see 'arms' below; default: the six built-in policies)",
    )
    ab.add_argument(
        "--seeds",
        default="3",
        metavar="N|A-B|S,S,...",
        help="N: seeds 0..N-1; A-B: seeds A..B; or a comma list such as 0,2,4 or 0-4,10 "
        "(default 3: seeds 0, 1, 2)",
    )
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
    ab.add_argument("--quick", action="store_true", help=QUICK_HELP)
    ab.add_argument("--address", help="Ray address to join; default: start a local one")
    rep = command(
        "report",
        "rewrite an ablation's summary.json, report.md and figures from its files",
        "clpd report runs/ablation",
        "clpd report runs/ablation --export results/ablation",
    )
    rep.add_argument("dir", help="the ablation directory (the --out of `clpd ablate`)")
    rep.add_argument(
        "--export",
        metavar="DST",
        help="copy the report's inputs (no weights or checkpoints) to the new directory DST and "
        "report there: a small, shareable copy that `clpd report DST` rebuilds",
    )
    st = command(
        "status",
        "print a run's state from its run directory (no Ray needed): step and ETA, stage and "
        "teacher, loss, tokens/s, checkpoint; finished, running or interrupted",
        "clpd status runs/a",
        "clpd status s3://bucket/runs/a --watch 10",
    )
    st.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="the run's --out: a local path or s3://bucket/prefix, e.g. runs/a",
    )
    st.add_argument(
        "--watch",
        nargs="?",
        const=5.0,
        type=float,
        metavar="SECONDS",
        help="refresh every SECONDS (default 5) until the run is no longer running, or Ctrl-C",
    )
    db = command(
        "dashboard",
        "install the clpd Grafana dashboard into a Ray session's Grafana provisioning folder",
        "clpd dashboard install",
        "clpd dashboard install --session /tmp/ray/session_latest",
    )
    db.add_argument(
        "action", choices=["install"], help="install: write the dashboard JSON (the only action)"
    )
    db.add_argument(
        "--session",
        metavar="DIR",
        help="the Ray session directory whose metrics/grafana/dashboards/ gets it (default: "
        "/tmp/ray/session_latest, the latest local session; a `ray start --temp-dir` dir works)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from clpd_ray.runtime.cleanup import stopping_local_ray
    from clpd_ray.runtime.stopping import handling_stop_signals

    args = build_parser().parse_args(argv)
    runs = args.command in ("run", "demo")
    # A local Ray started here stops when clpd exits, however; SIGINT/SIGTERM stop a run at a
    # step boundary with a checkpoint (runtime/stopping.py).
    with stopping_local_ray(), handling_stop_signals() if runs else contextlib.nullcontext():
        return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
    from clpd_ray.runtime.stopping import Interrupted, RunStopped, exit_code

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
        if args.command == "status":
            return cmd_status(args)
        if args.command == "dashboard":
            return cmd_dashboard(args)
        return cmd_ladder(args)
    except ClpdError as err:
        print(f"clpd: error: {err}", file=sys.stderr)
        return 2
    except RunStopped as stop:
        print(f"clpd: {stop}", file=sys.stderr)
        return stop.exit_code
    except Interrupted as err:  # before training started: nothing new to keep
        resume = getattr(args, "resume", None)
        then = f"; continue with: clpd run --resume {resume}" if resume else ""
        print(f"clpd: stopped by {err.signal.name} before training started{then}", file=sys.stderr)
        return exit_code(err.signal)
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
