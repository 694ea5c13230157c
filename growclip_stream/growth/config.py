"""Configuration of the growth controller."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PLAN = (
    "deepen:image+1",
    "deepen:text+1",
    "widen_mlp:image+64",
    "widen_mlp:text+64",
    "deepen:shared+1",
    "widen:image*2",
    "widen:text*2",
)


@dataclass(frozen=True)
class GrowthConfig:
    enabled: bool = True
    # Data-volume trigger: grow once the samples trained since the last growth reach
    # samples_per_param x the model's parameter count (bigger models must see more data first).
    samples_per_param: float = 0.5
    min_interval_samples: int = 5_000  # never grow sooner than this after the previous growth
    max_params: int = 5_000_000  # size cap: no candidate above it is chosen
    max_flops_factor: float = 4.0  # one growth step may multiply FLOPs per sample by at most this
    max_growths: int = 0  # stop growing after this many events; 0 = no limit
    # Ordered operators the scheduled policy cycles through (see growth.operators.GrowthOp.parse);
    # an operator that would break a bound is skipped.
    plan: tuple[str, ...] = DEFAULT_PLAN
    seed: int = 0  # seeds the random splits of widening

    __pydantic_config__ = {"extra": "forbid"}  # noqa: RUF012 - read by the daemon's config validation

    def __post_init__(self) -> None:
        from growclip_stream.growth.operators import GrowthOp

        if self.samples_per_param < 0:
            raise ValueError("samples_per_param must be >= 0")
        if self.min_interval_samples < 0:
            raise ValueError("min_interval_samples must be >= 0")
        if self.max_flops_factor <= 1:
            raise ValueError("max_flops_factor must be > 1")
        if not self.plan:
            raise ValueError("plan must name at least one operator")
        for op in self.plan:
            GrowthOp.parse(op)  # raises ValueError naming the bad operator
