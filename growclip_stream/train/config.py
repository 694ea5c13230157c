"""Configuration of the online trainer (one component's config; the daemon composes them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 128
    lr: float = 1e-3  # peak AdamW learning rate
    weight_decay: float = 0.1  # applied to matrices only, not to norms, biases or the temperature
    beta1: float = 0.9
    beta2: float = 0.98  # CLIP's usual beta2: steadier with noisy contrastive gradients
    eps: float = 1e-6
    warmup_steps: int = 50  # linear warmup at start
    rewarm_steps: int = 30  # linear re-warmup after every growth, so fresh optimizer state starts gently
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    seed: int = 0
    device: str = "cpu"
    torch_threads: int = 0  # intra-op threads for training; 0 = leave torch's default

    __pydantic_config__ = {"extra": "forbid"}  # noqa: RUF012 - read by the daemon's config validation

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (a contrastive batch needs negatives)")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if self.warmup_steps < 0 or self.rewarm_steps < 0:
            raise ValueError("warmup_steps and rewarm_steps must be >= 0")
        if self.grad_clip < 0:
            raise ValueError("grad_clip must be >= 0")
