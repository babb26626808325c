"""Actor-pipeline overhead: the same distillation steps through Ray actors and in one process.

Both runs use the same config, teacher ladder, batches (same sampler, seed and fixed CLPD
schedule) and targets; probes and checkpoints are off so only the training pipeline is timed.
Prints the wall time of each, every actor's busy time, the pipeline's efficiency (busy time of
its slowest actor / wall time; 1.0 is perfect overlap) and the ratio pipeline / in-process.

    python benchmarks/overhead.py                 # demo sizes, 300 steps
    python benchmarks/overhead.py --steps 600 --set train.prefetch=4
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clpd_ray.cli import demo_config_path
from clpd_ray.config import Config, load_config
from clpd_ray.curriculum.sampler import CurriculumSampler, split_stages
from clpd_ray.data.batching import encode_examples
from clpd_ray.messages import Batch
from clpd_ray.policies import resolve_policy
from clpd_ray.runtime.actors.student import StudentTrainer
from clpd_ray.runtime.actors.teacher import TeacherService
from clpd_ray.runtime.run import run_distillation
from clpd_ray.workload import Workload, build_workload


def in_process(config: Config, w: Workload) -> dict[str, float]:
    """The plain loop: one process, teachers and student called directly, one after the other."""
    torch.set_num_threads(1)
    teachers = [
        TeacherService(
            e.name, i, e.path, top_k=config.teachers.top_k, temperature=config.distill.temperature
        )
        for i, e in enumerate(w.ladder)
    ]
    student = StudentTrainer(config, w.tokenizer_dir)
    policy = resolve_policy(config.scheduler.policy, config.scheduler.kwargs)
    k, total = config.curriculum.num_stages, config.train.total_steps
    policy.bind(num_stages=k, num_teachers=len(teachers), total_steps=total)
    stages = split_stages(w.scores, k, boundaries=config.curriculum.boundaries, seed=config.seed)
    sampler = CurriculumSampler(stages, config.train.batch_size, seed=config.seed)
    from clpd_ray.messages import Observation

    start = time.perf_counter()
    stage = teacher = 0
    for step in range(total):
        obs = Observation(
            step=step,
            total_steps=total,
            stage=stage,
            num_stages=k,
            teacher=teacher,
            num_teachers=len(teachers),
            steps_in_stage=0,
        )
        d = policy.decide(obs)
        stage, teacher = d.stage, d.teacher
        idx = sampler.next_batch(None if policy.curriculum == "none" else d.stage)
        enc = encode_examples(w.tokenizer, [w.train[i] for i in idx])
        batch = Batch(
            step, d.stage, enc.input_ids, enc.attention_mask, enc.loss_mask, np.asarray(idx)
        )
        student.train_step(batch, teachers[d.teacher].targets(batch))
    wall = time.perf_counter() - start
    busy = {"student": student.busy_s, **{f"teacher-{t.name}": t.busy_s for t in teachers}}
    return {"wall_s": wall, **{f"busy:{k}": v for k, v in busy.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(demo_config_path()))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    config = load_config(
        args.config,
        [
            f"train.total_steps={args.steps}",
            f"scheduler.probe_every={args.steps + 1}",
            "train.checkpoint_every=0",
            "scheduler.policy=clpd",
            *args.set,
        ],
    )
    workload = build_workload(config)
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_distillation(config, Path(tmp) / "run", progress=False, workload=workload)
    pipe_wall = summary["train_wall_s"]
    pipe_busy = {k: v for k, v in summary["busy_s"].items() if k != "scheduler"}
    local = in_process(config, workload)

    slowest = max(pipe_busy, key=pipe_busy.get)
    print(
        f"\n{args.steps} steps, batch {config.train.batch_size}, prefetch {config.train.prefetch}, "
        f"{len(workload.ladder)} teachers, student {summary['student']['parameters']:,} params"
    )
    print(f"{'':<22}{'pipeline':>10}{'in-process':>12}")
    print(f"{'wall s':<22}{pipe_wall:>10.2f}{local['wall_s']:>12.2f}")
    for name, busy in pipe_busy.items():
        print(
            f"{'busy s ' + name:<22}{busy:>10.2f}{local.get('busy:' + name, float('nan')):>12.2f}"
        )
    print(f"efficiency (busy {slowest} / wall): {pipe_busy[slowest] / pipe_wall:.3f}")
    print(f"ratio pipeline / in-process wall: {pipe_wall / local['wall_s']:.3f}")


if __name__ == "__main__":
    main()
