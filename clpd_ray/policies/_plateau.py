"""Plateau detection on a noisy, evaluated-now-and-then curve (probe loss, KL to a teacher).

An evaluation is *flat* when it improves on the best value so far by less than a relative
``epsilon`` (a rise counts as flat too, so a regression ends a stage no later than a plateau).
Comparing with the best rather than the previous value keeps one lucky or unlucky probe from
resetting the count. Pure and immutable: ``update`` returns a new tracker.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["Plateau"]


@dataclass(frozen=True)
class Plateau:
    """Best value so far and the run of consecutive flat evaluations since it."""

    count: int = 0  # evaluations seen
    best: float | None = None
    last: float | None = None
    streak: int = 0  # consecutive flat evaluations
    streak_from: float | None = None  # the best value when the current flat run began

    def update(self, value: float, epsilon: float) -> Plateau:
        """Fold in one evaluation (lower is better)."""
        value = float(value)
        if self.best is None:
            if not math.isfinite(value):
                return replace(self, count=self.count + 1, last=value)
            return Plateau(count=self.count + 1, best=value, last=value)
        improvement = (
            (self.best - value) / max(abs(self.best), 1e-12) if math.isfinite(value) else -1.0
        )
        if improvement >= epsilon:
            return Plateau(count=self.count + 1, best=value, last=value)
        return Plateau(
            count=self.count + 1,
            best=min(self.best, value) if math.isfinite(value) else self.best,
            last=value,
            streak=self.streak + 1,
            streak_from=self.best if self.streak == 0 else self.streak_from,
        )

    def restart_streak(self) -> Plateau:
        """Forget the flat run (e.g. after a teacher switch) but keep the best value."""
        return replace(self, streak=0, streak_from=None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Plateau:
        return cls(**state)
