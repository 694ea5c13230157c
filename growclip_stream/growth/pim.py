"""Parameter Inheriting with Momentum (PIM): how the grown model's weights and optimizer state start.

GrowCLIP's PIM keeps the old model's knowledge while helping the grown model out of the old model's
local minimum; the paper gives no public formula, so we build two readings behind `pim_mode` and
measure them (DESIGN.md §5). `momentum` m is in [0, 1]; m = 1 is plain function-preserving
inheritance in both modes.

- ``blend``: θ = m·θ_inherited + (1 − m)·θ_supernet, per parameter of the chosen candidate.
  θ_inherited is the candidate extracted from the current model grown in the supernet's layout
  (`Supernet.grow_like`: the same split proportions and new units the supernet was built with;
  the supernet as constructed when the model has not moved since): function-preserving, the same
  embeddings as the current model. θ_supernet is the candidate extracted after supernet training.
  Both share one layout, so the blend is a straight line between a model that equals the current
  one and the very candidate the supernet scored.
  m = 0 is the supernet's extraction exactly.
- ``ema``: as in AutoProg's momentum growth, grow from θ_base = m·θ_last + (1 − m)·θ_ema, where
  θ_ema is an exponential moving average of the pre-growth weights (`WeightEMA`, updated by the
  trainer every step), then apply the candidate's operators (function-preserving w.r.t. θ_base).
  The supernet only selects in this mode; its trained weights are not used.

Optimizer state (Staged Training's lesson: grow it too, or the first steps after growth are taken
with an empty Adam history): `carry_optimizer_state` moves exp_avg / exp_avg_sq / step of every
inherited parameter into the new optimizer, grown with the operators' index maps
(`growth.operators.grow_optimizer_state`: fan-in shares replicated, fan-out copies scaled to the
~1/r share of the gradient each will receive, new elements zero); parameters with no old
counterpart (new blocks) start fresh. The learning rate re-warms either way (the trainer's job).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from growclip_stream.growth.config import GrowthConfig
from growclip_stream.growth.operators import GrowthOp, apply_ops, grow_optimizer_state
from growclip_stream.growth.space import Candidate, canonical_ops
from growclip_stream.growth.supernet import Supernet, model_from_state
from growclip_stream.model.clip import ArchConfig, GrowCLIP

__all__ = ["WeightEMA", "blend", "carry_optimizer_state", "ema_inherit", "inherit"]

State = dict[str, torch.Tensor]


def _check_momentum(momentum: float) -> None:
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")


def _mix(a: torch.Tensor, b: torch.Tensor, m: float) -> torch.Tensor:
    """m·a + (1 − m)·b, exactly a at m = 1 and exactly b at m = 0."""
    if m == 1.0:
        return a.clone()
    if m == 0.0:
        return b.clone()
    return m * a + (1.0 - m) * b


class WeightEMA:
    """An exponential moving average of a model's parameters (for pim_mode "ema").

    Call `update(model)` after every optimizer step; after a growth, `reset(grown_model)` starts a
    new average at the grown shape. The average is kept on the model's device and dtype.
    """

    def __init__(self, model: GrowCLIP, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay!r}")
        self.decay = decay
        self.reset(model)

    def reset(self, model: GrowCLIP) -> None:
        self.arch = model.arch
        self.state: State = {k: p.detach().clone() for k, p in model.named_parameters()}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: GrowCLIP) -> None:
        if model.arch != self.arch:
            raise ValueError("the model's architecture changed since the EMA started: call reset(model)")
        for name, p in model.named_parameters():
            self.state[name].lerp_(p.detach(), 1.0 - self.decay)  # ema += (1 - decay)·(p - ema)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "updates": self.updates,
            "arch": self.arch.to_dict(),
            "state": dict(self.state),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        arch = ArchConfig.from_dict(state["arch"])
        if arch != self.arch or set(state["state"]) != set(self.state):
            raise ValueError("EMA state is for a different architecture")
        for k, v in state["state"].items():
            self.state[k].copy_(v)
        self.updates = int(state["updates"])


def blend(
    supernet: Supernet, candidate: Candidate, momentum: float, model: GrowCLIP | None = None
) -> GrowCLIP:
    """PIM "blend": m·inherited (function-preserving) + (1 − m)·supernet-trained weights of `candidate`.

    The inherited end is `model` (default: the supernet's base as it was) grown in the supernet's
    own layout (`Supernet.grow_like`: the same split proportions and new units), so m = 1 computes
    `model`'s function and m = 0 is exactly the candidate the supernet scored.
    """
    _check_momentum(momentum)
    with torch.no_grad():
        source = supernet.initial_state if model is None else supernet.grow_like(model)
        inherited = supernet.extract_state(candidate, source)
        trained = supernet.extract_state(candidate)
        state = {k: _mix(inherited[k], trained[k], momentum) for k in inherited}
    return model_from_state(candidate.arch, state, supernet.model.training)


def ema_inherit(
    model: GrowCLIP,
    ema: WeightEMA,
    ops: Sequence[GrowthOp],
    momentum: float,
    generator: torch.Generator | None = None,
) -> GrowCLIP:
    """PIM "ema": grow m·θ_last + (1 − m)·θ_ema by `ops` (canonical order); `model` is untouched."""
    _check_momentum(momentum)
    if ema.arch != model.arch:
        raise ValueError("the EMA does not match the model's architecture (reset it after each growth)")
    with torch.no_grad():
        current = dict(model.named_parameters())
        state = {k: _mix(p.detach(), ema.state[k], momentum) for k, p in current.items()}
    base = model_from_state(model.arch, state, model.training)
    return apply_ops(base, canonical_ops(ops), generator)


def inherit(
    cfg: GrowthConfig,
    *,
    model: GrowCLIP,
    candidate: Candidate,
    supernet: Supernet | None = None,
    ema: WeightEMA | None = None,
    generator: torch.Generator | None = None,
) -> GrowCLIP:
    """The grown model for `candidate` under `cfg.pim_mode` and `cfg.momentum`."""
    if cfg.pim_mode == "blend":
        if supernet is None:
            raise ValueError("pim_mode 'blend' needs the supernet the candidate was selected from")
        return blend(supernet, candidate, cfg.momentum, model)
    if ema is None:
        raise ValueError("pim_mode 'ema' needs the WeightEMA of the pre-growth model")
    return ema_inherit(model, ema, candidate.ops, cfg.momentum, generator)


def carry_optimizer_state(
    old_model: GrowCLIP,
    old_optimizer: torch.optim.Optimizer,
    new_model: GrowCLIP,
    new_optimizer: torch.optim.Optimizer,
    ops: Sequence[GrowthOp],
) -> dict[str, int]:
    """Carry the old optimizer's per-parameter state into `new_optimizer` (built around `new_model`).

    Tensors shaped like their parameter (exp_avg, exp_avg_sq, max_exp_avg_sq) grow with `ops`'
    index maps; scalars (step) are copied. Parameters without old state start fresh. Returns counts:
    parameters carried unchanged, carried grown, and fresh.
    """
    arch = old_model.arch
    ordered = canonical_ops(ops)
    scalars: dict[str, dict[str, Any]] = {}  # parameter name -> non-elementwise state (step)
    per_element: dict[str, State] = {}  # state key (exp_avg, ...) -> {parameter name: tensor}
    old_shapes: dict[str, torch.Size] = {}
    for name, p in old_model.named_parameters():
        old_state = old_optimizer.state.get(p)
        if not old_state:
            continue
        old_shapes[name] = p.shape
        scalars[name] = {}
        for key, v in old_state.items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0:
                per_element.setdefault(key, {})[name] = v.detach()
            else:
                scalars[name][key] = v
    grown: dict[str, State] = {}
    for key, tensors in per_element.items():
        a = arch
        for op in ordered:
            a, tensors = grow_optimizer_state(a, tensors, op, key)
        grown[key] = tensors
    expected = arch
    for op in ordered:
        expected = grow_optimizer_state(expected, {}, op)[0]
    if expected != new_model.arch:
        raise ValueError("ops do not grow the old model's architecture into the new model's")

    counts = {"unchanged": 0, "grown": 0, "fresh": 0}
    for name, p in new_model.named_parameters():
        if name not in scalars:
            counts["fresh"] += 1
            continue
        st: dict[str, Any] = {
            k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in scalars[name].items()
        }
        for key, tensors in grown.items():
            if name in tensors:
                t = tensors[name]
                if t.shape != p.shape:
                    raise RuntimeError(
                        f"grown optimizer state {key} of {name} is {tuple(t.shape)}, not {tuple(p.shape)}"
                    )
                st[key] = t.to(device=p.device, dtype=p.dtype, copy=True)
        new_optimizer.state[p] = st
        counts["unchanged" if old_shapes[name] == p.shape else "grown"] += 1
    return counts
