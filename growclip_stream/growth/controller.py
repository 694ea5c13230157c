"""The growth controller: decides when to grow (triggers) and how (a policy), applies it, keeps history.

The policy is the seam for architecture selection: `ScheduledPolicy` walks a configured plan of
operators; a supernet-based policy can replace it behind the same `GrowthPolicy` protocol.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from growclip_stream.growth.config import GrowthConfig
from growclip_stream.growth.operators import GrowthOp, apply_ops, grow_arch
from growclip_stream.growth.triggers import DataVolumeTrigger, TriggerState
from growclip_stream.model import ArchConfig, GrowCLIP


@dataclass(frozen=True)
class GrowthChoice:
    """A policy's answer: the operators to apply and why they were chosen."""

    ops: tuple[GrowthOp, ...]
    reason: str
    candidates: tuple[dict[str, Any], ...] = ()  # every candidate considered, with its score or why skipped


@dataclass(frozen=True)
class GrowthEvent:
    """One growth, as recorded in the history (served by /v1/model, kept in checkpoints)."""

    generation: int  # generation of the grown model
    step: int
    samples: int
    trigger: str
    ops: tuple[str, ...]
    reason: str
    candidates: tuple[dict[str, Any], ...]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    arch_after: dict[str, Any]
    duration_s: float
    finished_at: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ops"] = list(self.ops)
        d["candidates"] = [dict(c) for c in self.candidates]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GrowthEvent:
        return cls(**{**d, "ops": tuple(d["ops"]), "candidates": tuple(dict(c) for c in d["candidates"])})


class GrowthPolicy(Protocol):
    def choose(self, model: GrowCLIP) -> GrowthChoice | None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ScheduledPolicy:
    """Cycles through a fixed plan of operators, skipping any that would break the size bounds."""

    def __init__(self, cfg: GrowthConfig) -> None:
        self.plan = tuple(GrowthOp.parse(s) for s in cfg.plan)
        self.max_params = cfg.max_params
        self.max_flops_factor = cfg.max_flops_factor
        self.cursor = 0

    def _check(self, arch: ArchConfig, op: GrowthOp) -> tuple[ArchConfig | None, str]:
        grown = grow_arch(arch, op)
        if grown.num_params() == arch.num_params():
            return None, "adds no parameters (e.g. widening the MLP of a tower without blocks)"
        if grown.num_params() > self.max_params:
            return None, f"over max_params ({grown.num_params()} > {self.max_params})"
        factor = grown.flops_per_sample() / arch.flops_per_sample()
        if factor > self.max_flops_factor:
            return None, f"FLOPs x{factor:.2f} over max_flops_factor {self.max_flops_factor}"
        return grown, "fits"

    def choose(self, model: GrowCLIP) -> GrowthChoice | None:
        arch = model.arch
        considered: list[dict[str, Any]] = []
        for i in range(len(self.plan)):
            idx = (self.cursor + i) % len(self.plan)
            op = self.plan[idx]
            grown, verdict = self._check(arch, op)
            considered.append({"ops": [str(op)], "verdict": verdict})
            if grown is not None:
                self.cursor = (idx + 1) % len(self.plan)
                return GrowthChoice(
                    ops=(op,),
                    reason=f"next operator of the plan within bounds (plan position {idx})",
                    candidates=tuple(considered),
                )
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = int(state.get("cursor", 0)) % len(self.plan)


class GrowthController:
    """Owns the growth decisions and their history; the trainer swaps in the model it returns."""

    def __init__(self, cfg: GrowthConfig, policy: GrowthPolicy | None = None) -> None:
        self.cfg = cfg
        self.trigger = DataVolumeTrigger(cfg.samples_per_param, cfg.min_interval_samples)
        self.policy: GrowthPolicy = policy or ScheduledPolicy(cfg)
        self.history: list[GrowthEvent] = []
        self.samples_at_last_growth = 0
        self._generator = torch.Generator().manual_seed(cfg.seed)

    @property
    def generation(self) -> int:
        return len(self.history)

    def capped(self) -> bool:
        return self.cfg.max_growths > 0 and self.generation >= self.cfg.max_growths

    def due(self, samples_trained: int, num_params: int) -> str | None:
        """Name of the trigger that fires now, or None."""
        if not self.cfg.enabled or self.capped():
            return None
        state = TriggerState(samples_trained - self.samples_at_last_growth, num_params)
        return self.trigger.name if self.trigger.fires(state) else None

    def grow(
        self, model: GrowCLIP, *, trigger: str, step: int, samples: int
    ) -> tuple[GrowCLIP, GrowthEvent] | None:
        """Grow ``model`` (left untouched) and record the event; None when no candidate fits the bounds."""
        start = time.monotonic()
        choice = self.policy.choose(model)
        self.samples_at_last_growth = (
            samples  # also on a refusal, so a capped model does not retry every step
        )
        if choice is None:
            return None
        grown = apply_ops(model, choice.ops, generator=self._generator)
        event = GrowthEvent(
            generation=self.generation + 1,
            step=step,
            samples=samples,
            trigger=trigger,
            ops=tuple(str(op) for op in choice.ops),
            reason=choice.reason,
            candidates=choice.candidates,
            params_before=model.arch.num_params(),
            params_after=grown.arch.num_params(),
            flops_before=model.arch.flops_per_sample(),
            flops_after=grown.arch.flops_per_sample(),
            arch_after=grown.arch.to_dict(),
            duration_s=time.monotonic() - start,
            finished_at=time.time(),
        )
        self.history.append(event)
        return grown, event

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [e.to_dict() for e in self.history],
            "samples_at_last_growth": self.samples_at_last_growth,
            "policy": self.policy.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore history and trigger state from a checkpoint (the model itself comes from its weights)."""
        self.history = [GrowthEvent.from_dict(e) for e in state.get("history", [])]
        self.samples_at_last_growth = int(state.get("samples_at_last_growth", 0))
        self.policy.load_state_dict(state.get("policy", {}))
