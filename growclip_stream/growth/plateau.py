"""The loss-plateau trigger: grow when the training loss has stopped falling (DESIGN.md §5).

The per-step training loss of a stream is noisy, so it is first smoothed with an exponential moving
average (`LossSmoother`, decay `plateau_smoothing`). The trigger fits a least-squares line to the
last `patience` smoothed values and fires when its slope is above −`threshold` (loss units per
step), i.e. the loss falls slower than that, or rises. It never fires sooner than `patience` steps
after the last growth, so the window never straddles a growth event, and a grown model always gets
that long to show what its new capacity does.

Like the data-volume trigger (growth.triggers), it is a frozen dataclass with a `name` and
`fires(state)`; the history it reads is kept by the caller in a `LossSmoother`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["LossSmoother", "PlateauState", "PlateauTrigger", "slope"]


def slope(values: Sequence[float]) -> float:
    """Least-squares slope of `values` against their index (0, 1, ...): units per step."""
    n = len(values)
    if n < 2:
        raise ValueError("a slope needs at least 2 values")
    mean_x = (n - 1) / 2
    mean_y = sum(values) / n
    sxy = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(values))
    sxx = n * (n * n - 1) / 12  # sum of (i - mean_x)² over 0..n-1
    return sxy / sxx


class LossSmoother:
    """EMA of the training loss, keeping the last `window` smoothed values (non-finite losses skipped)."""

    def __init__(self, decay: float, window: int) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window!r}")
        self.decay = decay
        self.values: deque[float] = deque(maxlen=window)
        self.current: float | None = None

    def update(self, loss: float) -> float | None:
        """Fold in one step's loss; returns the smoothed value (None until a finite loss arrived)."""
        if math.isfinite(loss):
            self.current = (
                loss if self.current is None else self.decay * self.current + (1 - self.decay) * loss
            )
            self.values.append(self.current)
        return self.current

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current, "values": list(self.values)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current = state.get("current")
        self.values.clear()
        self.values.extend(float(v) for v in state.get("values", []))


@dataclass(frozen=True)
class PlateauState:
    """What the plateau trigger sees at a decision point."""

    smoothed: Sequence[float]  # smoothed training loss, one value per step, oldest first
    steps_since_growth: int


@dataclass(frozen=True)
class PlateauTrigger:
    """Fires when the smoothed training loss stopped falling over the last `patience` steps."""

    patience: int  # slope window, and the minimum number of steps since the last growth
    threshold: float  # fires when slope > -threshold (loss units per step)
    name: str = "plateau"

    def __post_init__(self) -> None:
        if self.patience < 2:
            raise ValueError(f"patience must be >= 2, got {self.patience!r}")
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold!r}")

    def slope(self, state: PlateauState) -> float | None:
        """Slope over the last `patience` smoothed values (None while fewer are known)."""
        if len(state.smoothed) < self.patience:
            return None
        return slope(list(state.smoothed)[-self.patience :])

    def fires(self, state: PlateauState) -> bool:
        if state.steps_since_growth < self.patience:
            return False
        s = self.slope(state)
        return s is not None and s > -self.threshold
