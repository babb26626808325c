"""Curriculum stages and the resumable sampler that draws batches from them.

:func:`split_stages` turns difficulty scores into K stages of example indices, easy to hard:
by quantiles of the scores (ties kept in one stage where possible) or by fixed score
boundaries. ``mode="random"`` gives the random-order control: a random partition with the
same stage sizes, so pacing is identical and only the ordering differs.

:class:`CurriculumSampler` draws batches of indices. Each pool of examples is its own stream
(one per stage, one per replay pool "stages 0..s-1", one over all examples), so drawing from
one never changes what another yields. A stream walks a fresh permutation each epoch; the
permutation of epoch e is drawn by a numpy Generator seeded with (seed, stream, e), so the
whole sampler state is a few integers per stream::

    stream "stage/1":  epoch 0: [perm_0 ... | position]   epoch 1: [perm_1 ...]   ...
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from clpd_ray.errors import DataError

__all__ = ["CurriculumSampler", "split_stages"]

SplitMode = Literal["difficulty", "random"]

# Seed-sequence tags that keep the streams of different pools apart.
_STAGE, _REPLAY, _ALL, _TIES, _RANDOM = 0, 1, 2, 3, 4
_STATE_VERSION = 1


def split_stages(
    scores: Sequence[float] | np.ndarray,
    num_stages: int,
    *,
    boundaries: Sequence[float] | None = None,
    mode: SplitMode = "difficulty",
    seed: int = 0,
) -> list[np.ndarray]:
    """Example indices per stage, easiest stage first; each array sorted ascending (int64).

    Without ``boundaries``, stage k holds the scores between quantiles k/K and (k+1)/K, with
    each cut moved to the nearest change of score so that equal scores share a stage, unless
    that would leave a stage empty (then a tie group is split at random, by ``seed``). With
    ``boundaries`` b_0 < ... < b_{K-2}, stage k holds scores in (b_{k-1}, b_k]. ``mode="random"``
    keeps the resulting stage sizes but fills the stages with a random partition.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"split_stages: scores must be 1-D, got shape {s.shape}")
    if not np.isfinite(s).all():
        bad = int(np.flatnonzero(~np.isfinite(s))[0])
        raise DataError(f"difficulty score of example {bad} is {s[bad]}; scores must be finite")
    if num_stages < 1:
        raise ValueError(f"split_stages: num_stages={num_stages} must be >= 1")
    if mode not in ("difficulty", "random"):
        raise ValueError(f"split_stages: mode={mode!r} is not one of 'difficulty', 'random'")
    if seed < 0:
        raise ValueError(f"split_stages: seed={seed} must be >= 0")
    n = s.size
    if n < num_stages:
        raise DataError(
            f"{n} examples cannot fill {num_stages} curriculum stages (stage {n} would be empty); "
            f"use at most {n} stages"
        )
    if boundaries is None:
        stages = _split_by_quantiles(s, num_stages, seed)
    else:
        stages = _split_by_boundaries(s, num_stages, boundaries)
    if mode == "random":
        perm = np.random.default_rng([seed, _RANDOM]).permutation(n)
        cuts = np.cumsum([len(st) for st in stages])[:-1]
        stages = [np.sort(part) for part in np.split(perm, cuts)]
    return [st.astype(np.int64) for st in stages]


def _split_by_quantiles(s: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    n = s.size
    # Sort by score; a random permutation first makes the order inside a tie group random.
    perm = np.random.default_rng([seed, _TIES]).permutation(n)
    order = perm[np.argsort(s[perm], kind="stable")]
    ranked = s[order]
    breaks = np.flatnonzero(ranked[1:] > ranked[:-1]) + 1  # cut positions between distinct scores
    cuts: list[int] = []
    prev = 0
    for stage in range(1, k):
        ideal = stage * n / k
        lo, hi = prev + 1, n - (k - stage)  # leave at least one example for every later stage
        near = breaks[(breaks >= lo) & (breaks <= hi)]
        if near.size:
            cut = int(near[np.argmin(np.abs(near - ideal))])
        else:  # no score change in range: split a tie group rather than leave a stage empty
            cut = min(max(math.floor(ideal + 0.5), lo), hi)
        cuts.append(cut)
        prev = cut
    return [np.sort(part) for part in np.split(order, cuts)]


def _split_by_boundaries(s: np.ndarray, k: int, boundaries: Sequence[float]) -> list[np.ndarray]:
    b = np.asarray(boundaries, dtype=np.float64)
    if b.shape != (k - 1,):
        raise ValueError(f"split_stages: {b.size} boundaries given; num_stages={k} needs {k - 1}")
    if not np.isfinite(b).all() or (b.size > 1 and np.any(np.diff(b) <= 0)):
        raise ValueError(
            f"split_stages: boundaries {b.tolist()} must be finite and strictly increasing"
        )
    which = np.searchsorted(b, s, side="left")  # stage k holds b[k-1] < score <= b[k]
    stages = [np.flatnonzero(which == stage) for stage in range(k)]
    for stage, members in enumerate(stages):
        if members.size == 0:
            low = "-inf" if stage == 0 else f"{b[stage - 1]:g}"
            high = "inf" if stage == k - 1 else f"{b[stage]:g}"
            raise DataError(
                f"curriculum stage {stage} (scores in ({low}, {high}]) is empty: no example's score "
                f"falls there (scores range {s.min():g}..{s.max():g}); use fewer stages or "
                "other curriculum.boundaries"
            )
    return stages


class _Stream:
    """An endless, epoch-wise reshuffled walk over one pool of indices."""

    def __init__(self, pool: np.ndarray, key: tuple[int, ...]) -> None:
        self.pool = pool
        self.key = key
        self.epoch = 0
        self.position = 0
        self._order: np.ndarray | None = None

    def _current(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.default_rng([*self.key, self.epoch])
            self._order = self.pool[rng.permutation(self.pool.size)]
        return self._order

    def take(self, count: int) -> np.ndarray:
        parts = []
        while count > 0:
            order = self._current()
            got = order[self.position : self.position + count]
            parts.append(got)
            count -= got.size
            self.position += got.size
            if self.position == order.size:  # epoch done: the next draw reshuffles
                self.epoch += 1
                self.position = 0
                self._order = None
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def seek(self, epoch: int, position: int) -> None:
        if epoch < 0 or not 0 <= position < self.pool.size:
            raise ValueError(f"sampler state: epoch={epoch}, position={position} out of range")
        self.epoch, self.position, self._order = epoch, position, None


class CurriculumSampler:
    """Deterministic, resumable batches of example indices from curriculum stages.

    ``next_batch(stage, replay)`` returns ``batch_size`` indices: ``round(replay * batch_size)``
    of them (half rounds up; 0 for stage 0, which has nothing earlier) from the pool of stages
    0..stage-1, the rest from ``stage``; current-stage indices come first. ``stage=None`` draws
    from all examples and ignores ``replay``. Same seed + same state + same calls => same batches.
    """

    def __init__(
        self, stages: Sequence[Sequence[int] | np.ndarray], batch_size: int, seed: int = 0
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"CurriculumSampler: batch_size={batch_size} must be >= 1")
        if seed < 0:
            raise ValueError(f"CurriculumSampler: seed={seed} must be >= 0")
        if not stages:
            raise ValueError("CurriculumSampler: needs at least one stage")
        self._stages = [np.asarray(st, dtype=np.int64).reshape(-1) for st in stages]
        for k, st in enumerate(self._stages):
            if st.size == 0:
                raise DataError(f"curriculum stage {k} is empty; use fewer stages")
        self.batch_size = batch_size
        self.seed = seed
        self._streams: dict[str, _Stream] = {}

    @property
    def num_stages(self) -> int:
        return len(self._stages)

    def next_batch(self, stage: int | None, replay: float = 0.0) -> np.ndarray:
        """The next ``batch_size`` example indices, int64, shape (batch_size,)."""
        if stage is None:
            return self._stream("all").take(self.batch_size)
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"next_batch: stage={stage} is not in 0..{self.num_stages - 1}")
        if not 0.0 <= replay < 1.0:
            raise ValueError(f"next_batch: replay={replay} must be in [0, 1)")
        n_replay = math.floor(replay * self.batch_size + 0.5) if stage > 0 else 0
        current = self._stream(f"stage/{stage}").take(self.batch_size - n_replay)
        if n_replay == 0:
            return current
        earlier = self._stream(f"replay/{stage}").take(n_replay)
        return np.concatenate([current, earlier])

    def _stream(self, name: str) -> _Stream:
        stream = self._streams.get(name)
        if stream is None:
            kind, _, num = name.partition("/")
            k = int(num) if num.isdigit() else -1
            if kind == "stage" and 0 <= k < self.num_stages:
                pool, key = self._stages[k], (self.seed, _STAGE, k)
            elif kind == "replay" and 0 < k < self.num_stages:
                pool, key = np.concatenate(self._stages[:k]), (self.seed, _REPLAY, k)
            elif name == "all":
                pool, key = np.concatenate(self._stages), (self.seed, _ALL, 0)
            else:
                raise ValueError(f"sampler state: unknown stream {name!r}")
            stream = self._streams[name] = _Stream(pool, key)
        return stream

    def _fingerprint(self) -> int:
        crc = 0
        for st in self._stages:
            crc = zlib.crc32(np.int64(st.size).tobytes(), crc)
            crc = zlib.crc32(st.tobytes(), crc)
        return crc

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of every stream used so far."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "stage_sizes": [int(st.size) for st in self._stages],
            "fingerprint": self._fingerprint(),
            "streams": {
                name: {"epoch": int(s.epoch), "position": int(s.position)}
                for name, s in sorted(self._streams.items())
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the sampler must have the same stages and seed."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"sampler state has version {state.get('version')!r}; expected {_STATE_VERSION}"
            )
        if state.get("seed") != self.seed:
            raise ValueError(
                f"sampler state was saved with seed {state.get('seed')!r}, this sampler has seed "
                f"{self.seed}; resume with the run's original seed"
            )
        if state.get("fingerprint") != self._fingerprint():
            raise ValueError(
                f"sampler state was saved for stages of sizes {state.get('stage_sizes')}, this "
                f"sampler has {[int(st.size) for st in self._stages]} (or other members); "
                "resume with the same data and curriculum settings"
            )
        self._streams = {}
        for name, pos in state["streams"].items():
            self._stream(name).seek(int(pos["epoch"]), int(pos["position"]))
