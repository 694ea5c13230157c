"""The growth guard on the online loop (shards, no broker): a growth that made things worse is rolled
back to the base model trained beside it; the supernet's batches hold each sample once."""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from growclip_stream.batch import Batch
from growclip_stream.data.datasets import iter_records
from growclip_stream.data.decode import DecodePipeline
from growclip_stream.data.images import ImageTransform
from growclip_stream.data.pipeline import Decoder
from growclip_stream.data.records import RecordLimits
from growclip_stream.data.shards import ShardDeadLetter, ShardSource, write_parquet_shards
from growclip_stream.growth.config import GrowthConfig
from growclip_stream.growth.controller import GrowthController, GrowthEvent, GrowthPlan
from growclip_stream.model import GrowCLIP
from growclip_stream.model.tokenizer import ByteTokenizer
from growclip_stream.optim import OptimizerSettings
from growclip_stream.train.config import TrainConfig
from growclip_stream.train.loop import LoopConfig, OnlineLoop, dedupe_by_id
from growclip_stream.train.trainer import OnlineTrainer, StepStats
from tests.helpers import randomized, tiny_arch


class Recorder:
    def __init__(self) -> None:
        self.steps: list[StepStats] = []
        self.growths: list[GrowthEvent] = []
        self.published: list[int] = []

    def on_records(self, counts: dict[str, int]) -> None:
        pass

    def on_step(self, stats: StepStats, data_wait_s: float) -> None:
        self.steps.append(stats)

    def on_growth(self, event: GrowthEvent) -> None:
        self.growths.append(event)

    def on_eval(self, loss: float) -> None:
        pass

    def publish(
        self, model: GrowCLIP, *, generation: int, step: int, samples_trained: int, growth_history
    ) -> None:  # type: ignore[no-untyped-def]
        self.published.append(generation)


class LoggingTrainer(OnlineTrainer):
    """The real trainer, noting which model trained on which batch (the guard's base shares the log)."""

    def __init__(self, model: GrowCLIP, cfg: TrainConfig) -> None:
        super().__init__(model, cfg)
        self.log: list[tuple[int, Batch]] = []

    def train_step(self, batch: Batch) -> StepStats:
        self.log.append((id(self.model), batch))
        return super().train_step(batch)


class SabotagingController(GrowthController):
    """Grows as configured, then wrecks the grown weights (a candidate with a sabotaged init), and
    keeps a copy of the trainer as it was just before the growth."""

    def __init__(self, cfg: GrowthConfig, train_cfg: OptimizerSettings, sabotage: bool) -> None:
        super().__init__(cfg, train_cfg)
        self.sabotage = sabotage
        self.trainer: OnlineTrainer | None = None
        self.before: OnlineTrainer | None = None

    def inherit(self, plan: GrowthPlan, model: GrowCLIP) -> GrowCLIP:
        assert self.trainer is not None and self.trainer.model is model
        self.before = copy.deepcopy(self.trainer)
        grown = super().inherit(plan, model)
        return randomized(grown, seed=3) if self.sabotage else grown


def run_until(loop: OnlineLoop, done: Callable[[], bool], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        loop.run_once()


def build(
    tmp_path: Path, growth: GrowthConfig, sabotage: bool
) -> tuple[OnlineLoop, Recorder, SabotagingController]:
    shards = tmp_path / "shards"
    write_parquet_shards(
        itertools.islice(iter_records("fashion-mnist", seed=2), 600), str(shards), per_shard=300
    )
    arch = tiny_arch()
    train = TrainConfig(batch_size=16, warmup_steps=2, rewarm_steps=2, lr=3e-3)
    torch.manual_seed(0)
    trainer = LoggingTrainer(GrowCLIP(arch), train)
    ctrl = SabotagingController(growth, train, sabotage)
    ctrl.trainer = trainer
    rec = Recorder()
    loop = OnlineLoop(
        source=ShardSource(str(shards)),
        dead_letter=ShardDeadLetter(str(tmp_path / "dead.jsonl")),
        pipeline=DecodePipeline(
            Decoder(ImageTransform(arch.image_size, arch.channels), RecordLimits()), 0.1, 1, "thread"
        ),
        tokenizer=ByteTokenizer(arch.context_length),
        trainer=trainer,
        growth=ctrl,
        cfg=LoopConfig(holdout_fraction=0.1, eval_batch_size=16, poll_timeout_s=0.05),
        publish=rec.publish,
        observer=rec,
    )
    return loop, rec, ctrl


def plan_growth(guard_steps: int, guard_margin: float = 0.0) -> GrowthConfig:
    return GrowthConfig(
        policy="plan", plan=("widen:image*2",), samples_per_param=0, min_interval_samples=10**9,
        plateau_enabled=False, guard_steps=guard_steps, guard_margin=guard_margin,
    )  # fmt: skip


def test_a_growth_that_made_things_worse_is_rolled_back(tmp_path: Path) -> None:
    loop, rec, ctrl = build(tmp_path, plan_growth(guard_steps=6), sabotage=True)
    run_until(loop, lambda: len(loop.holdout) >= 32 and len(rec.steps) >= 4)
    base_arch = loop.trainer.model.arch
    loop.request_grow()
    run_until(loop, lambda: loop.guarding)
    assert loop.grow_now("forced") is None and len(ctrl.history) == 1  # no second growth in the window
    run_until(loop, lambda: len(rec.growths) >= 2)
    assert not loop.guarding
    grown, rolled = ctrl.history
    assert grown.outcome == "grown" and rolled.outcome == "rolled_back" and rolled.trigger == "guard"
    assert grown.guard["verdict"] == "rolled_back" and grown.guard["steps"] == 6
    assert grown.guard["grown_loss"] > grown.guard["base_loss"]
    assert rolled.arch_after == base_arch.to_dict() and rolled.generation == 2 == ctrl.generation
    assert loop.trainer.model.arch == base_arch and rec.published[-1] == 2

    # the trainer now holds exactly the base trained on the grown model's batches: replay it
    assert ctrl.before is not None
    replay = ctrl.before
    base_batches = [b for who, b in loop.trainer.log if who == id(loop.trainer.model)]
    base_batches = base_batches[len(replay.log) :]  # those after the growth
    assert len(base_batches) == 6
    for b in base_batches:
        OnlineTrainer.train_step(replay, b)
    got, want = loop.trainer.model.state_dict(), replay.model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert loop.trainer.step == replay.step and loop.trainer.lr_at(loop.trainer.step) == replay.lr_at(
        replay.step
    )
    for p, q in zip(loop.trainer.model.parameters(), replay.model.parameters(), strict=True):
        mine, theirs = loop.trainer.optimizer.state[p], replay.optimizer.state[q]
        assert all(torch.equal(mine[k], theirs[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    # training goes on with the restored model and optimizer
    steps = len(rec.steps)
    run_until(loop, lambda: len(rec.steps) >= steps + 2)
    loop.finish()
    loop.pipeline.close()


def test_a_growth_within_the_margin_is_kept(tmp_path: Path) -> None:
    loop, rec, ctrl = build(tmp_path, plan_growth(guard_steps=3, guard_margin=100.0), sabotage=False)
    run_until(loop, lambda: len(loop.holdout) >= 32 and len(rec.steps) >= 4)
    loop.request_grow()
    run_until(loop, lambda: bool(ctrl.history) and bool(ctrl.history[0].guard))
    (event,) = ctrl.history
    assert event.guard["verdict"] == "kept" and ctrl.generation == 1
    assert loop.trainer.model.arch.to_dict() == event.arch_after
    loop.finish()
    loop.pipeline.close()


@pytest.mark.parametrize("n", [50])
def test_supernet_batches_hold_each_sample_once(tmp_path: Path, n: int) -> None:
    loop, rec, _ = build(tmp_path, plan_growth(guard_steps=0), sabotage=False)
    run_until(loop, lambda: len(rec.steps) >= 12)
    assert len(loop.recent) > 16
    for batch in itertools.islice(loop._supernet_batches(between=lambda: None), n):
        assert len(set(batch.ids)) == len(batch.ids)
    loop.finish()
    loop.pipeline.close()
    assert [s.id for s in dedupe_by_id([*loop.recent, *loop.recent])] == [s.id for s in loop.recent]
