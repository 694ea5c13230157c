"""Scoring growth candidates on held-out data and picking one, with the reason recorded.

Each candidate runs on the supernet's shared weights (`Supernet.forward_candidate`) over the held-out
batches and gets two measurements:

- `val_loss`: the symmetric contrastive loss, averaged over samples (batches of equal size keep it
  comparable across evaluations; the loop scores on full held-out batches only);
- `zero_shot_top1`: a zero-shot retrieval proxy, image->text top-1 within each batch (the fraction of
  images whose own caption scores highest among the batch's captions).

Rules (`GrowthConfig.selection_rule`), higher `score` is better:

- ``gain_per_flop`` (default): (base_loss - val_loss) / added GFLOPs per sample. Growth costs compute
  for the rest of the model's life, so a candidate must earn its FLOPs. Candidates that do not lower
  the loss below the base are ranked after every candidate that does (a negative gain divided by
  more FLOPs would otherwise look *better*), among themselves by lowest loss.
- ``min_loss``: score = -val_loss.

Ties go to fewer added FLOPs, then to the earlier candidate of the space's deterministic order.

`base_loss` is the reference loss. By default it is the supernet's no-growth sub-network
(`Supernet.reference`) on the same batches, trained by the same supernet steps, so a candidate's gain
measures its extra capacity and not the extra training every sub-network received.
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

__all__ = ["RULES", "CandidateScore", "HoldoutMetrics", "evaluate", "rank", "score_candidates", "select"]

RULES = ("gain_per_flop", "min_loss")
GFLOP = 1e9


@dataclass(frozen=True)
class HoldoutMetrics:
    loss: float  # mean contrastive loss per sample
    top1: float  # image->text top-1 within each batch
    samples: int


@torch.no_grad()
def evaluate(
    forward: Callable[[torch.Tensor, torch.Tensor], ClipOutput],
    batches: Iterable[Batch],
    device: torch.device,
) -> HoldoutMetrics:
    """Held-out loss and in-batch retrieval top-1 of `forward(images, tokens)` over `batches`."""
    loss_fn = ClipLoss()
    loss_sum, hits, count = 0.0, 0, 0
    for batch in batches:
        out = forward(batch.images.to(device), batch.tokens.to(device))
        loss_sum += float(loss_fn(out)) * len(batch)
        sims = out.image_embeds @ out.text_embeds.T  # (B, B) image x text
        best = sims.argmax(dim=1)  # (B,) the text each image retrieves
        rows = torch.arange(len(batch), device=sims.device)
        # a text with the image's own caption is a hit too (identical captions tie)
        hit = out.positives[rows, best] if out.positives is not None else best == rows
        hits += int(hit.sum())
        count += len(batch)
    if count == 0:
        raise ValueError("no held-out samples to score candidates on")
    return HoldoutMetrics(loss_sum / count, hits / count, count)


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
    gain: float  # base_loss - val_loss (positive: the candidate is better than the base)
    score: float  # under `rule`; higher is better
    rule: str
    samples: int  # held-out samples scored
    reason: str = ""  # filled in by `select` for the winner
    candidate: Candidate | None = field(default=None, repr=False, compare=False)

    @property
    def improves(self) -> bool:
        return self.gain > 0

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
            "score": _finite(self.score),
            "rule": self.rule,
            "samples": self.samples,
            "reason": self.reason,
        }


def _score(rule: str, gain: float, val_loss: float, added_flops: int) -> float:
    if rule == "gain_per_flop":
        return gain / (max(added_flops, 1) / GFLOP)
    return -val_loss


def score_candidates(
    supernet: Supernet,
    candidates: Sequence[Candidate],
    holdout_batches: Sequence[Batch],
    base_loss: float | None = None,
    rule: str = "gain_per_flop",
) -> list[CandidateScore]:
    """Score every candidate on the held-out batches, in the order given.

    `base_loss` None: measure the supernet's no-growth sub-network on the same batches (see the
    module docstring); pass the current model's held-out loss to compare against that instead.
    """
    if rule not in RULES:
        raise ValueError(f"selection rule must be one of {RULES}, got {rule!r}")
    device = supernet.initial_state["proj.weight"].device
    base: ArchConfig = supernet.base_arch

    def metrics(cand: Candidate) -> HoldoutMetrics:
        return evaluate(lambda i, t: supernet.forward_candidate(cand, i, t), holdout_batches, device)

    if base_loss is None:
        base_loss = metrics(supernet.reference).loss
    out = []
    for cand in candidates:
        m = metrics(cand)
        gain = base_loss - m.loss
        added_flops = cand.added_flops(base)
        out.append(
            CandidateScore(
                name=cand.name,
                ops=cand.ops,
                params=cand.params,
                flops=cand.flops,
                added_params=cand.added_params(base),
                added_flops=added_flops,
                val_loss=m.loss,
                zero_shot_top1=m.top1,
                base_loss=base_loss,
                gain=gain,
                score=_score(rule, gain, m.loss, added_flops),
                rule=rule,
                samples=m.samples,
                candidate=cand,
            )
        )
    return out


def _key(s: CandidateScore) -> tuple[float, float, float]:
    loss = s.val_loss if math.isfinite(s.val_loss) else math.inf
    if s.rule == "gain_per_flop":
        primary = (1.0, s.score) if s.improves and math.isfinite(s.score) else (0.0, -loss)
    else:
        primary = (1.0, -loss)
    return (primary[0], primary[1], -float(s.added_flops))


def rank(scores: Sequence[CandidateScore]) -> list[CandidateScore]:
    """Best first; a stable sort, so exact ties keep the space's order."""
    return sorted(scores, key=_key, reverse=True)


def _describe(s: CandidateScore) -> str:
    return (
        f"val_loss {s.val_loss:.4f} (base {s.base_loss:.4f}), zero-shot top-1 {s.zero_shot_top1:.3f}, "
        f"+{s.added_flops / GFLOP:.4g} GFLOPs/sample, +{s.added_params} params"
    )


def select(scores: Sequence[CandidateScore]) -> CandidateScore:
    """The best candidate, with `reason` saying why it won and against whom."""
    if not scores:
        raise ValueError("no candidates to select from")
    ranked = rank(scores)
    best = ranked[0]
    runner = ranked[1] if len(ranked) > 1 else None
    if best.rule == "gain_per_flop" and best.improves:
        what = f"lowest loss per added GFLOP: {best.score:.4g}/GFLOP"
        vs = f" vs next {runner.score:.4g}/GFLOP ({runner.name})" if runner and runner.improves else ""
        if runner and not runner.improves:
            vs = f" vs next {runner.name}, which does not beat the base"
    elif best.rule == "gain_per_flop":
        what = f"no candidate beats the base loss {best.base_loss:.4f}; lowest loss {best.val_loss:.4f}"
        vs = f" vs next {runner.val_loss:.4f} ({runner.name})" if runner else ""
    else:
        what = f"lowest held-out loss: {best.val_loss:.4f}"
        vs = f" vs next {runner.val_loss:.4f} ({runner.name})" if runner else ""
    if not vs:
        vs = " (the only candidate)" if runner is None else ""
    return replace(best, reason=f"won: {what}{vs}; {_describe(best)}")
