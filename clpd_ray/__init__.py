"""clpd_ray: Curriculum Learning-Guided Progressive Distillation (CLPD) as a Ray actor system.

The student sees data easy to hard (by chain-of-thought complexity) while climbing a ladder of
teachers weak to strong; a scheduling policy may adapt both online. See README.md.
"""

from clpd_ray.config import Config, load_config
from clpd_ray.data.example import Example
from clpd_ray.errors import ClpdError

__all__ = [
    "ClpdError",
    "Config",
    "Example",
    "__version__",
    "kd_loss",
    "load_config",
    "resume_distillation",
    "run_distillation",
    "sparse_kd_loss",
]

__version__ = "0.1.0"


def __getattr__(name: str):
    # Loaded when first asked for: the runtime imports Ray, the losses torch (an actor that
    # needs neither, such as the scheduler's, starts without them).
    if name in ("run_distillation", "resume_distillation"):
        from clpd_ray.runtime import run

        return getattr(run, name)
    if name in ("kd_loss", "sparse_kd_loss"):
        from clpd_ray.distill import losses

        return getattr(losses, name)
    raise AttributeError(f"module 'clpd_ray' has no attribute {name!r}")
