"""A weight-sharing supernet over the growth space, with elastic depth, width and MLP size.

The supernet is the union of all candidates: per tower the largest depth increase, the largest MLP
increase and a width factor every candidate's factor divides (their least common multiple; with the
default space simply x2). It is built from the current model with the function-preserving operators
(`apply_ops`, canonical order widen, widen_mlp, deepen), so new blocks sit on top of the old ones at
the grown width and MLP size, new MLP units follow the old ones, and widened channels are laid out
as R copies [x, x, ..., x] of the old ones.

Every candidate - and the no-growth base, `Supernet.reference` - is a sub-network sharing the
supernet's weights, obtained by a differentiable *extraction map* (linear in the supernet's weights):

- depth: keep the first blocks of each tower (new blocks were appended on top);
- MLP: keep the first hidden units (new units were appended);
- width: a candidate widening tower T by r where the supernet widened it by R (r divides R) gets
  the R copies *folded* into r: supernet copy a·r + j belongs to candidate copy j. Dimensions that
  read the replicated residual (fan-in: qkv, fc1, the out-projection's head inputs, to_shared of a
  widened tower, proj) *sum* over the folded copies, since the widening split each weight into
  proportions that sum to 1, this returns the unsplit weight exactly at construction. Dimensions
  that write the residual or the heads (fan-out rows, embeddings, positions, LayerNorm gains and
  biases, q/k/v rows) take the *mean* of the folded copies, which are equal at construction.

Consequences, both tested: before any supernet training every candidate's extraction computes the
same function as the current model (the fold undoes the splits, dropped units and blocks had zero
output), and a candidate run through `forward_candidate` (the map, then `torch.func.functional_call`
on a weightless skeleton of its architecture) computes exactly what its standalone `extract` does,
while gradients flow into the shared supernet weights.

Training uses the sandwich rule (BigNAS): every step accumulates the gradients of the smallest
sub-network, the largest one - the whole supernet (`Supernet.full`), so every operator's new
weights train at every step, even those no single candidate holds all of - and `sample_k`
candidates drawn at random. The smallest
sub-network of this space is the no-growth base; training it keeps a fair reference for selection,
which compares candidates against the base after the *same* supernet training instead of against the
model before it (which would credit every candidate with the extra training steps).
"""

from __future__ import annotations

import copy
import functools
import math
import random
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.func import functional_call

from growclip_stream.batch import Batch
from growclip_stream.growth.budget import TRAIN_FLOPS_FACTOR
from growclip_stream.growth.layout import axes, block_index
from growclip_stream.growth.operators import GrowthOp, apply_ops
from growclip_stream.growth.space import Candidate, canonical_ops, make_candidate
from growclip_stream.model.clip import TOWER_NAMES, ArchConfig, ClipLoss, ClipOutput, GrowCLIP, TowerName
from growclip_stream.optim import OptimizerSettings, build_optimizer

__all__ = ["Supernet", "meta_model", "model_from_state", "union_ops"]

State = dict[str, torch.Tensor]


def _fold(
    t: torch.Tensor, dim: int, parts: int, width: int, big: int, small: int, reduce: str
) -> torch.Tensor:
    """Fold `big` copies of a width-`width` layout along `dim` into `small` copies (small divides big)."""
    if big == small:
        return t
    groups = big // small
    shape = t.shape
    x = t.reshape(*shape[:dim], parts, groups, small * width, *shape[dim + 1 :])  # copy a·small + j -> (a, j)
    x = x.mean(dim + 1) if reduce == "out" else x.sum(dim + 1)
    return x.reshape(*shape[:dim], parts * small * width, *shape[dim + 1 :])


@functools.lru_cache(maxsize=64)
def _meta_template(arch: ArchConfig) -> GrowCLIP:
    """A weightless GrowCLIP of shape `arch` on the meta device; never mutated, only deep-copied."""
    with torch.device("meta"):
        return GrowCLIP(arch)


def meta_model(arch: ArchConfig) -> GrowCLIP:
    """A fresh weightless GrowCLIP of shape `arch` (a copy of a cached template: no init cost)."""
    return copy.deepcopy(_meta_template(arch))


def model_from_state(arch: ArchConfig, state: State, training: bool = True) -> GrowCLIP:
    """A standalone GrowCLIP of shape `arch` holding (detached, contiguous copies of) `state`."""
    tensors = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in state.items()}
    model = meta_model(arch)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.train(training)


def _widen_factor(ops: Iterable[GrowthOp], tower: TowerName) -> int:
    factor = 1
    for op in ops:
        if op.kind == "widen" and op.tower == tower:
            factor *= op.amount
    return factor


def union_ops(candidates: Sequence[Candidate]) -> tuple[GrowthOp, ...]:
    """The supernet's operators: per tower the lcm of widen factors, the max MLP and depth increase."""
    ops: list[GrowthOp] = []
    for tower in TOWER_NAMES:
        factor = math.lcm(*(_widen_factor(c.ops, tower) for c in candidates))
        if factor > 1:
            ops.append(GrowthOp("widen", tower, factor))
        for kind in ("widen_mlp", "deepen"):
            amount = max(
                (op.amount for c in candidates for op in c.ops if (op.kind, op.tower) == (kind, tower)),
                default=0,
            )
            if amount:
                ops.append(GrowthOp(kind, tower, amount))
    return canonical_ops(ops)


class Supernet:
    """The union of `candidates`, grown from `base` (left untouched); every candidate shares its weights.

    `generator` drives the random split proportions and new units of the growth (see
    growth.operators). `train_cfg` gives the AdamW settings (`build_optimizer`) and gradient clip;
    `sample_k` random candidates join the sandwich each step; `seed` seeds that sampling.
    """

    def __init__(
        self,
        base: GrowCLIP,
        candidates: Sequence[Candidate],
        generator: torch.Generator | None = None,
        *,
        train_cfg: OptimizerSettings,
        sample_k: int = 2,
        seed: int = 0,
    ) -> None:
        if not candidates:
            raise ValueError("a supernet needs at least one candidate")
        if sample_k < 0:
            raise ValueError(f"sample_k must be >= 0, got {sample_k}")
        self.base_arch = base.arch
        for cand in candidates:
            if make_candidate(base.arch, cand.ops) != cand:
                raise ValueError(f"candidate {cand.name} does not grow the base architecture into its arch")
        self.candidates = tuple(candidates)
        self.reference = Candidate((), base.arch)  # the no-growth sub-network
        self.ops = union_ops(self.candidates)
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        self._growth_rng_state = generator.get_state().clone()  # replayed by `grow_like`
        self._growth_rng_device = generator.device
        self.model = apply_ops(base, self.ops, generator)
        self.arch = self.model.arch
        self._factor = {t: _widen_factor(self.ops, t) for t in TOWER_NAMES}
        self.initial_state: State = {k: p.detach().clone() for k, p in self.model.named_parameters()}
        self.train_cfg = train_cfg
        self.optimizer = build_optimizer(self.model, self.train_cfg)
        self.loss_fn = ClipLoss()
        self.sample_k = sample_k
        self.steps = 0
        self.flops = 0.0  # training FLOPs spent so far (TRAIN_FLOPS_FACTOR x forward, per member)
        self._rng = random.Random(seed)
        self._skeletons: dict[ArchConfig, GrowCLIP] = {}
        self.full = Candidate(self.ops, self.arch)  # the whole supernet: the top of the sandwich

    def grow_like(self, model: GrowCLIP) -> State:
        """`model` (of the base's shape) grown exactly as the base was: the same split proportions and
        new units, so the result lies in this supernet's layout and extracts to candidates that
        compute `model`'s function (for PIM from a model trained on since the supernet was built)."""
        if model.arch != self.base_arch:
            raise ValueError("grow_like needs a model of the supernet's base architecture")
        generator = torch.Generator(device=self._growth_rng_device)
        generator.set_state(self._growth_rng_state)
        grown = apply_ops(model, self.ops, generator)
        return {k: p.detach() for k, p in grown.named_parameters()}

    # ------------------------------------------------------------------------- weight sharing

    def _check(self, cand: Candidate) -> None:
        if cand != self.reference and cand != self.full and cand not in self.candidates:
            raise ValueError(f"candidate {cand.name} is not a sub-network of this supernet")

    def extract_state(self, cand: Candidate, state: State | None = None) -> State:
        """The candidate's parameters as a differentiable function of the supernet's (or of `state`)."""
        self._check(cand)
        src: dict[str, torch.Tensor] = dict(self.model.named_parameters()) if state is None else state
        factor = {t: _widen_factor(cand.ops, t) for t in TOWER_NAMES}
        out: State = {}
        for name, t in src.items():
            block = block_index(name)
            if block is not None and block[1] >= cand.arch.tower(block[0]).depth:
                continue  # a block above the candidate's depth
            for ax in axes(name):
                if ax.role == "hidden":
                    t = t.narrow(ax.dim, 0, cand.arch.tower(ax.tower).mlp_hidden)
                else:
                    width = self.base_arch.tower(ax.tower).width
                    t = _fold(t, ax.dim, ax.parts, width, self._factor[ax.tower], factor[ax.tower], ax.role)
            out[name] = t
        return out

    def _skeleton(self, arch: ArchConfig) -> GrowCLIP:
        """A weightless (meta-device) GrowCLIP of shape `arch`, for `functional_call`."""
        if arch not in self._skeletons:
            self._skeletons[arch] = meta_model(arch)
        return self._skeletons[arch]

    def forward_candidate(self, cand: Candidate, images: torch.Tensor, tokens: torch.Tensor) -> ClipOutput:
        """Run `cand` on the shared weights; gradients flow into the supernet's parameters."""
        params = self.extract_state(cand)
        out: ClipOutput = functional_call(self._skeleton(cand.arch), params, (images, tokens), strict=True)
        return out

    def extract(self, cand: Candidate, state: State | None = None) -> GrowCLIP:
        """A standalone, detached GrowCLIP of `cand` holding its current shared weights."""
        with torch.no_grad():
            return model_from_state(cand.arch, self.extract_state(cand, state), self.model.training)

    # ------------------------------------------------------------------------- training

    def sandwich(self) -> list[Candidate]:
        """This step's sub-networks: the no-growth base, the whole supernet, `sample_k` candidates."""
        others = [c for c in self.candidates if c != self.full]
        return [self.reference, self.full, *self._rng.sample(others, min(self.sample_k, len(others)))]

    def train_step(self, batch: Batch, lr: float) -> float:
        """One AdamW step on the sandwich's summed gradients (each loss scaled by 1/members); mean loss."""
        device = self.initial_state["proj.weight"].device
        images, tokens = batch.images.to(device), batch.tokens.to(device)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        members = self.sandwich()
        total = 0.0
        for cand in members:
            loss = self.loss_fn(self.forward_candidate(cand, images, tokens)) / len(members)
            loss.backward()
            total += float(loss.detach())
            self.flops += TRAIN_FLOPS_FACTOR * cand.flops * len(batch)
        if self.train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train_cfg.grad_clip)
        self.optimizer.step()
        self.steps += 1
        return total

    def train(
        self,
        batches: Iterable[Batch],
        steps: int,
        *,
        lr: float | None = None,
        warmup_steps: int | None = None,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        """Up to `steps` sandwich steps over `batches` (stops early when they run out, or at
        `deadline`, a `time.perf_counter()` value: the search's wall-time budget).

        The learning rate warms up linearly over `warmup_steps` (default: a quarter of `steps`),
        then stays at `lr` (default: the train config's): a fresh AdamW's first steps are the
        largest. Returns JSON-safe timing and loss figures.
        """
        peak = self.train_cfg.lr if lr is None else lr
        warm = max(1, steps // 4) if warmup_steps is None else max(1, warmup_steps)
        losses: list[float] = []
        samples = 0
        start = time.perf_counter()
        for i, batch in zip(range(steps), batches, strict=False):
            if deadline is not None and i > 0 and time.perf_counter() >= deadline:
                break
            losses.append(self.train_step(batch, peak * min(1.0, (i + 1) / warm)))
            samples += len(batch)
        seconds = time.perf_counter() - start
        return {
            "steps": len(losses),
            "samples": samples,
            "seconds": seconds,
            "seconds_per_step": seconds / len(losses) if losses else 0.0,
            "flops": self.flops,
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "mean_loss": sum(losses) / len(losses) if losses else None,
        }
