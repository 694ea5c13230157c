"""The optimizer factory shared by the trainer and the growth supernet.

It takes any settings object with the AdamW fields (the trainer's TrainConfig is one), so that
growth can build optimizers without importing the trainer.
"""

from __future__ import annotations

from typing import Protocol

import torch


class OptimizerSettings(Protocol):
    """The AdamW settings `build_optimizer` and a training step read."""

    @property
    def lr(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def beta1(self) -> float: ...
    @property
    def beta2(self) -> float: ...
    @property
    def eps(self) -> float: ...
    @property
    def grad_clip(self) -> float: ...


def build_optimizer(
    model: torch.nn.Module, cfg: OptimizerSettings, *, fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains, biases and the temperature stay free).

    `fused` picks torch's fused AdamW kernel (one launch for all parameters; fastest on CUDA);
    None leaves torch's default.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)
