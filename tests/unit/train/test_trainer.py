import torch

from growclip_stream.growth.operators import GrowthOp, apply_op
from growclip_stream.model import ArchConfig, GrowCLIP, TowerConfig
from growclip_stream.train.config import TrainConfig
from growclip_stream.train.trainer import Batch, OnlineTrainer


def tiny_arch() -> ArchConfig:
    t = TowerConfig(width=16, depth=1, mlp_hidden=32, head_dim=8)
    return ArchConfig(
        image=t, text=t, shared=TowerConfig(width=16, depth=0, mlp_hidden=32, head_dim=8), embed_dim=16
    )


def fixed_batch(arch: ArchConfig, n: int = 16) -> Batch:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, arch.channels, arch.image_size, arch.image_size, generator=g)
    tokens = torch.randint(0, 256, (n, arch.context_length), generator=g)
    return Batch(images=images, tokens=tokens, ids=tuple(f"r{i}" for i in range(n)))


def test_loss_falls_on_a_repeated_batch() -> None:
    torch.manual_seed(0)
    trainer = OnlineTrainer(GrowCLIP(tiny_arch()), TrainConfig(batch_size=16, lr=3e-3, warmup_steps=2))
    batch = fixed_batch(trainer.model.arch)
    first = trainer.train_step(batch).loss
    for _ in range(40):
        last = trainer.train_step(batch).loss
    assert last < 0.5 * first
    assert trainer.step == 41 and trainer.samples == 41 * 16


def test_warmup_and_rewarm_after_swap() -> None:
    cfg = TrainConfig(batch_size=16, lr=1e-3, warmup_steps=4, rewarm_steps=2)
    trainer = OnlineTrainer(GrowCLIP(tiny_arch()), cfg)
    batch = fixed_batch(trainer.model.arch)
    lrs = [trainer.train_step(batch).lr for _ in range(6)]
    assert lrs[:4] == [2.5e-4, 5e-4, 7.5e-4, 1e-3] and lrs[4:] == [1e-3, 1e-3]
    grown = apply_op(trainer.model, GrowthOp.parse("deepen:image+1"))
    trainer.swap_model(grown)
    assert trainer.model is grown
    # the optimizer now holds exactly the grown model's parameters
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in grown.parameters()}
    assert [trainer.train_step(batch).lr for _ in range(3)] == [5e-4, 1e-3, 1e-3]


def test_eval_loss_does_not_train() -> None:
    trainer = OnlineTrainer(GrowCLIP(tiny_arch()), TrainConfig(batch_size=16))
    batch = fixed_batch(trainer.model.arch)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    loss = trainer.eval_loss([batch, batch])
    assert loss is not None and loss > 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    assert trainer.model.training
    assert trainer.eval_loss([]) is None
