"""When to grow: triggers look at the training stream and say whether (and why) to grow now."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TriggerState:
    """What a trigger sees at a decision point."""

    samples_since_growth: int
    num_params: int


@dataclass(frozen=True)
class DataVolumeTrigger:
    """Fires once enough data arrived since the last growth, relative to model size.

    Larger models need more data before the extra capacity pays off, so the threshold scales
    with the parameter count; ``min_interval_samples`` keeps a tiny model from growing every step.
    """

    samples_per_param: float
    min_interval_samples: int
    name: str = "data_volume"

    def threshold(self, num_params: int) -> int:
        return max(self.min_interval_samples, int(self.samples_per_param * num_params))

    def fires(self, state: TriggerState) -> bool:
        return state.samples_since_growth >= self.threshold(state.num_params)
