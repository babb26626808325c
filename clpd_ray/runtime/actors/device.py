"""Which torch device an actor uses, from the GPUs Ray assigned to it (not from CUDA visibility).

Since Ray 2.50, an actor with ``num_gpus=0`` still sees every GPU, so ``torch.cuda.is_available()``
says nothing about what the actor owns: ``ray.get_gpu_ids()`` does. Logical GPUs declared on a
CPU machine (``ray.init(num_gpus=3)``) are assigned like real ones but fall back to the CPU.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["actor_location", "assigned_gpu_ids", "pick_device", "set_threads"]


def assigned_gpu_ids() -> list[str]:
    try:
        import ray

        return [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
    except Exception:  # outside a Ray worker
        return []


def pick_device() -> torch.device:
    """cuda:0 (Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU) when one is assigned and real.

    ``CLPD_DEVICE`` (e.g. ``cpu``, ``cuda``) overrides the choice, for running the actor classes
    in-process on a GPU (benchmarks/gpu_check.py) or forcing the CPU.
    """
    import torch

    forced = os.environ.get("CLPD_DEVICE")
    if forced:
        return torch.device(forced)
    if assigned_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def set_threads(n: int | None) -> None:
    """Torch's intra-op threads: set now where torch is loaded, else through the environment for
    when it is (the scheduler's process does not load torch unless a user policy does)."""
    if not n:
        return
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    else:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)


def actor_location(actor: Any) -> dict[str, Any]:
    """Run inside an actor (``__ray_call__``): its node, device and assigned GPUs.

    Defined here, in a module that loads neither torch nor transformers: Ray ships a function by
    reference, so the actor's process imports the module that defines it, and the scheduler's
    process would otherwise load the whole model stack (about 5 CPU-seconds) to answer."""
    import ray

    ctx = ray.get_runtime_context()
    return {
        "node_ip": ray.util.get_node_ip_address(),
        "node_id": ctx.get_node_id(),
        "device": str(getattr(actor, "device", "cpu")),
        "gpu_ids": tuple(str(g) for g in ray.get_gpu_ids()),
    }
