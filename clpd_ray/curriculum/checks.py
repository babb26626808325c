"""Can the configured curriculum stages be formed? Checked before a run directory exists.

Two moments, one rule each:

* :func:`check_task_curriculum` (config time, also behind ``clpd validate``): the embedded task's
  difficulty levels are known from ``task.max_difficulty`` alone, so too few levels for the
  stages, or ``curriculum.boundaries`` that leave a stage empty, are found without any data.
* :func:`check_stages` (once the workload is built): split the real scores exactly as the
  controller will, so a dataset too small for its stages, boundaries that leave a stage empty,
  or scores with fewer distinct values than stages fail here instead of inside the run.

Only policies with ``curriculum == "difficulty"`` need distinct levels: with too few of them
:func:`~clpd_ray.curriculum.sampler.split_stages` would split tie groups at random, so the
"easy -> hard" stages would silently hold random examples.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from clpd_ray.config import Config
from clpd_ray.curriculum.sampler import split_stages
from clpd_ray.errors import ConfigError, DataError

__all__ = ["check_stages", "check_task_curriculum"]

Curriculum = Literal["difficulty", "random", "none"]  # SchedulerPolicy.curriculum
_NO_DIFFICULTY = "a policy without a difficulty curriculum (standard_kd, teacher_only)"


def check_task_curriculum(config: Config, policy: str, curriculum: Curriculum) -> None:
    """Config-only checks for the embedded task with a ``steps`` or ``length`` scorer, whose
    scores take exactly ``task.max_difficulty`` values (difficulty k = k CoT steps)."""
    scorer = config.curriculum.scorer
    if config.data.path is not None or scorer not in ("steps", "length"):
        return  # external data or a loss-based scorer: only the real scores tell
    levels, stages = config.task.max_difficulty, config.curriculum.num_stages
    bounds = config.curriculum.boundaries
    if bounds is not None and scorer == "steps":
        try:
            split_stages(np.arange(1, levels + 1), stages, boundaries=bounds)
        except DataError as err:
            raise ConfigError(
                f"curriculum.boundaries={bounds} with the embedded task (scorer 'steps', "
                f"difficulties 1..{levels} from task.max_difficulty): {err}"
            ) from None
    if bounds is None and curriculum == "difficulty" and levels < stages:
        raise ConfigError(
            f"task.max_difficulty={levels} gives {levels} difficulty levels, fewer than "
            f"curriculum.num_stages={stages}, so policy {policy!r} cannot form its stages by "
            f"difficulty (they would hold random examples); set task.max_difficulty to at least "
            f"{stages}, use at most {levels} stages, or use {_NO_DIFFICULTY}"
        )


def check_stages(
    config: Config, scores: np.ndarray, policy: str, curriculum: Curriculum
) -> list[np.ndarray]:
    """The stages the controller will form from ``scores`` (shape (N,)), or a DataError naming
    the data and the fix. Same arguments as the controller's split, so the same outcome."""
    source = (
        f"data.path {config.data.path}"
        if config.data.path is not None
        else f"the embedded task (task.train_size={config.task.train_size})"
    )
    k = config.curriculum.num_stages
    try:
        stages = split_stages(
            scores,
            k,
            boundaries=config.curriculum.boundaries,
            mode="random" if curriculum == "random" else "difficulty",
            seed=config.seed,
        )
    except DataError as err:
        raise DataError(f"{source}: {err}") from None
    levels = np.unique(np.asarray(scores, dtype=np.float64))
    if config.curriculum.boundaries is None and curriculum == "difficulty" and levels.size < k:
        shown = ", ".join(f"{v:g}" for v in levels[:5])
        raise DataError(
            f"{source}: the {len(scores)} training examples have {levels.size} distinct "
            f"difficulty score(s) ({shown}; curriculum.scorer={config.curriculum.scorer!r}), "
            f"fewer than curriculum.num_stages={k}, so policy {policy!r} cannot form its stages "
            f"by difficulty (they would hold random examples); use at most {levels.size} "
            f"stage(s), another curriculum.scorer, data whose examples differ in difficulty, or "
            f"{_NO_DIFFICULTY}"
        )
    return stages
