"""The run header: what a run is and where it runs, printed once its actors are up.

On a shared cluster the header is how an operator finds a run: its id (in every actor name, the
placement group and the metrics' ``run`` tag), its run directory, the dashboard, and the node and
device of every actor. Example::

    clpd run 3f9a2c1d -> s3://bucket/runs/demo
      ray:       joined 10.0.0.1:6379; dashboard http://10.0.0.1:8265
      placement: GPU bundles: 1 GPU per teacher and for the student; teacher_slot / student_slot nodes
      teacher-t-small-3f9a2c1d     10.0.0.2 (node 5e1f09ab)  cuda:0  GPU 0
      teacher-t-large-3f9a2c1d     10.0.0.3 (node 77a0c2e1)  cuda:0  GPU 0
      teacher-t-large-r1-3f9a2c1d  10.0.0.4 (node b1d2e3f4)  cuda:0  GPU 0
      student-3f9a2c1d             10.0.0.5 (node 0c77d1e2)  cuda:0  GPU 0
      scheduler-3f9a2c1d           10.0.0.1 (node 9a0b3c4d)  cpu

A teacher with ``replicas: N`` has a line per replica (``-r<k>`` before the run id for k >= 1):
each is an actor with its own node and device.
"""

from __future__ import annotations

from collections.abc import Sequence

from clpd_ray.runtime.actors.launcher import ActorPlace
from clpd_ray.runtime.placement import Placement

__all__ = ["format_header"]


def format_header(
    *,
    run_id: str,
    run_dir: str,
    address: str | None,
    dashboard: str | None,
    placement: Placement,
    places: Sequence[ActorPlace],
    not_started: Sequence[str] = (),
) -> str:
    """The header as text (no trailing newline). ``not_started``: actors started on first use
    (``teachers.resident: needed``)."""
    ray_line = f"joined {address}" if address else "started a local Ray"
    ray_line += f"; dashboard {dashboard}" if dashboard else "; no dashboard"
    lines = [
        f"clpd run {run_id} -> {run_dir}",
        f"  ray:       {ray_line}",
        f"  placement: {placement.why}",
    ]
    width = max([len(p.name) for p in places] + [len(n) for n in not_started], default=0)
    for p in places:
        gpus = f"  GPU {','.join(p.gpu_ids)}" if p.gpu_ids else ""
        lines.append(f"  {p.name:<{width}}  {p.node_ip} (node {p.node_id[:8]})  {p.device}{gpus}")
    for name in not_started:
        lines.append(f"  {name:<{width}}  starts when the schedule first needs it")
    return "\n".join(lines)
