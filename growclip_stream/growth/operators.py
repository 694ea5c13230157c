"""Function-preserving growth operators (DESIGN.md §5).

Each operator maps (architecture, weights) to a larger architecture and weights that compute the
same embeddings (up to float rounding):

- ``deepen:T+n``: n new blocks on top of tower T. Their attention output projection and MLP output
  projection (weights and biases) are zero, so each new block is the identity on the residual; the
  rest of the block is freshly initialised, so those zero projections get non-zero gradients at once.
- ``widen_mlp:T+n``: n new hidden units in every MLP of tower T: random fan-in (the model's init
  scale), zero fan-out. Exact.
- ``widen:T*r``: every residual channel of tower T is replicated r times, laid out [x, x, ..., x];
  heads are replicated with it (head_dim is fixed, so heads *= r). LayerNorm weight and bias are
  replicated, which keeps LayerNorm exact (the mean and variance of [x, x] are those of x; zero
  padding would not be). Weights that write the residual (embeddings, class token, positions,
  attention out-projection, MLP fc2, and to_shared when the shared encoder widens) have their
  fan-out rows replicated. Weights that read a replicated input (qkv, fc1, the out-projection's
  fan-in from the replicated heads, to_shared of a widened tower, proj when the shared encoder
  widens) split each weight w into r parts w·p_1, ..., w·p_r with random positive proportions per
  element summing to 1 (p = u / sum(u), u ~ U(1, 4); for r = 2 that is a ~ U(0.2, 0.8) on [a, 1-a]).
  Exact copies with an even split would get identical gradients forever and the new capacity would
  never be used; the uneven split gives each copy different gradients, so copies diverge.
  Widening the shared encoder also widens ln_post, the outputs of both to_shared linears, and the
  fan-in of proj. MLP hidden size is unchanged.

Which axis of each parameter writes the residual (fan-out), reads it (fan-in) or holds MLP units is
described once, in `growth.layout`; widening, optimizer-state growth and the supernet's extraction
all follow that table.

The operators work on state dicts keyed by the names `growclip_stream.model.clip` defines, build the
new model on the meta device and load the new tensors into it, so the input model is untouched and
the output keeps its device and dtype.

After growth, anything wrapping the old model (optimizer, `torch.compile`, DDP, EMA copies) must be
rebuilt around the new one: parameters are new tensor objects.

Per-element optimizer statistics (Adam's exp_avg, exp_avg_sq) grow with `grow_optimizer_state`: the
same index maps as the weights, scaled to the gradients each grown element will receive. Fan-in
splits are *replicated* (each share of a split weight receives the original weight's gradient, so
it inherits the original's statistics, not a share of them). Fan-out copies receive about 1/r of
the original gradient each (their readers split their weights across the r copies), so exp_avg is
scaled by 1/r and exp_avg_sq by 1/r²; copying exp_avg_sq unscaled would over-state it r² times and
damp those updates for the ~1/(1 − beta2) steps it takes to decay. New elements of an existing
tensor (new MLP units) get zeros, and parameters that did not exist before (new blocks) get no
entry, so the optimizer starts them fresh.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from growclip_stream.growth.layout import axes
from growclip_stream.model.clip import (
    TOWER_NAMES,
    ArchConfig,
    Block,
    GrowCLIP,
    TowerName,
    fan_in_std,
    init_weights,
)

__all__ = [
    "GrowthOp",
    "TowerName",
    "apply_op",
    "apply_ops",
    "grow_arch",
    "grow_optimizer_state",
    "grow_state_dict",
]

OpKind = Literal["deepen", "widen", "widen_mlp"]
_KINDS: tuple[OpKind, ...] = ("deepen", "widen", "widen_mlp")
_OP_RE = re.compile(r"^(?P<kind>widen_mlp|widen|deepen):(?P<tower>[a-z]+)(?P<sign>[+*])(?P<amount>\d+)$")

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class GrowthOp:
    """One growth step on one tower, written ``deepen:image+1``, ``widen:text*2``, ``widen_mlp:shared+64``."""

    kind: OpKind
    tower: TowerName
    amount: int  # deepen: blocks added; widen: integer width factor (>= 2); widen_mlp: hidden units added

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"GrowthOp.kind must be one of {_KINDS}, got {self.kind!r}")
        if self.tower not in TOWER_NAMES:
            raise ValueError(f"GrowthOp.tower must be one of {TOWER_NAMES}, got {self.tower!r}")
        minimum = 2 if self.kind == "widen" else 1
        if not isinstance(self.amount, int) or isinstance(self.amount, bool) or self.amount < minimum:
            raise ValueError(
                f"GrowthOp.amount for {self.kind} must be an int >= {minimum}, got {self.amount!r}"
            )

    def __str__(self) -> str:
        sign = "*" if self.kind == "widen" else "+"
        return f"{self.kind}:{self.tower}{sign}{self.amount}"

    @classmethod
    def parse(cls, s: str) -> GrowthOp:
        m = _OP_RE.match(s.strip()) if isinstance(s, str) else None
        if m is None:
            raise ValueError(
                f"bad growth operator {s!r}: expected KIND:TOWER+N or widen:TOWER*R, with KIND in "
                f"{_KINDS} and TOWER in {TOWER_NAMES} (e.g. 'deepen:image+1', 'widen:text*2', "
                f"'widen_mlp:shared+64')"
            )
        kind, tower, sign = m["kind"], m["tower"], m["sign"]
        if (sign == "*") != (kind == "widen"):
            raise ValueError(f"bad growth operator {s!r}: widen takes '*R', deepen and widen_mlp take '+N'")
        return cls(kind, tower, int(m["amount"]))  # type: ignore[arg-type]  # validated in __post_init__


def grow_arch(arch: ArchConfig, op: GrowthOp) -> ArchConfig:
    """The architecture after `op` (pure; no model is built)."""
    cfg = arch.tower(op.tower)
    if op.kind == "deepen":
        cfg = replace(cfg, depth=cfg.depth + op.amount)
    elif op.kind == "widen":
        cfg = replace(cfg, width=cfg.width * op.amount)
    else:
        cfg = replace(cfg, mlp_hidden=cfg.mlp_hidden + op.amount)
    return arch.replace_tower(op.tower, cfg)


# ----------------------------------------------------------------------------- tensor helpers


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _replicate(t: torch.Tensor, dim: int, r: int) -> torch.Tensor:
    """Fan-out copies: [t, t, ..., t] along `dim`."""
    return torch.cat([t] * r, dim=dim)


def _split(t: torch.Tensor, dim: int, r: int, generator: torch.Generator | None) -> torch.Tensor:
    """Fan-in split: [t·p_1, ..., t·p_r] along `dim`, random positive p per element, sum_c p_c = 1."""
    u = torch.rand((r, *t.shape), generator=generator, device=_gen_device(generator), dtype=torch.float64)
    u = u * 3 + 1  # U(1, 4): for r = 2 the first share is in [0.2, 0.8]
    p = (u / u.sum(0)).to(device=t.device, dtype=t.dtype)
    parts = [t * p[c] for c in range(r - 1)]
    parts.append(t - torch.stack(parts).sum(0))  # the last share makes the sum exact up to rounding
    return torch.cat(parts, dim=dim)


def _deepen(arch: ArchConfig, state: State, op: GrowthOp, gen: torch.Generator | None) -> State:
    cfg = arch.tower(op.tower)
    ref = state["proj.weight"]  # device and dtype of the model
    out = dict(state)
    for k in range(op.amount):
        with torch.device(_gen_device(gen)):
            block = Block(cfg)
        init_weights(block, gen)
        with torch.no_grad():
            for layer in (block.attn.out, block.mlp.fc2):  # zero writes to the residual: identity block
                layer.weight.zero_()
                layer.bias.zero_()
        for name, t in block.state_dict().items():
            out[f"{op.tower}.blocks.{cfg.depth + k}.{name}"] = t.to(device=ref.device, dtype=ref.dtype)
    return out


def _replicate_axis(t: torch.Tensor, dim: int, parts: int, r: int) -> torch.Tensor:
    """Fan-out copies of each of `parts` width-sized blocks along `dim`: per part [x, x, ..., x]."""
    shape = t.shape
    x = t.reshape(*shape[:dim], parts, shape[dim] // parts, *shape[dim + 1 :])
    x = _replicate(x, dim + 1, r)
    return x.reshape(*shape[:dim], parts * r * (shape[dim] // parts), *shape[dim + 1 :])


def _widen(
    arch: ArchConfig, state: State, op: GrowthOp, gen: torch.Generator | None, stats_power: int | None = None
) -> State:
    """Widen tower `op.tower` by `op.amount` following `growth.layout`.

    Weights (`stats_power` None): ``out`` axes are replicated, ``in`` axes split. Optimizer
    statistics (`stats_power` p, the power of the gradient they average: 1 for Adam's exp_avg, 2 for
    exp_avg_sq): ``in`` axes are replicated (each share receives the original gradient), ``out``
    axes replicated and scaled by (1/r)^p (each copy receives about 1/r of it).
    """
    tower, r = op.tower, op.amount
    out: State = {}
    for name, t in state.items():
        for ax in axes(name):
            if ax.tower != tower or ax.role == "hidden":
                continue
            if ax.role == "out":
                t = _replicate_axis(t, ax.dim, ax.parts, r)
                if stats_power:
                    t = t * (1.0 / r) ** stats_power
            elif stats_power is None:
                t = _split(t, ax.dim, r, gen)
            else:
                t = _replicate(t, ax.dim, r)
        out[name] = t
    return out


def _widen_mlp(
    arch: ArchConfig, state: State, op: GrowthOp, gen: torch.Generator | None, stats: bool = False
) -> State:
    """Append `op.amount` MLP units to every block of `op.tower`, following `growth.layout`.

    A new unit reads the residual with fresh random weights (the model's init scale) and writes
    nothing (zero fan-out and bias), so the function is unchanged. For optimizer statistics
    (`stats`) every new entry is zero.
    """
    del arch  # the layout and the tensors' shapes say everything
    n = op.amount
    out: State = {}
    for name, t in state.items():
        layout = axes(name)
        for ax in layout:
            if ax.role != "hidden" or ax.tower != op.tower:
                continue
            shape = list(t.shape)
            shape[ax.dim] = n
            fan_in = next((t.shape[a.dim] for a in layout if a.role == "in"), None)
            if not stats and fan_in is not None:  # the unit's input weights: the model's init scale
                new = torch.randn(shape, generator=gen, device=_gen_device(gen)) * fan_in_std(fan_in)
                new = new.to(t)
            else:
                new = t.new_zeros(shape)
            t = torch.cat([t, new], dim=ax.dim)
        out[name] = t
    return out


_OPERATORS = {"deepen": _deepen, "widen": _widen, "widen_mlp": _widen_mlp}


def grow_state_dict(
    arch: ArchConfig, state: State, op: GrowthOp, generator: torch.Generator | None = None
) -> tuple[ArchConfig, State]:
    """Apply `op` to a GrowCLIP state dict of shape `arch`: (new arch, new state dict). Inputs untouched."""
    with torch.no_grad():
        new_state = _OPERATORS[op.kind](arch, state, op, generator)
    return grow_arch(arch, op), new_state


_STATS_POWER = {"exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}


def grow_optimizer_state(
    arch: ArchConfig, state: State, op: GrowthOp, key: str = "exp_avg_sq"
) -> tuple[ArchConfig, State]:
    """Grow per-element optimizer statistics `key` (keyed like the model's state dict) along with `op`.

    Deterministic, and scaled to the gradients the grown parameters will receive: fan-in shares
    keep the original's statistics (each share gets the original gradient), fan-out copies of a
    widening get them scaled by 1/r for a first moment (`exp_avg`) and 1/r² for a second moment
    (`exp_avg_sq`), since each copy gets about 1/r of the original gradient; other keys are
    replicated unscaled. New MLP units get zeros, new blocks no entry (the optimizer starts them
    fresh). `state` may hold any subset of the parameters; absent keys stay absent. Inputs untouched.
    """
    with torch.no_grad():
        if op.kind == "widen":
            new_state = _widen(arch, state, op, None, stats_power=_STATS_POWER.get(key, 0))
        elif op.kind == "widen_mlp":
            new_state = _widen_mlp(arch, state, op, None, stats=True)
        else:
            new_state = dict(state)  # new blocks have no statistics yet
    return grow_arch(arch, op), new_state


def _rebuild(like: GrowCLIP, arch: ArchConfig, state: State) -> GrowCLIP:
    """A GrowCLIP of shape `arch` holding `state`, never sharing storage with `like`."""
    old = {t.untyped_storage().data_ptr() for t in like.state_dict().values()}
    state = {k: t.clone() if t.untyped_storage().data_ptr() in old else t for k, t in state.items()}
    with torch.device("meta"):  # no throwaway init: the tensors come from `state`
        model = GrowCLIP(arch)
    model.load_state_dict(state, strict=True, assign=True)  # strict + shape checks catch any mismatch
    return model.train(like.training)


def apply_op(model: GrowCLIP, op: GrowthOp, generator: torch.Generator | None = None) -> GrowCLIP:
    """A new model, grown by `op`, computing the same embeddings; `model` is left untouched.

    `generator` drives the random split proportions and new units (new tensors are drawn on its
    device, then moved to the model's). Rebuild optimizers and compiled or distributed wrappers
    around the returned model: its parameters are new tensors.
    """
    arch, state = grow_state_dict(model.arch, model.state_dict(), op, generator)
    return _rebuild(model, arch, state)


def apply_ops(model: GrowCLIP, ops: Sequence[GrowthOp], generator: torch.Generator | None = None) -> GrowCLIP:
    """Apply `ops` in order; always a new model (a plain copy when `ops` is empty)."""
    arch, state = model.arch, model.state_dict()
    for op in ops:
        arch, state = grow_state_dict(arch, state, op, generator)
    return _rebuild(model, arch, state)
