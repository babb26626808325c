"""The package's layers: only the runtime (and the CLI) may import Ray."""

from __future__ import annotations

import ast
from pathlib import Path

import clpd_ray

PACKAGE = Path(clpd_ray.__file__).parent
ALLOWED = ("runtime/", "cli.py")


def _imports_ray(path: Path) -> bool:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if any(n == "ray" or n.startswith("ray.") for n in names):
            return True
    return False


def test_only_the_runtime_and_cli_import_ray():
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in sorted(PACKAGE.rglob("*.py"))
        if not str(p.relative_to(PACKAGE)).startswith(ALLOWED) and _imports_ray(p)
    ]
    assert offenders == []


def test_the_check_sees_a_ray_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from ray.util import placement_group\n")
    assert _imports_ray(f)
    f.write_text("import json\n")
    assert not _imports_ray(f)


def test_public_api_is_importable_from_the_top_level():
    from clpd_ray import Config, kd_loss, load_config, run_distillation  # noqa: F401
    from clpd_ray.policies import SchedulerPolicy, resolve_policy  # noqa: F401


def test_the_scheduler_actor_starts_without_torch():
    """Its process hosts the policy only: torch (a second of CPU per actor start) stays out."""
    import subprocess
    import sys

    code = (
        "import sys, clpd_ray.runtime.actors.scheduler\n"
        "from clpd_ray.runtime.actors.device import set_threads\n"
        "set_threads(1)\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "import os, torch\n"
        "assert os.environ['OMP_NUM_THREADS'] == '1' and torch.get_num_threads() == 1\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
