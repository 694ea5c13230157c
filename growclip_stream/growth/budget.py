"""What growth costs, counted against the training it displaces: a ledger of work and the search budget.

Training work is counted per step (wall seconds of the step, FLOPs ≈ 3 x forward FLOPs per sample x
samples: forward plus a backward of about twice the forward). Growth work - supernet steps,
scoring candidates, and training the base model beside the grown one during the guard window - is
counted the same way. A search may spend at most `fraction` of all work: its allowance is what keeps
growth / (training + growth) <= fraction, by FLOPs and by wall time, given everything counted so far.
Searches are also timed on their own: a supernet step or a scored sample runs at a different pace
per FLOP than a training step, and a search sized in FLOPs must be turned into wall time at its own pace.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TRAIN_FLOPS_FACTOR", "WorkLedger"]

TRAIN_FLOPS_FACTOR = 3  # a training step's FLOPs per sample, in forward passes (forward + backward)


@dataclass
class WorkLedger:
    train_seconds: float = 0.0
    train_flops: float = 0.0
    growth_seconds: float = 0.0  # supernet training, scoring, guard
    growth_flops: float = 0.0
    search_seconds: float = 0.0  # the searches' part of growth_* (the guard is the rest)
    search_flops: float = 0.0
    # a search beside training adds its work from its own thread
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_train(self, seconds: float, flops: float) -> None:
        with self._lock:
            self.train_seconds += seconds
            self.train_flops += flops

    def add_growth(self, seconds: float, flops: float, *, search: bool = False) -> None:
        with self._lock:
            self.growth_seconds += seconds
            self.growth_flops += flops
            if search:
                self.search_seconds += seconds
                self.search_flops += flops

    def fractions(self) -> dict[str, float]:
        """Share of all work that went to growth, by wall time and by FLOPs (0 before any work)."""

        def share(growth: float, train: float) -> float:
            return growth / (growth + train) if growth + train > 0 else 0.0

        return {
            "wall": share(self.growth_seconds, self.train_seconds),
            "flops": share(self.growth_flops, self.train_flops),
        }

    def allowance(self, fraction: float) -> tuple[float, float]:
        """(FLOPs, seconds) growth may still spend while staying within `fraction` of all work."""
        if fraction >= 1.0:
            return math.inf, math.inf
        k = fraction / (1.0 - fraction)
        return (
            max(0.0, k * self.train_flops - self.growth_flops),
            max(0.0, k * self.train_seconds - self.growth_seconds),
        )

    def seconds_per_flop(self) -> float | None:
        """Training's measured pace, to turn a FLOPs estimate into seconds (None before any step)."""
        return self.train_seconds / self.train_flops if self.train_flops > 0 else None

    def search_seconds_per_flop(self) -> float | None:
        """The searches' measured pace; training's until a search has run (None before any work)."""
        return self.search_seconds / self.search_flops if self.search_flops > 0 else self.seconds_per_flop()

    def to_dict(self) -> dict[str, Any]:
        return {
            "train_seconds": self.train_seconds,
            "train_flops": self.train_flops,
            "growth_seconds": self.growth_seconds,
            "growth_flops": self.growth_flops,
            "search_seconds": self.search_seconds,
            "search_flops": self.search_flops,
            "fractions": self.fractions(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("train", "growth", "search"):
            for unit in ("seconds", "flops"):
                setattr(self, f"{key}_{unit}", float(state.get(f"{key}_{unit}", 0.0)))
