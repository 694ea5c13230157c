"""Scoring growth candidates on held-out data and picking one - or declining to grow - with the reason.

Each candidate, and the no-growth base (`Supernet.reference`, trained by the same supernet steps so
that a candidate's gain measures its extra capacity, not the extra training every sub-network got),
runs on the supernet's shared weights over the same held-out batches. Measured per candidate:

- `val_loss`: the contrastive loss, averaged over samples, and each sample's share of it
  (`ClipLoss.per_sample`);
- `zero_shot_top1`: a zero-shot retrieval proxy, image->text top-1 within each batch.

**Paired gain and its noise.** The gain is the mean over held-out samples of (base loss − candidate
loss) for the *same* sample, so what both models find hard cancels out. Its noise is the standard
error of that mean estimated by bootstrap: resample the samples with replacement
(`bootstrap_resamples` times, seeded), take the mean paired difference each time, and use the
standard deviation of those means. (Samples of one batch share negatives, so they are not quite
independent; the bootstrap treats them as if they were.)

**Decline.** A candidate *beats the base* when its gain exceeds `decline_z` standard errors and
`min_gain` (an absolute floor: growth costs compute for good, and float rounding alone makes
tiny, "significant" differences between sub-networks that compute the same function). When none
does, there is no growth: the decision is recorded as declined, with every score. With K candidates,
each null candidate passes by chance with probability about Φ(−z), so the default z = 3 (0.13%)
keeps the chance that any of ~20 passes by noise near 3%.

**Rules** (`GrowthConfig.selection_rule`), among the candidates that beat the base:

- ``gain`` (default): the largest gain, then parsimony: the candidate with the fewest added FLOPs
  whose gain is not distinguishable from the best one's (the paired difference between the two is
  within `decline_z` bootstrap standard errors). Cost only breaks ties the data cannot resolve, so
  the rule is not biased toward cheap operators by construction (dividing by added FLOPs, which span
  ~20x across candidates, was).
- ``min_loss``: the largest gain (lowest held-out loss), no parsimony.

Exact ties go to fewer added FLOPs, then to the earlier candidate of the space's deterministic order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from growclip_stream.batch import Batch
from growclip_stream.growth.operators import GrowthOp
from growclip_stream.growth.space import Candidate
from growclip_stream.growth.supernet import Supernet
from growclip_stream.model.clip import ArchConfig, ClipLoss, ClipOutput

__all__ = [
    "RULES",
    "CandidateScore",
    "HoldoutMetrics",
    "Selection",
    "bootstrap_se",
    "evaluate",
    "rank",
    "score_candidates",
    "select",
]

RULES = ("gain", "min_loss")
GFLOP = 1e9


@dataclass(frozen=True)
class HoldoutMetrics:
    loss: float  # mean contrastive loss per sample
    top1: float  # image->text top-1 within each batch
    samples: int
    per_sample: torch.Tensor = field(default_factory=lambda: torch.zeros(0), repr=False, compare=False)


@torch.no_grad()
def evaluate(
    forward: Callable[[torch.Tensor, torch.Tensor], ClipOutput],
    batches: Iterable[Batch],
    device: torch.device,
) -> HoldoutMetrics:
    """Held-out loss (and each sample's share of it) and in-batch retrieval top-1 of `forward`."""
    loss_fn = ClipLoss()
    losses: list[torch.Tensor] = []
    hits, count = 0, 0
    for batch in batches:
        out = forward(batch.images.to(device), batch.tokens.to(device))
        losses.append(loss_fn.per_sample(out).detach().to("cpu", torch.float64))
        sims = out.image_embeds @ out.text_embeds.T  # (B, B) image x text
        best = sims.argmax(dim=1)  # (B,) the text each image retrieves
        rows = torch.arange(len(batch), device=sims.device)
        # a text with the image's own caption is a hit too (identical captions tie)
        hit = out.positives[rows, best] if out.positives is not None else best == rows
        hits += int(hit.sum())
        count += len(batch)
    if count == 0:
        raise ValueError("no held-out samples to score candidates on")
    per_sample = torch.cat(losses)
    return HoldoutMetrics(float(per_sample.mean()), hits / count, count, per_sample)


def bootstrap_se(diffs: torch.Tensor, resamples: int, seed: int = 0) -> float:
    """Bootstrap standard error of the mean of `diffs` (paired per-sample differences)."""
    n = diffs.numel()
    if n < 2 or resamples < 2:
        return math.inf
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=g)
    return float(diffs.to(torch.float64)[idx].mean(dim=1).std())


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class CandidateScore:
    name: str  # e.g. "widen:text*2,deepen:image+1"
    ops: tuple[GrowthOp, ...]
    params: int
    flops: int  # forward FLOPs per sample of the grown model
    added_params: int
    added_flops: int
    val_loss: float
    zero_shot_top1: float
    base_loss: float
    gain: float  # mean paired (base loss - candidate loss) per held-out sample; positive: better
    gain_se: float  # bootstrap standard error of `gain`
    margin: float  # max(decline_z x gain_se, min_gain): the gain must exceed it to beat the base
    score: float  # under `rule`; higher is better
    rule: str
    samples: int  # held-out samples scored
    reason: str = ""  # filled in by `select` for the winner
    candidate: Candidate | None = field(default=None, repr=False, compare=False)
    per_sample: torch.Tensor | None = field(default=None, repr=False, compare=False)  # losses

    @property
    def beats_base(self) -> bool:
        """The gain is larger than the noise of its held-out estimate (see the module docstring)."""
        return math.isfinite(self.gain) and self.gain > self.margin

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (non-finite numbers become null), for the growth history."""
        return {
            "name": self.name,
            "ops": [str(op) for op in self.ops],
            "params": self.params,
            "flops": self.flops,
            "added_params": self.added_params,
            "added_flops": self.added_flops,
            "val_loss": _finite(self.val_loss),
            "zero_shot_top1": _finite(self.zero_shot_top1),
            "base_loss": _finite(self.base_loss),
            "gain": _finite(self.gain),
            "gain_se": _finite(self.gain_se),
            "margin": _finite(self.margin),
            "beats_base": self.beats_base,
            "score": _finite(self.score),
            "rule": self.rule,
            "samples": self.samples,
            "reason": self.reason,
        }


def score_candidates(
    supernet: Supernet,
    candidates: Sequence[Candidate],
    holdout_batches: Sequence[Batch],
    *,
    rule: str = "gain",
    decline_z: float = 3.0,
    min_gain: float = 1e-3,
    resamples: int = 1000,
    seed: int = 0,
    between: Callable[[], None] | None = None,
) -> list[CandidateScore]:
    """Score every candidate against the supernet's no-growth base on the same held-out samples.

    `between` runs before each candidate (the caller's chance to keep its consumer polled, or to
    cancel the search by raising)."""
    if rule not in RULES:
        raise ValueError(f"selection rule must be one of {RULES}, got {rule!r}")
    device = supernet.initial_state["proj.weight"].device
    base_arch: ArchConfig = supernet.base_arch

    def metrics(cand: Candidate) -> HoldoutMetrics:
        return evaluate(lambda i, t: supernet.forward_candidate(cand, i, t), holdout_batches, device)

    base = metrics(supernet.reference)
    out = []
    for cand in candidates:
        if between is not None:
            between()
        m = metrics(cand)
        diffs = base.per_sample - m.per_sample
        gain = float(diffs.mean())
        se = bootstrap_se(diffs, resamples, seed)
        out.append(
            CandidateScore(
                name=cand.name,
                ops=cand.ops,
                params=cand.params,
                flops=cand.flops,
                added_params=cand.added_params(base_arch),
                added_flops=cand.added_flops(base_arch),
                val_loss=m.loss,
                zero_shot_top1=m.top1,
                base_loss=base.loss,
                gain=gain,
                gain_se=se,
                margin=max(decline_z * se, min_gain),
                score=gain if rule == "gain" else -m.loss,
                rule=rule,
                samples=m.samples,
                candidate=cand,
                per_sample=m.per_sample,
            )
        )
    return out


def _key(s: CandidateScore) -> tuple[float, float, float]:
    score = s.score if math.isfinite(s.score) else -math.inf
    return (1.0 if s.beats_base else 0.0, score, -float(s.added_flops))


def rank(scores: Sequence[CandidateScore]) -> list[CandidateScore]:
    """Best first (those beating the base first); a stable sort, so exact ties keep the space's order."""
    return sorted(scores, key=_key, reverse=True)


def _describe(s: CandidateScore) -> str:
    return (
        f"val_loss {s.val_loss:.4f} (base {s.base_loss:.4f}), gain {s.gain:.4g} ± {s.gain_se:.2g} "
        f"(s.e.), zero-shot top-1 {s.zero_shot_top1:.3f}, +{s.added_flops / GFLOP:.4g} GFLOPs/sample, "
        f"+{s.added_params} params"
    )


@dataclass(frozen=True)
class Selection:
    """`select`'s answer: the winner (None: growth declined) and why."""

    winner: CandidateScore | None
    reason: str

    @property
    def declined(self) -> bool:
        return self.winner is None


def select(
    scores: Sequence[CandidateScore], *, decline_z: float = 3.0, resamples: int = 1000, seed: int = 0
) -> Selection:
    """The winner under the scores' rule, or a decline when no candidate beats the base."""
    if not scores:
        raise ValueError("no candidates to select from")
    ranked = rank(scores)
    best = ranked[0]
    if not best.beats_base:
        return Selection(
            None,
            f"declined: no candidate beats the base loss {best.base_loss:.4f} by more than "
            f"its margin ({decline_z:g} bootstrap standard errors of its paired gain, at least the "
            f"configured minimum gain); the best, {best.name}, "
            f"gained {best.gain:.4g} against a margin of {best.margin:.4g}",
        )
    winner, why = best, "largest held-out gain over the base"
    if best.rule == "gain" and best.per_sample is not None:
        for other in sorted(ranked[1:], key=lambda s: s.added_flops):
            if not other.beats_base or other.added_flops >= winner.added_flops or other.per_sample is None:
                continue
            diff = other.per_sample - best.per_sample  # best's extra gain over `other`, per sample
            if float(diff.mean()) <= decline_z * bootstrap_se(diff, resamples, seed):
                winner = other
                why = (
                    f"fewest added FLOPs among the candidates whose gain is within noise of the "
                    f"largest ({best.name}, gain {best.gain:.4g})"
                )
                break
    runner = next((s for s in ranked if s is not winner), None)
    vs = f" vs next {runner.name} (gain {runner.gain:.4g})" if runner is not None else " (the only candidate)"
    reason = f"won: {why}{vs}; {_describe(winner)}"
    return Selection(replace(winner, reason=reason), reason)
