"""What a synthetic reasoning task provides, so held-out problems can be drawn for any of them.

A task's problems of difficulty k (k CoT steps) form a finite set that can be enumerated: each
has an index in ``[0, space(k))``, ``index(prompt)`` finds it and ``from_index(k, i)`` builds the
example back. That is all :func:`clpd_ray.data.task.held_out_split` needs to draw evaluation and
probe problems that training does not hold, by construction. ``generate`` draws the training
rows (difficulty uniform over 1..max_difficulty, one random stream per split, deterministic by
seed). Every task writes in the character alphabet ``TASK_ALPHABET``, so the tokenizer, the
built models' vocabulary and the answer extractor are the same for all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from clpd_ray.data.example import Example

__all__ = ["SPLIT_STREAMS", "SyntheticTask", "balanced_levels", "split_rng"]

SPLIT_STREAMS = {"train": 0, "eval": 1, "probe": 2}  # independent random streams per split


def split_rng(seed: int, split: str, *tag: int) -> np.random.Generator:
    """The random stream of ``split`` at ``seed``; ``tag`` keeps other draws' streams apart."""
    if split not in SPLIT_STREAMS:
        raise ValueError(f"split must be 'train', 'eval' or 'probe', got {split!r}")
    return np.random.default_rng([seed, SPLIT_STREAMS[split], *tag])


def balanced_levels(rng: np.random.Generator, n: int, levels: Sequence[int]) -> np.ndarray:
    """``n`` difficulties spread evenly over ``levels`` (counts differ by at most one), shuffled."""
    ks = np.asarray(levels)[np.arange(n) % len(levels)]
    rng.shuffle(ks)
    return ks


@dataclass(frozen=True)
class SyntheticTask:
    """One embedded task: how to draw its examples and how to enumerate its problems."""

    name: str  # task.name in the config
    generate: Callable[[int, int, int, str], list[Example]]  # (n, max_difficulty, seed, split)
    space: Callable[[int], int]  # distinct problems of difficulty k
    index: Callable[[str], tuple[int, int]]  # prompt -> (k, index); ValueError if not a prompt
    from_index: Callable[[int, int], Example]  # (k, index) -> the example
