"""The training step's precision, compile and device paths, on CPU.

Tolerances: bf16 autocast keeps ~8 bits of mantissa in the matmuls, so L2-normalised embeddings
of the tiny model agree with fp32 to a cosine of >= 0.995 and within 0.05 per coordinate; a compiled
fp32 step computes the same arithmetic as eager fp32 up to reordering (1e-5).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from growclip_stream.batch import Batch
from growclip_stream.data.images import normalize
from growclip_stream.growth.operators import GrowthOp, apply_op
from growclip_stream.model import GrowCLIP
from growclip_stream.model.clip import ClipLoss
from growclip_stream.train.config import TrainConfig
from growclip_stream.train.step import (
    DeviceUnavailable,
    TrainStep,
    check_device,
    enable_activation_checkpointing,
    fused_adam,
)
from growclip_stream.train.trainer import OnlineTrainer
from tests.helpers import random_batches, randomized, tiny_arch

CPU = torch.device("cpu")


def _outputs(cfg: TrainConfig, model: GrowCLIP, batch: Batch) -> tuple[torch.Tensor, ...]:
    step = TrainStep(model, ClipLoss(), cfg, CPU)
    loss, image, text = step(batch.images, batch.tokens)
    return loss.detach(), image.detach(), text.detach()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=-1).min())


def test_bf16_autocast_and_compile_match_eager_fp32() -> None:
    model = randomized(GrowCLIP(tiny_arch()), seed=1)
    batch = random_batches(model.arch, 1, size=12)[0]
    ref_loss, ref_img, ref_txt = _outputs(TrainConfig(), model, batch)

    loss, img, txt = _outputs(TrainConfig(precision="bf16"), model, batch)
    assert img.dtype == txt.dtype == loss.dtype == torch.float32  # the loss is computed in fp32
    assert _cosine(img, ref_img) >= 0.995 and _cosine(txt, ref_txt) >= 0.995
    assert torch.allclose(img, ref_img, atol=0.05) and torch.allclose(txt, ref_txt, atol=0.05)
    assert not torch.equal(img, ref_img)  # autocast really ran in bf16
    assert abs(float(loss) - float(ref_loss)) < 0.05

    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(precision=precision, compile=True, compile_backend="aot_eager")
        eager = _outputs(dataclasses.replace(cfg, compile=False), model, batch)
        compiled = _outputs(cfg, model, batch)
        for a, b in zip(compiled, eager, strict=True):
            assert torch.allclose(a, b, atol=1e-5), precision
    torch._dynamo.reset()


def test_bf16_trains_fp32_master_weights() -> None:
    torch.manual_seed(0)
    trainer = OnlineTrainer(
        GrowCLIP(tiny_arch()), TrainConfig(batch_size=16, lr=3e-3, warmup_steps=2, precision="bf16")
    )
    batch = random_batches(trainer.model.arch, 1, size=16)[0]
    first = trainer.train_step(batch).loss
    for _ in range(12):
        last = trainer.train_step(batch).loss
    assert last < 0.8 * first
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in trainer.model.parameters())
    eval_loss = trainer.eval_loss([batch])
    assert eval_loss is not None and abs(eval_loss - last) < 0.5


@pytest.mark.slow
def test_compiled_step_compiles_once_per_model() -> None:
    """A growth costs exactly one compilation; batch sizes and steady training cost none."""
    torch._dynamo.reset()
    cfg = TrainConfig(batch_size=16, compile=True, compile_backend="aot_eager", warmup_steps=0)
    trainer = OnlineTrainer(GrowCLIP(tiny_arch()), cfg)
    arch = trainer.model.arch
    for batch in random_batches(arch, 2, size=16):
        trainer.train_step(batch)
    assert trainer.compile_counter.graphs == 1
    trainer.train_step(random_batches(arch, 1, size=5, seed=1)[0])  # a smaller last batch
    trainer.eval_loss(random_batches(arch, 1, size=7, seed=2))  # held-out batches of another size
    trainer.train_step(random_batches(arch, 1, size=16, seed=3)[0])
    assert trainer.compile_counter.graphs == 1

    grown = apply_op(trainer.model, GrowthOp.parse("deepen:image+1"))
    trainer.swap_model(grown)
    for size in (16, 9, 16):
        trainer.train_step(random_batches(grown.arch, 1, size=size, seed=10 + size)[0])
    trainer.eval_loss(random_batches(grown.arch, 1, size=7))
    assert trainer.compile_counter.graphs == 2
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_step_matches_eager() -> None:
    """The real backend (C++ codegen on CPU): the same loss and gradients as eager fp32."""
    torch._dynamo.reset()
    model = randomized(GrowCLIP(tiny_arch()), seed=2)
    batch = random_batches(model.arch, 1, size=8)[0]
    grads = []
    for compile_ in (False, True):
        model.zero_grad(set_to_none=True)
        step = TrainStep(model, ClipLoss(), TrainConfig(compile=compile_), CPU)
        loss = step(batch.images, batch.tokens)[0]
        loss.backward()
        grads.append(
            (
                float(loss.detach()),
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            )
        )
        if compile_:
            assert step.counter.graphs == 1
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = grads
    assert abs(eager_loss - compiled_loss) < 1e-5
    assert eager_grads.keys() == compiled_grads.keys()
    for name, g in eager_grads.items():
        assert torch.allclose(g, compiled_grads[name], atol=1e-5, rtol=1e-4), name
    torch._dynamo.reset()


def test_activation_checkpointing_keeps_gradients_and_state_dict() -> None:
    model = randomized(GrowCLIP(tiny_arch(shared_depth=1)), seed=3)
    batch = random_batches(model.arch, 1, size=8)[0]
    keys = list(model.state_dict())
    ref = _grads(model, batch)
    assert enable_activation_checkpointing(model) == 3  # image, text and shared blocks
    assert list(model.state_dict()) == keys
    got = _grads(model, batch)
    for name, g in ref.items():
        assert torch.allclose(g, got[name], atol=1e-6), name
    with torch.no_grad():  # inference (serving copies) runs the plain forward
        model(batch.images, batch.tokens)


def _grads(model: GrowCLIP, batch: Batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    ClipLoss()(model(batch.images, batch.tokens)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_uint8_batches_are_normalised_on_the_device() -> None:
    trainer = OnlineTrainer(GrowCLIP(tiny_arch()), TrainConfig(batch_size=4))
    arch = trainer.model.arch
    pixels = torch.randint(0, 256, (4, arch.channels, arch.image_size, arch.image_size), dtype=torch.uint8)
    tokens = torch.randint(0, 256, (4, arch.context_length))
    raw = Batch(pixels, tokens, tuple("abcd"))
    images, toks = trainer.to_device(raw)
    assert images.dtype == torch.float32 and torch.equal(images, normalize(pixels))
    assert torch.equal(toks, tokens)
    float_batch = Batch(normalize(pixels), tokens, tuple("abcd"))
    assert trainer.eval_loss([raw]) == trainer.eval_loss([float_batch])


def test_fused_adam_setting() -> None:
    assert fused_adam("auto", torch.device("cuda")) is True
    assert fused_adam("auto", CPU) is None  # CPU keeps torch's default optimizer
    assert fused_adam(False, torch.device("cuda")) is False
    trainer = OnlineTrainer(GrowCLIP(tiny_arch()), TrainConfig(batch_size=8, fused_adam=True))
    assert trainer.optimizer.defaults["fused"] is True
    trainer.train_step(random_batches(trainer.model.arch, 1, size=8)[0])  # the fused CPU kernel runs


def test_device_checks() -> None:
    assert check_device("cpu") == CPU
    with pytest.raises(DeviceUnavailable, match="not a torch device"):
        check_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailable, match="no CUDA device is present"):
            check_device("cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        TrainConfig(device="gpu")
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")  # type: ignore[arg-type]
