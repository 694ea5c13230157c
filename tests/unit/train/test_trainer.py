import math

import torch

from growclip_stream.growth.operators import GrowthOp, apply_op
from growclip_stream.model import GrowCLIP
from growclip_stream.train.config import TrainConfig
from growclip_stream.train.trainer import OnlineTrainer
from tests.helpers import random_batches, tiny_arch


def test_loss_falls_on_a_repeated_batch() -> None:
    torch.manual_seed(0)
    trainer = OnlineTrainer(GrowCLIP(tiny_arch()), TrainConfig(batch_size=16, lr=3e-3, warmup_steps=2))
    batch = random_batches(trainer.model.arch, 1, size=16)[0]
    first = trainer.train_step(batch).loss
    for _ in range(40):
        last = trainer.train_step(batch).loss
    assert last < 0.5 * first
    assert trainer.step == 41 and trainer.samples == 41 * 16


def test_warmup_and_rewarm_after_swap() -> None:
    cfg = TrainConfig(batch_size=16, lr=1e-3, warmup_steps=4, rewarm_steps=2)
    trainer = OnlineTrainer(GrowCLIP(tiny_arch()), cfg)
    batch = random_batches(trainer.model.arch, 1, size=16)[0]
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
    batch = random_batches(trainer.model.arch, 1, size=16)[0]
    before = [p.detach().clone() for p in trainer.model.parameters()]
    loss = trainer.eval_loss([batch, batch])
    assert loss is not None and loss > 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    assert trainer.model.training
    assert trainer.eval_loss([]) is None


def test_temperature_at_its_cap_keeps_learning() -> None:
    # exp(logit_scale) is capped at 100; a parameter pushed past the cap must come back under it
    # and keep a live gradient, or the temperature is frozen there for good
    torch.manual_seed(0)
    trainer = OnlineTrainer(GrowCLIP(tiny_arch()), TrainConfig(batch_size=16, lr=1e-2, warmup_steps=0))
    batch = random_batches(trainer.model.arch, 1, size=16)[0]
    with torch.no_grad():
        trainer.model.logit_scale.fill_(math.log(100.0) + 0.5)
    trainer.train_step(batch)  # the forward clamps there: no gradient on this step
    cap = math.log(100.0)
    values = [trainer.model.logit_scale.item()]
    for _ in range(3):
        trainer.train_step(batch)
        grad = trainer.model.logit_scale.grad
        assert grad is not None and float(grad.abs()) > 0
        values.append(trainer.model.logit_scale.item())
    assert all(v <= cap + 1e-6 for v in values)
    assert values[-1] != values[0]  # it moves
