"""The growth space: which grown architectures one growth step may choose from (DESIGN.md §5).

A candidate is a set of growth operators applied together to the current architecture. The space is
built from configured operator *templates* (`GrowthConfig.space`, e.g. ``deepen:image+1``,
``widen:text*2``, ``widen_mlp:shared+64``):

- every single template, and every combination of up to `max_ops_per_step` templates acting on
  *different* (tower, kind) pairs (two depth changes of the same tower would be one larger change,
  which belongs in the templates if wanted);
- kept only if the grown FLOPs per sample stay within `max_flops_factor` x the current FLOPs, the
  grown parameter count within `max_params`, and *every* operator of the candidate adds parameters
  (removing any one of them would give fewer parameters). That drops ``widen_mlp`` on a tower with
  no blocks on its own, but keeps ``deepen:shared+1,widen_mlp:shared+64`` on an empty shared
  encoder, whose new block does get the larger MLP;
- deduplicated by grown architecture, in a deterministic order: by number of operators, then in the
  canonical template order.

Inside a candidate the operators are in canonical order (widen, then widen_mlp, then deepen; towers
image, text, shared), so equal sets are equal candidates and applying them builds new blocks at the
grown width and MLP size. Grown architectures do not depend on the order; the supernet's weight
layout (growth.supernet) relies on this one.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from growclip_stream.growth.config import GrowthConfig
from growclip_stream.growth.operators import GrowthOp, grow_arch
from growclip_stream.model.clip import TOWER_NAMES, ArchConfig

__all__ = ["Candidate", "candidate_set", "canonical_ops", "make_candidate", "rejected_candidates"]

_KIND_ORDER = {"widen": 0, "widen_mlp": 1, "deepen": 2}
_TOWER_ORDER = {t: i for i, t in enumerate(TOWER_NAMES)}


def _op_key(op: GrowthOp) -> tuple[int, int, int]:
    return (_KIND_ORDER[op.kind], _TOWER_ORDER[op.tower], op.amount)


def canonical_ops(ops: Iterable[GrowthOp]) -> tuple[GrowthOp, ...]:
    """`ops` in canonical order: widen, widen_mlp, deepen; towers image, text, shared; then amount."""
    return tuple(sorted(ops, key=_op_key))


@dataclass(frozen=True)
class Candidate:
    """A grown architecture and the operators (canonical order) that grow the current one into it."""

    ops: tuple[GrowthOp, ...]  # empty for the no-growth reference
    arch: ArchConfig  # the architecture after `ops`

    @property
    def name(self) -> str:
        """E.g. ``widen:text*2,deepen:image+1``; ``base`` for the no-growth reference."""
        return ",".join(str(op) for op in self.ops) or "base"

    @property
    def params(self) -> int:
        return self.arch.num_params()

    @property
    def flops(self) -> int:
        """Forward FLOPs per (image, text) sample."""
        return self.arch.flops_per_sample()

    def added_params(self, base: ArchConfig) -> int:
        return self.params - base.num_params()

    def added_flops(self, base: ArchConfig) -> int:
        return self.flops - base.flops_per_sample()

    def flops_factor(self, base: ArchConfig) -> float:
        return self.flops / base.flops_per_sample()


def make_candidate(arch: ArchConfig, ops: Iterable[GrowthOp]) -> Candidate:
    """The candidate growing `arch` by `ops` (put in canonical order)."""
    ordered = canonical_ops(ops)
    grown = arch
    for op in ordered:
        grown = grow_arch(grown, op)
    return Candidate(ordered, grown)


def _verdict(arch: ArchConfig, cand: Candidate, cfg: GrowthConfig) -> str | None:
    """Why `cand` is outside the space, or None when it fits."""
    if cand.params > cfg.max_params:
        return f"over max_params ({cand.params} > {cfg.max_params})"
    factor = cand.flops_factor(arch)
    if factor > cfg.max_flops_factor:
        return f"FLOPs x{factor:.2f} over max_flops_factor {cfg.max_flops_factor}"
    for i in range(len(cand.ops)):
        without = make_candidate(arch, cand.ops[:i] + cand.ops[i + 1 :])
        if without.params >= cand.params:
            return f"{cand.ops[i]} adds no parameters (e.g. widening the MLP of a tower without blocks)"
    return None


def _enumerate(arch: ArchConfig, cfg: GrowthConfig) -> Iterator[tuple[Candidate, str | None]]:
    """Every distinct combination of templates, with why it is outside the space (None: inside)."""
    templates = canonical_ops(dict.fromkeys(GrowthOp.parse(s) for s in cfg.space))  # deduplicated
    seen: set[ArchConfig] = set()
    for size in range(1, cfg.max_ops_per_step + 1):
        for combo in itertools.combinations(templates, size):
            if len({(op.tower, op.kind) for op in combo}) < size:
                continue  # two operators of the same kind on the same tower
            cand = make_candidate(arch, combo)
            if cand.arch in seen:
                continue
            seen.add(cand.arch)
            yield cand, _verdict(arch, cand, cfg)


def candidate_set(arch: ArchConfig, cfg: GrowthConfig) -> list[Candidate]:
    """Every candidate of the space around `arch` that fits the bounds, in a deterministic order."""
    return [cand for cand, verdict in _enumerate(arch, cfg) if verdict is None]


def rejected_candidates(arch: ArchConfig, cfg: GrowthConfig) -> list[dict[str, str]]:
    """The combinations left out of `candidate_set` and why, JSON-safe (for the growth history)."""
    return [{"candidate": c.name, "verdict": v} for c, v in _enumerate(arch, cfg) if v is not None]
