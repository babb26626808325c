"""A teacher ladder at GPU scale, in SIMULATED time: does the student ever wait for a teacher?

Everything here is a cost model, not a measurement: no model runs, nothing sleeps. The real
planner (runtime/planner.py: sampler, stage streams, decision lag of ``train.prefetch`` steps)
and the real policies (``clpd``, ``adaptive``) decide every step; a discrete-event clock charges
each piece of work its modelled time and keeps the dependencies the executor has:

    plan(j)      when the result of step j-D-1 is in (D = train.prefetch): the driver's lag
    targets(j)   the step's teacher(s), first come first served, after its work-ahead slice in
                 progress; the whole batch (just in time) or only the examples not yet stored
    train(j)     after train(j-1) and targets(j)
    work ahead   a teacher above the ones in use computes its future stage's examples, in the
                 sampler's order (planner.ahead_streams / upcoming), B examples a slice, while
                 it has nothing else to do (executor._work_ahead)

Cost model (per token; FLOP counts as in the scaling-law literature):
    student step        6 x student parameters x tokens of the batch
    teacher forward     2 x teacher parameters x tokens of each example it computes
    GPU throughput      --tflops (default 989: H100 SXM dense bf16) x --mfu (default 0.4)
One GPU per actor; ``--replicas7b N`` gives the largest teacher N GPUs (its throughput x N).
Tokens per example: --tokens (default 256: a GSM8K question + chain of thought with a chat
template). Defaults: a 0.5B student (0.49e9), 1.5B / 3B / 7B teachers (1.54e9, 3.09e9, 7.62e9:
Qwen2.5), 7,473 training examples (GSM8K train), and the budget of configs/gsm8k_qwen2.5.yaml
(600 steps x 32 examples, 3 stages, prefetch 4).

Not modelled: probes and evaluation (the student runs them in a concurrency group of its own),
transfer of targets (384 B per token at k=64: negligible next to compute), start-up, and the
lower efficiency of a teacher computing one example per forward pass (what the store does, for
bit-exact reuse: runtime/actors/teacher.py); --row-mfu sets the teacher's MFU for that.

Adaptive: its decisions need losses and probes; here they come from a synthetic learning curve
(below, _loss / _probe), so where adaptive lands shows how the pipeline copes with online stage
boundaries, not how a real student would learn.

    python benchmarks/ladder_sim.py            # the table for fixed CLPD and adaptive
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clpd_ray.config import config_from_dict
from clpd_ray.messages import Batch, ProbeResult, StepResult
from clpd_ray.policies import resolve_policy
from clpd_ray.runtime.planner import Planner
from clpd_ray.workload import Workload

STUDENT = 0.49e9
TEACHERS = {"1.5B": 1.54e9, "3B": 3.09e9, "7B": 7.62e9}
SIMULATED = "SIMULATED (cost model, no measurement)"


@dataclass
class Teacher:
    """One teacher (all its replicas) on the simulated clock."""

    per_example_s: float
    clock: float = 0.0  # when it is next free
    busy_s: float = 0.0
    stored: set[int] = field(default_factory=set)
    ahead: list[int] = field(default_factory=list)  # its future stage's examples, in order
    ahead_pos: int = 0
    ahead_on: bool = False
    computed: int = 0  # examples computed (forward passes of one example)

    def work_ahead(self, until: float, slice_size: int) -> None:
        """Slices of work ahead from its clock until ``until`` (the one in progress finishes)."""
        while self.ahead_on and self.clock < until and self.ahead_pos < len(self.ahead):
            chunk = self.ahead[self.ahead_pos : self.ahead_pos + slice_size]
            self.ahead_pos += slice_size
            self._compute(len(set(chunk) - self.stored))
            self.stored.update(chunk)

    def _compute(self, n: int) -> None:
        dt = n * self.per_example_s
        self.clock += dt
        self.busy_s += dt
        self.computed += n

    def request(self, at: float, examples: list[int], store: bool) -> float:
        """Targets for ``examples`` asked at ``at``; returns when they are ready."""
        self.clock = max(self.clock, at)
        if store:
            new = set(examples) - self.stored
            self.stored.update(new)
            self._compute(len(new))
        else:
            self._compute(len(examples))
        return self.clock


class SimPlanner(Planner):
    """The real planner, with batches that carry example ids only (nothing is tokenized)."""

    def _batch(self, j: int, stage: int, idx: np.ndarray) -> Batch:
        z = np.zeros((len(idx), 1), dtype=np.int64)
        return Batch(j, stage, z, z, z.astype(bool), np.asarray(idx))


# ---------------------------------------------------------------------- synthetic learning
def _loss(steps_in_stage: int, stage: int) -> float:
    """Training loss: drops within a stage, a little higher on harder stages."""
    return 1.0 + 0.3 * stage + 1.5 * math.exp(-steps_in_stage / 40)


def _probe(spent: list[int], num_teachers: int) -> tuple[ProbeResult, ...]:
    """Probe results per stage from the steps spent so far at that stage or later."""
    out = []
    for s in range(len(spent)):
        n = sum(spent[s:])
        kl = tuple(0.2 + 0.8 * math.exp(-n / (60 * (t + 1))) for t in range(num_teachers))
        out.append(ProbeResult(s, 1.0 + 1.5 * math.exp(-n / 50), 0.8 * (1 - math.exp(-n / 80)), kl))
    return tuple(out)


# ---------------------------------------------------------------------- one simulated run
def simulate(args: argparse.Namespace, policy_name: str, mode: str) -> dict:
    store = mode != "just-in-time"
    replicas = args.replicas7b if mode.endswith("replicas") else 1
    n = args.examples
    rng = np.random.default_rng(0)
    scores = rng.integers(2, 9, n).astype(float)  # GSM8K-like: 2..8 reasoning steps
    config = config_from_dict(
        {
            "teachers": {"ladder": [{"name": k} for k in TEACHERS]},
            "curriculum": {"num_stages": 3},
            "scheduler": {"policy": policy_name, "probe_every": 50},
            "train": {
                "total_steps": args.steps,
                "batch_size": args.batch,
                "prefetch": args.prefetch,
                "log_every": 10,
            },
        },
        "ladder_sim",
    )
    workload = Workload(
        tokenizer=None,  # type: ignore[arg-type]  # never used: SimPlanner tokenizes nothing
        tokenizer_dir=Path("."),
        train=[None] * n,  # type: ignore[list-item]
        scores=scores,
        eval=[],
        probe_pool=[],
        probe_scores=np.zeros(0),
        ladder=[],
        max_new_tokens=1,
    )
    policy = resolve_policy(policy_name, None)
    policy.bind(num_stages=3, num_teachers=len(TEACHERS), total_steps=args.steps)
    planner = SimPlanner(
        config,
        workload,
        policy_name=policy.name,
        curriculum=policy.curriculum,
        reads_probes=policy.reads_probes,
    )
    planner.teacher_accuracy = ((0.6, 0.4, 0.25), (0.7, 0.5, 0.35), (0.85, 0.7, 0.55))
    planner.start_clock(0.0)
    flops = args.tflops * 1e12
    student_s = 6 * STUDENT * args.batch * args.tokens / (flops * args.mfu)
    teachers = []
    for i, params in enumerate(TEACHERS.values()):
        per = 2 * params * args.tokens / (flops * args.row_mfu) / (replicas if i == 2 else 1)
        t = Teacher(per)
        if store and args.work_ahead:
            for stream, _ in planner.ahead_streams(i):
                t.ahead += planner.upcoming(stream, 0, n).tolist()
        teachers.append(t)
    finish: list[float] = []
    planned_at = 0.0
    student_clock = 0.0
    spent = [0, 0, 0]
    for j in range(args.steps):
        steps, probe = planner.missing(j)
        for i in steps:
            cur = planner.decisions.get(i) or planner.current
            stage = cur.stage if cur else 0
            planner.record(StepResult(i, _loss(i - planner.stage_start, stage), 1, 0, 0, 1, 0), 0)
        if probe is not None:
            planner.record_probe(probe, _probe(spent, len(TEACHERS)))
        lag = j - args.prefetch - 1
        planned_at = max(planned_at, finish[lag] if lag >= 0 else 0.0)
        before = policy.state_dict()
        plan = planner.plan(j, policy.decide(planner.observation(j)), before)
        spent[plan.decision.stage] += 1
        for i, t in enumerate(teachers):
            t.work_ahead(planned_at, args.batch)
            t.ahead_on = store and args.work_ahead and i > max(plan.teachers)
        ids = plan.batch.example_ids.tolist()
        ready = max(teachers[i].request(planned_at, ids, store) for i in plan.teachers)
        student_clock = max(student_clock, ready) + student_s
        finish.append(student_clock)
    wall = finish[-1]
    compute = args.steps * student_s
    return {
        "policy": policy_name,
        "mode": mode,
        "wall_s": wall,
        "ratio": wall / compute,
        "student_busy": compute / wall,
        "teacher_util": [t.busy_s / wall for t in teachers],
        "computed": [t.computed for t in teachers],
        "stages": planner.stage_summary(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prefetch", type=int, default=4)
    p.add_argument("--examples", type=int, default=7473)
    p.add_argument("--tokens", type=int, default=256, help="tokens per example")
    p.add_argument("--tflops", type=float, default=989.0, help="GPU peak (dense bf16) TFLOP/s")
    p.add_argument("--mfu", type=float, default=0.4, help="student's share of peak")
    p.add_argument("--row-mfu", type=float, default=0.4, help="teachers' share of peak")
    p.add_argument("--replicas7b", type=int, default=2)
    p.add_argument("--no-work-ahead", dest="work_ahead", action="store_false")
    args = p.parse_args()
    modes = ["just-in-time", "store + work-ahead", f"+ {args.replicas7b} replicas"]
    print(f"ladder_sim: {SIMULATED}")
    print(
        f"student 0.5B, teachers {' / '.join(TEACHERS)}, {args.steps} steps x {args.batch} "
        f"examples x {args.tokens} tokens, {args.examples} training examples, GPU "
        f"{args.tflops:g} TFLOP/s x MFU {args.mfu:g} (teachers {args.row_mfu:g})\n"
    )
    head = "| policy | mode | simulated wall s | wall / student compute | student busy | "
    head += "teacher util 1.5B / 3B / 7B | examples computed 1.5B / 3B / 7B | stages |"
    print(head)
    print("|" + "---|" * 8)
    for policy in ("clpd", "adaptive"):
        for mode in modes:
            r = simulate(args, policy, "replicas" if mode.startswith("+") else mode)
            r["mode"] = mode
            util = " / ".join(f"{u:.0%}" for u in r["teacher_util"])
            done = " / ".join(f"{c:,}" for c in r["computed"])
            stages = ", ".join(f"{k}: {v[0]}-{v[1]}" for k, v in r["stages"].items())
            print(
                f"| {policy} | {mode} | {r['wall_s']:.1f} | {r['ratio']:.2f} | "
                f"{r['student_busy']:.0%} | {util} | {done} | {stages} |"
            )
    print(f"\nAll times above are {SIMULATED}.")


if __name__ == "__main__":
    main()
