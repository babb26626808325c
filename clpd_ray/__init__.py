"""clpd_ray: Curriculum Learning-Guided Progressive Distillation (CLPD) as a Ray actor system.

The student sees data easy to hard (by chain-of-thought complexity) while climbing a ladder of
teachers weak to strong; a scheduling policy may adapt both online. See README.md.
"""

from clpd_ray.config import Config, load_config
from clpd_ray.errors import ClpdError
from clpd_ray.example import Example
from clpd_ray.losses import kd_loss, sparse_kd_loss

__all__ = [
    "ClpdError",
    "Config",
    "Example",
    "__version__",
    "kd_loss",
    "load_config",
    "sparse_kd_loss",
]

__version__ = "0.1.0"
