"""Actor-pipeline overhead: the same distillation steps through Ray actors and in one process.

All runs use the same config, teacher ladder and planner (the executor's own: same sampler,
schedule and batches); checkpoints are off. Prints the wall time of each, every actor's busy
time, the pipeline's efficiency (busy time of the student / wall time; 1.0 means the student
never waits) and the ratio pipeline / in-process.

    python benchmarks/overhead.py                   # demo sizes, 300 steps, fixed CLPD, no probes
    python benchmarks/overhead.py --probes          # adaptive policy: probes off vs on, one run
    python benchmarks/overhead.py --steps 600 --set train.prefetch=4

``--probes`` runs the pipeline twice with the adaptive policy, once with probes off and once at
the config's probe interval (the demo's: every 50 steps), and prints both efficiencies: probes
run in the student actor's own concurrency group on a device-local weight snapshot, so they
should cost the student almost nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from clpd_ray.cli import demo_config_path
from clpd_ray.config import Config, load_config
from clpd_ray.policies import resolve_policy
from clpd_ray.runtime.actors.student import StudentTrainer
from clpd_ray.runtime.actors.teacher import TeacherService
from clpd_ray.runtime.planner import Planner
from clpd_ray.runtime.run import run_distillation
from clpd_ray.workload import Workload, build_workload


def in_process(config: Config, w: Workload) -> dict[str, float]:
    """The plain loop: one process, the executor's planner, teachers and student called directly."""
    torch.set_num_threads(1)
    teachers = [
        TeacherService(
            e.name, i, e.path, top_k=config.teachers.top_k, temperature=config.distill.temperature
        )
        for i, e in enumerate(w.ladder)
    ]
    student = StudentTrainer(config, w.tokenizer_dir)
    policy = resolve_policy(config.scheduler.policy, config.scheduler.kwargs)
    total = config.train.total_steps
    policy.bind(
        num_stages=config.curriculum.num_stages, num_teachers=len(teachers), total_steps=total
    )
    # Probes are off in this loop: it is the reference without any pipeline or probe cost.
    planner = Planner(
        config, w, policy_name=policy.name, curriculum=policy.curriculum, reads_probes=False
    )
    start = time.perf_counter()
    planner.start_clock(start)
    for step in range(total):
        state = policy.state_dict()
        plan = planner.plan(step, policy.decide(planner.observation(step)), state)
        targets = [teachers[i].targets(plan.batch) for i in plan.teachers]
        weights = list(plan.weights) if plan.weights else None
        result = student.train_step(plan.batch, *targets, weights=weights)
        planner.record(result, time.perf_counter())
    wall = time.perf_counter() - start
    busy = {"student": student.busy_s, **{f"teacher-{t.name}": t.busy_s for t in teachers}}
    return {"wall_s": wall, **{f"busy:{k}": v for k, v in busy.items()}}


def pipeline(config: Config, workload: Workload) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        return run_distillation(config, Path(tmp) / "run", progress=False, workload=workload)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(demo_config_path()))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument(
        "--probes",
        action="store_true",
        help="adaptive policy, pipeline with probes off and on (at the config's probe_every)",
    )
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    base = [f"train.total_steps={args.steps}", "train.checkpoint_every=0"]
    if args.probes:
        base.append("scheduler.policy=adaptive")
    else:
        base.append("scheduler.policy=clpd")
    config = load_config(args.config, [*base, *args.set])
    workload = build_workload(config)
    no_probes = load_config(
        args.config, [*base, f"scheduler.probe_every={args.steps + 1}", *args.set]
    )
    runs = {"pipeline": pipeline(no_probes, workload)}
    if args.probes:
        runs["+ probes"] = pipeline(config, workload)
    local = in_process(no_probes, workload)

    print(
        f"\n{args.steps} steps, batch {config.train.batch_size}, prefetch {config.train.prefetch}, "
        f"{len(workload.ladder)} teachers, student "
        f"{runs['pipeline']['student']['parameters']:,} params, policy {config.scheduler.policy}"
        + (f", probes every {config.scheduler.probe_every} steps" if args.probes else "")
    )
    print(f"{'':<24}" + "".join(f"{name:>12}" for name in runs) + f"{'in-process':>12}")
    print(
        f"{'wall s':<24}"
        + "".join(f"{s['train_wall_s']:>12.2f}" for s in runs.values())
        + f"{local['wall_s']:>12.2f}"
    )
    actors = list(runs["pipeline"]["busy_s"])
    for name in [
        *actors,
        *(n for n in runs.get("+ probes", {}).get("busy_s", {}) if n not in actors),
    ]:
        row = "".join(f"{s['busy_s'].get(name, float('nan')):>12.2f}" for s in runs.values())
        print(f"{'busy s ' + name:<24}{row}{local.get('busy:' + name, float('nan')):>12.2f}")
    eff = {n: s["busy_s"]["student"] / s["train_wall_s"] for n, s in runs.items()}
    for name, e in eff.items():
        print(f"efficiency {name} (busy student / wall): {e:.3f}")
    if args.probes:
        print(f"efficiency with probes / without: {eff['+ probes'] / eff['pipeline']:.3f}")
    print(
        f"ratio pipeline / in-process wall: {runs['pipeline']['train_wall_s'] / local['wall_s']:.3f}"
    )


if __name__ == "__main__":
    main()
