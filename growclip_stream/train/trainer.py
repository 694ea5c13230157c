"""The online trainer: one contrastive AdamW step per batch, and a model swap after growth.

The trainer owns the training model. It knows nothing about where batches come from, when to
grow, or who serves the weights: the engine around it wires those together.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from growclip_stream.batch import Batch
from growclip_stream.data.images import normalize
from growclip_stream.model import ClipLoss, GrowCLIP
from growclip_stream.optim import build_optimizer
from growclip_stream.train.config import TrainConfig
from growclip_stream.train.step import CompileCounter, TrainStep, autocast, fused_adam


@dataclass(frozen=True)
class StepStats:
    step: int  # step number after this step
    loss: float
    lr: float
    seconds: float
    batch_size: int
    fresh: int  # samples new from the stream (the batch minus replayed ones)


class OnlineTrainer:
    """Trains a GrowCLIP on batches as they arrive; `swap_model` installs a grown model."""

    def __init__(self, model: GrowCLIP, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.loss_fn = ClipLoss()
        self.step = 0
        self.samples = 0
        self._warm_from = 0  # step at which the current (re-)warmup started
        self._warm_len = cfg.warmup_steps
        self.model = model.to(self.device).train()
        self.optimizer = build_optimizer(self.model, cfg, fused=fused_adam(cfg.fused_adam, self.device))
        # precision, compile and checkpointing of the forward+loss (train/step.py); rebuilt on growth
        self.compile_counter = CompileCounter(cfg.compile_backend, cfg.compile_mode)
        self.forward_loss = TrainStep(self.model, self.loss_fn, cfg, self.device, self.compile_counter)

    def lr_at(self, step: int) -> float:
        """Linear warmup at start and re-warmup after each growth, then constant: the stream has no end."""
        if self._warm_len == 0:
            return self.cfg.lr
        return self.cfg.lr * min(1.0, (step - self._warm_from + 1) / self._warm_len)

    def train_step(self, batch: Batch) -> StepStats:
        start = time.perf_counter()
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images, tokens = self.to_device(batch)
        loss = self.forward_loss(images, tokens)[0]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.model.clamp_logit_scale_()
        self.step += 1
        fresh = len(batch) - batch.replayed
        self.samples += fresh
        return StepStats(self.step, float(loss.detach()), lr, time.perf_counter() - start, len(batch), fresh)

    @torch.no_grad()
    def eval_loss(self, batches: Iterable[Batch]) -> float | None:
        """Mean contrastive loss over held-out batches (None when there are none)."""
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        for batch in batches:
            with self.autocast():
                out = self.model(*self.to_device(batch))
            total += float(self.loss_fn(out)) * len(batch)
            count += len(batch)
        self.model.train(was_training)
        return total / count if count else None

    def resume(self, *, step: int, samples: int) -> None:
        """Continue counting from a checkpoint (its optimizer state is restored by the caller)."""
        self.step, self.samples = step, samples
        self._warm_from = step - self._warm_len  # a resumed run is past its warmup

    def swap_model(self, model: GrowCLIP) -> None:
        """Install a grown model.

        Growth changes parameter shapes, so everything wrapping the parameters (the optimizer,
        the compiled step: one recompilation; DDP later) is rebuilt explicitly, and the learning
        rate re-warms.
        """
        self.forward_loss.close()
        self.model = model.to(self.device).train()
        self.optimizer = build_optimizer(
            self.model, self.cfg, fused=fused_adam(self.cfg.fused_adam, self.device)
        )
        self.forward_loss = TrainStep(self.model, self.loss_fn, self.cfg, self.device, self.compile_counter)
        self._warm_from = self.step
        self._warm_len = self.cfg.rewarm_steps

    def restore_from(self, other: OnlineTrainer) -> None:
        """Take over `other`'s model, optimizer and learning-rate schedule, keeping this trainer's
        step and sample counts: a growth rolled back to the base model trained beside it."""
        if other.forward_loss is not self.forward_loss:
            self.forward_loss.close()  # the grown model's compiled step goes with it
        self.model, self.optimizer, self.forward_loss = other.model, other.optimizer, other.forward_loss
        self._warm_from, self._warm_len = other._warm_from, other._warm_len

    def to_device(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's images and tokens on the training device, images normalised to float32.

        uint8 pixels (collate's `raw=True`, pinned for a GPU) cross to the device at a quarter of
        the bytes of float32 and in one non-blocking copy; they are normalised there.
        """
        images = batch.images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = normalize(images)
        return images, batch.tokens.to(self.device, non_blocking=True)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward passes' precision (train.precision); the growth search runs under it too."""
        return autocast(self.device, self.cfg.precision)
