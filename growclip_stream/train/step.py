"""The training step on any device: mixed precision, torch.compile, fused AdamW, checkpointing.

`TrainStep` wraps one model (the trainer builds a new one after every growth, since growth changes
parameter shapes and a compiled graph is specialised to them). It runs the forward pass under bf16
autocast when asked (weights stay fp32: autocast casts copies for the matmuls, so the optimizer and
the growth operators keep working on exact fp32 master weights), then the loss in fp32, and can
hand both to `torch.compile` as one graph, whose backward AOTAutograd compiles too.

Compilation happens once per model: the batch dimension is marked dynamic, so neither the smaller
last batch at shutdown nor any other batch size recompiles. Every graph the backend compiles is
counted (`CompileCounter`), which is how tests and metrics see that a growth costs exactly one
compilation and steady training none.

`check_device` turns a device that is not present into a clear error before anything is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from growclip_stream.model.clip import Block, ClipLoss, GrowCLIP
from growclip_stream.train.config import TrainConfig

log = logging.getLogger(__name__)


class DeviceUnavailable(RuntimeError):
    """The configured device does not exist on this machine (or this torch build)."""


def check_device(name: str) -> torch.device:
    """The torch device `name` names, if it is present here; else `DeviceUnavailable` saying why."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise DeviceUnavailable(f"{name!r} is not a torch device: {err}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise DeviceUnavailable(
                f"device {name!r} is configured but no CUDA device is present "
                f"(torch {torch.__version__}, {build}); set train.device to cpu or run on a GPU machine"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceUnavailable(f"device {name!r} is configured but only {count} CUDA device(s) exist")
        return device
    module = getattr(torch, device.type, None)
    available = getattr(module, "is_available", None)
    if available is None or not available():
        raise DeviceUnavailable(f"device {name!r} is configured but is not available here")
    return device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on `device` when `precision` is bf16; a no-op context for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fused_adam(setting: bool | str, device: torch.device) -> bool | None:
    """AdamW's `fused` argument: "auto" fuses on CUDA and leaves torch's default (foreach) elsewhere."""
    if setting == "auto":
        return True if device.type == "cuda" else None
    return bool(setting)


class CompileCounter:
    """A torch.compile backend that counts the graphs it compiles, then hands them to the real one.

    One instance lives as long as the trainer, across the models growth swaps in, so `graphs` is
    the whole process's count of compilations of the training step.
    """

    def __init__(self, backend: str = "inductor", mode: str = "default") -> None:
        self.backend, self.mode = backend, mode
        self.graphs = 0
        if backend == "inductor":
            # what torch.compile(backend="inductor", mode=mode) builds; a callable backend takes no mode
            self._inner: Callable[..., Any] = torch._TorchCompileInductorWrapper(mode, None, None)
        else:
            self._inner = torch._dynamo.lookup_backend(backend)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        self.graphs += 1
        log.info("compiling the training step", extra={"graph": self.graphs, "backend": self.backend})
        return self._inner(gm, example_inputs)


def _checkpointed_forward(self: Block, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """`Block.forward` whose activations are recomputed in the backward pass instead of kept."""
    if not torch.is_grad_enabled():
        return Block.forward(self, x, causal)
    out: torch.Tensor = torch.utils.checkpoint.checkpoint(Block.forward, self, x, causal, use_reentrant=False)
    return out


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Make every transformer block of `model` recompute its activations in the backward pass.

    The block's forward is rebound on the instance (a bound method, so a deep copy, e.g. a serving
    snapshot, binds its own block); parameter names and the state dict do not change. Returns the
    number of blocks changed.
    """
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.forward = types.MethodType(_checkpointed_forward, block)  # type: ignore[method-assign]
    return len(blocks)


StepOutput = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor
]  # loss (fp32 scalar), image and text embeddings (fp32)


class TrainStep:
    """Forward and loss of one model, as configured: autocast, compile, activation checkpointing.

    `__call__` returns the loss (fp32 scalar) and the fp32 image and text embeddings; the caller runs backward
    and the optimizer. Build a new TrainStep for a new model.
    """

    def __init__(
        self,
        model: GrowCLIP,
        loss_fn: ClipLoss,
        cfg: TrainConfig,
        device: torch.device,
        counter: CompileCounter | None = None,
    ) -> None:
        self.model, self.loss_fn, self.cfg, self.device = model, loss_fn, cfg, device
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.counter = (
            counter if counter is not None else CompileCounter(cfg.compile_backend, cfg.compile_mode)
        )
        self._fn: Callable[[torch.Tensor, torch.Tensor], StepOutput] = self._forward_loss
        if cfg.compile:
            self._fn = torch.compile(self._forward_loss, backend=self.counter, fullgraph=True)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return autocast(self.device, self.cfg.precision)

    def _forward_loss(self, images: torch.Tensor, tokens: torch.Tensor) -> StepOutput:
        with self.autocast():
            out = self.model(images, tokens)
        # The loss in fp32: the (B, D) embeddings are cheap to upcast, and the (B, B) logits and the
        # softmaxes over them are where bf16 would lose the most.
        out = dataclasses.replace(
            out,
            image_embeds=out.image_embeds.float(),
            text_embeds=out.text_embeds.float(),
            logit_scale=out.logit_scale.float(),
        )
        return self.loss_fn(out), out.image_embeds, out.text_embeds

    def __call__(self, images: torch.Tensor, tokens: torch.Tensor) -> StepOutput:
        if self.cfg.compile:
            # one graph for every batch size: the last, smaller batch must not recompile
            torch._dynamo.mark_dynamic(images, 0)
            torch._dynamo.mark_dynamic(tokens, 0)
        return self._fn(images, tokens)

    def close(self) -> None:
        """Drop the compiled graphs of this step's model (its shapes are gone after a growth)."""
        if self.cfg.compile:
            torch._dynamo.reset()
