"""Configuration of the online trainer (one component's config; the daemon composes them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Precision = Literal["fp32", "bf16"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


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
    device: str = "cpu"  # any torch device string: cpu, cuda, cuda:1 (checked present at daemon start)
    torch_threads: int = 0  # intra-op threads for training; 0 = leave torch's default
    # fp32: everything in fp32. bf16: forward passes (training, evaluation, growth search, serving)
    # under bf16 autocast; weights, optimizer state, the loss and growth operators stay fp32
    precision: Precision = "fp32"
    compile: bool = False  # torch.compile the forward+loss (and so its backward); rebuilt after each growth
    compile_backend: str = "inductor"  # a torch.compile backend; "aot_eager"/"eager" compile fast (tests)
    compile_mode: CompileMode = "default"  # inductor's mode; "reduce-overhead" adds CUDA graphs
    fused_adam: bool | Literal["auto"] = "auto"  # auto: the fused AdamW kernel on CUDA, foreach elsewhere
    # recompute each transformer block's activations in the backward pass: less memory, ~1/3 more compute
    activation_checkpointing: bool = False

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
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device {self.device!r} is not a torch device: {err}") from None
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if not (isinstance(self.fused_adam, bool) or self.fused_adam == "auto"):
            raise ValueError(f"fused_adam must be true, false or auto, got {self.fused_adam!r}")
