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

The operators work on state dicts keyed by the names `growclip_stream.model.clip` defines, build the
new model on the meta device and load the new tensors into it, so the input model is untouched and
the output keeps its device and dtype.

After growth, anything wrapping the old model (optimizer, `torch.compile`, DDP, EMA copies) must be
rebuilt around the new one: parameters are new tensor objects.

Per-element optimizer statistics (Adam's exp_avg, exp_avg_sq) grow with `grow_optimizer_state`: the
same index maps as the weights, except that fan-in splits are *replicated* (each copy of a split
weight receives the original weight's gradient, so it inherits the original's statistics, not a
share of them), new elements of an existing tensor (new MLP units) get zeros, and parameters that
did not exist before (new blocks) get no entry, so the optimizer starts them fresh.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from growclip_stream.model.clip import (
    INIT_STD,
    TOWER_NAMES,
    ArchConfig,
    Block,
    GrowCLIP,
    TowerName,
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


SplitFn = Callable[[torch.Tensor, int, int, torch.Generator | None], torch.Tensor]


def _replicate_split(t: torch.Tensor, dim: int, r: int, generator: torch.Generator | None) -> torch.Tensor:
    """The fan-in map for optimizer statistics: every copy keeps the original's value."""
    return _replicate(t, dim, r)


def _widen_block_rules(
    prefix: str, w: int, r: int, gen: torch.Generator | None, split_fn: SplitFn = _split
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """How each tensor of one block changes when its residual width w is replicated r times."""

    def qkv_weight(t: torch.Tensor) -> torch.Tensor:
        t = _replicate(t.view(3, w, w), 1, r)  # (3, r·w, w): q, k, v each with heads replicated
        return split_fn(t, 2, r, gen).reshape(3 * r * w, r * w)  # fan-in split over the residual copies

    def out_weight(t: torch.Tensor) -> torch.Tensor:
        return split_fn(_replicate(t, 0, r), 1, r, gen)  # (r·w, r·w): residual rows copied, heads split

    def rep0(t: torch.Tensor) -> torch.Tensor:
        return _replicate(t, 0, r)

    return {
        f"{prefix}ln_1.weight": rep0,
        f"{prefix}ln_1.bias": rep0,
        f"{prefix}attn.qkv.weight": qkv_weight,
        f"{prefix}attn.qkv.bias": lambda t: _replicate(t.view(3, w), 1, r).reshape(3 * r * w),
        f"{prefix}attn.out.weight": out_weight,
        f"{prefix}attn.out.bias": rep0,
        f"{prefix}ln_2.weight": rep0,
        f"{prefix}ln_2.bias": rep0,
        f"{prefix}mlp.fc1.weight": lambda t: split_fn(t, 1, r, gen),  # (h, r·w)
        f"{prefix}mlp.fc1.bias": lambda t: t,  # hidden size unchanged
        f"{prefix}mlp.fc2.weight": rep0,
        f"{prefix}mlp.fc2.bias": rep0,
    }


# ----------------------------------------------------------------------------- operators on state dicts


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


def _widen_mlp(arch: ArchConfig, state: State, op: GrowthOp, gen: torch.Generator | None) -> State:
    cfg, n = arch.tower(op.tower), op.amount
    out = dict(state)
    for i in range(cfg.depth):
        p = f"{op.tower}.blocks.{i}.mlp."
        fc1_w, fc1_b, fc2_w = state[p + "fc1.weight"], state[p + "fc1.bias"], state[p + "fc2.weight"]
        fan_in = torch.randn(n, cfg.width, generator=gen, device=_gen_device(gen)) * INIT_STD
        out[p + "fc1.weight"] = torch.cat([fc1_w, fan_in.to(fc1_w)], dim=0)  # (h + n, w)
        out[p + "fc1.bias"] = torch.cat([fc1_b, fc1_b.new_zeros(n)])  # (h + n,)
        out[p + "fc2.weight"] = torch.cat([fc2_w, fc2_w.new_zeros(cfg.width, n)], dim=1)  # (w, h + n)
    return out


def _widen(
    arch: ArchConfig, state: State, op: GrowthOp, gen: torch.Generator | None, split_fn: SplitFn = _split
) -> State:
    tower, r = op.tower, op.amount
    cfg = arch.tower(tower)

    def rep(dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda t: _replicate(t, dim, r)

    def split(dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda t: split_fn(t, dim, r, gen)

    rules: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for i in range(cfg.depth):
        rules.update(_widen_block_rules(f"{tower}.blocks.{i}.", cfg.width, r, gen, split_fn))
    if tower == "image":
        rules["image.patch_embed.weight"] = rep(0)  # (r·w, C, p, p)
        rules["image.class_token"] = rep(0)  # (r·w,)
        rules["image.pos_embed"] = rep(1)  # (T, r·w)
    if tower == "text":
        rules["text.token_embed.weight"] = rep(1)  # (V, r·w)
        rules["text.pos_embed"] = rep(1)  # (L, r·w)
    if tower in ("image", "text"):
        rules[f"{tower}.to_shared.weight"] = split(1)  # (s, r·w)
        rules[f"{tower}.to_shared.bias"] = lambda t: t
    if tower == "shared":
        for name in ("image.to_shared", "text.to_shared", "ln_post"):
            rules[f"{name}.weight"] = rep(0)  # to_shared: (r·s, w_tower); ln_post: (r·s,)
            rules[f"{name}.bias"] = rep(0)
        rules["proj.weight"] = split(1)  # (embed_dim, r·s)
    unhandled = [k for k in state if k.startswith(f"{tower}.") and k not in rules]
    if unhandled:  # a parameter this operator does not know how to widen: fail loudly, not silently
        raise RuntimeError(f"widen:{tower} has no rule for {unhandled}")
    return {k: rules[k](t) if k in rules else t for k, t in state.items()}


_OPERATORS = {"deepen": _deepen, "widen": _widen, "widen_mlp": _widen_mlp}


def grow_state_dict(
    arch: ArchConfig, state: State, op: GrowthOp, generator: torch.Generator | None = None
) -> tuple[ArchConfig, State]:
    """Apply `op` to a GrowCLIP state dict of shape `arch`: (new arch, new state dict). Inputs untouched."""
    with torch.no_grad():
        new_state = _OPERATORS[op.kind](arch, state, op, generator)
    return grow_arch(arch, op), new_state


def _widen_mlp_zeros(arch: ArchConfig, state: State, op: GrowthOp) -> State:
    """widen_mlp for optimizer statistics: the new hidden units' entries are zero."""
    cfg, n = arch.tower(op.tower), op.amount
    out = dict(state)
    for i in range(cfg.depth):
        p = f"{op.tower}.blocks.{i}.mlp."
        if p + "fc1.weight" in state:
            fc1 = state[p + "fc1.weight"]
            out[p + "fc1.weight"] = torch.cat([fc1, fc1.new_zeros(n, cfg.width)])
        if p + "fc1.bias" in state:
            out[p + "fc1.bias"] = torch.cat([state[p + "fc1.bias"], state[p + "fc1.bias"].new_zeros(n)])
        if p + "fc2.weight" in state:
            fc2 = state[p + "fc2.weight"]
            out[p + "fc2.weight"] = torch.cat([fc2, fc2.new_zeros(cfg.width, n)], dim=1)
    return out


def grow_optimizer_state(arch: ArchConfig, state: State, op: GrowthOp) -> tuple[ArchConfig, State]:
    """Grow per-element optimizer statistics (keyed like the model's state dict) along with `op`.

    Same index maps as `grow_state_dict`, deterministic: replicated copies (fan-out rows and fan-in
    splits alike), zeros for new MLP units, no entry for new blocks. `state` may hold any subset of
    the parameters (those with optimizer state); absent keys stay absent. Inputs untouched.
    """
    with torch.no_grad():
        if op.kind == "widen":
            new_state = _widen(arch, state, op, None, _replicate_split)
        elif op.kind == "widen_mlp":
            new_state = _widen_mlp_zeros(arch, state, op)
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
