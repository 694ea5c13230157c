"""The online loop on a real topic and on shards: routing, settled positions, growth paused or beside it."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import pytest
import torch

from growclip_stream.data.datasets import iter_records
from growclip_stream.data.decode import DecodePipeline
from growclip_stream.data.images import ImageTransform
from growclip_stream.data.kafka_source import KafkaDeadLetter, KafkaSource, KafkaSourceConfig
from growclip_stream.data.pipeline import Decoder, Sample, full_batches
from growclip_stream.data.produce import produce
from growclip_stream.data.records import Record, RecordLimits, is_held_out
from growclip_stream.data.shards import ShardDeadLetter, ShardSource, write_parquet_shards
from growclip_stream.growth.config import GrowthConfig
from growclip_stream.growth.controller import GrowthController, GrowthEvent
from growclip_stream.model import ArchConfig, GrowCLIP, TowerConfig
from growclip_stream.model.tokenizer import ByteTokenizer
from growclip_stream.train.config import TrainConfig
from growclip_stream.train.loop import LoopConfig, OnlineLoop
from growclip_stream.train.trainer import OnlineTrainer, StepStats
from tests.helpers import tiny_arch

# The loop-versus-bare-trainer pin: steps, and how much worse the loop's validation loss may end
# (nats). Measured: loop minus bare -0.03 and +0.03 on seeds 0 and 1; a loop that trains 75% of
# every batch on replays of 200 old samples ends +0.41 worse and fails.
STEPS_VS_BARE = 150
LOSS_TOLERANCE = 0.15


class Recorder:
    """The loop's observer, recording what it reports."""

    def __init__(self) -> None:
        self.records: dict[str, int] = {}
        self.steps: list[StepStats] = []
        self.growths: list[GrowthEvent] = []
        self.published: list[tuple[int, int]] = []

    def on_records(self, counts: dict[str, int]) -> None:
        for k, v in counts.items():
            self.records[k] = self.records.get(k, 0) + v

    def on_step(self, stats: StepStats, data_wait_s: float) -> None:
        self.steps.append(stats)

    def on_growth(self, event: GrowthEvent) -> None:
        self.growths.append(event)

    def on_eval(self, loss: float) -> None:
        pass

    def publish(
        self, model: GrowCLIP, *, generation: int, step: int, samples_trained: int, growth_history
    ) -> None:
        self.published.append((generation, step))


def build(broker: str, topic: str, growth: GrowthConfig) -> tuple[OnlineLoop, Recorder, KafkaSource]:
    arch = tiny_arch()
    source = KafkaSource(KafkaSourceConfig(broker, topic, group_id=topic, session_timeout_ms=2000,
                                           heartbeat_interval_ms=500))  # fmt: skip
    rec = Recorder()
    train = TrainConfig(batch_size=32, warmup_steps=2)
    loop = OnlineLoop(
        source=source,
        dead_letter=KafkaDeadLetter(broker, topic),
        pipeline=DecodePipeline(
            Decoder(ImageTransform(arch.image_size, arch.channels), RecordLimits()), 0.1, 1, "thread"
        ),
        tokenizer=ByteTokenizer(arch.context_length),
        trainer=OnlineTrainer(GrowCLIP(arch), train),
        growth=GrowthController(growth, train),
        cfg=LoopConfig(holdout_fraction=0.1, eval_batch_size=16, poll_timeout_s=0.2),
        publish=rec.publish,
        observer=rec,
    )
    return loop, rec, source


def run_until(loop: OnlineLoop, done, timeout_s: float = 90) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        loop.run_once()


@pytest.mark.parametrize("beside", [False, True], ids=["paused", "beside-training"])
def test_forced_growth_with_search(broker: str, topic: str, beside: bool) -> None:
    torch.manual_seed(0)
    produce(broker, topic, iter_records("fashion-mnist", seed=1), limit=1200)
    cfg = GrowthConfig(
        samples_per_param=0, min_interval_samples=10**9, plateau_enabled=False, train_during_search=beside,
        space=("deepen:image+1", "widen_mlp:text+16"), max_ops_per_step=1, supernet_steps=30,
        decline_z=0.0, min_gain=0.0, guard_steps=0,  # any gain grows: this test is about the mechanics
    )  # fmt: skip
    loop, rec, source = build(broker, topic, cfg)
    run_until(loop, lambda: len(loop.holdout) >= 32 and len(rec.steps) >= 5)
    steps_before = loop.trainer.step
    loop.request_grow()
    loop.run_once()
    if beside:
        assert loop.searching  # the search runs in its own thread...
        run_until(loop, lambda: not loop.searching)
        assert loop.trainer.step > steps_before  # ...while training went on
    else:
        assert not loop.searching and len(rec.growths) == 1  # grown within that iteration
    assert len(rec.growths) == 1
    event = rec.growths[0]
    assert event.trigger == "forced" and event.policy == "search"
    scored = [c for c in event.candidates if c.get("val_loss") is not None]
    assert {c["name"] for c in scored} == {"deepen:image+1", "widen_mlp:text+16"}
    assert loop.trainer.model.arch.to_dict() == event.arch_after
    # whether a candidate beats the base after so little training is up to the data (the selection
    # rule has its own tests); either way the decision is applied and published as such
    if event.outcome == "grown":
        assert event.pim["optimizer"]["grown"] + event.pim["optimizer"]["unchanged"] > 0
        assert rec.published[-1][0] == 1  # the grown model was published
    else:
        assert event.outcome == "declined" and event.reason.startswith("declined:")
        assert loop.growth.generation == 0 and event.arch_after == tiny_arch().to_dict()
    # drain the topic and finish: every record is settled (trained, held out or dead-lettered), once
    run_until(loop, lambda: sum(rec.records.values()) == 1200)
    leftover = loop.batcher.pending()
    loop.finish()
    settled = int(loop.settled_source_state["positions"]["0"])
    if leftover == 1:  # a lone record cannot make a contrastive step: it stays for the next run
        assert settled <= 1200 and loop.trainer.samples == rec.records["trained"] - 1
    else:
        assert settled == 1200 and loop.trainer.samples == rec.records["trained"]
    loop.pipeline.close()
    source.close()


def test_a_due_search_waits_for_its_budget_while_training_goes_on(broker: str, topic: str) -> None:
    """The data-volume trigger fires long before half the work pays for a useful search: the
    loop keeps training (saying why it waits) and searches once the budget pays for one."""
    torch.manual_seed(0)
    produce(broker, topic, iter_records("fashion-mnist", seed=2), limit=3000)
    cfg = GrowthConfig(
        samples_per_param=0, min_interval_samples=64, plateau_enabled=False,
        space=("deepen:image+1", "widen_mlp:text+16"), max_ops_per_step=1, supernet_steps=10,
        min_supernet_steps=10, selection_samples=32, search_budget_fraction=0.5,
        decline_z=0.0, min_gain=0.0, guard_steps=0,
    )  # fmt: skip
    loop, rec, source = build(broker, topic, cfg)
    waited_at: list[int] = []

    def searched() -> bool:
        if loop.budget_wait:
            assert loop.budget_wait.startswith("search budget")
            waited_at.append(loop.trainer.step)
        return bool(rec.growths)

    run_until(loop, searched, timeout_s=180)
    event = rec.growths[0]
    assert event.trigger == "data_volume" and waited_at, "the trigger fired before the budget paid"
    assert waited_at[-1] < event.step, "it trained while it waited"
    budget = event.supernet["budget"]
    assert budget["planned_steps"] == 10 and budget["scored_samples"] >= 16
    assert event.work["fractions"]["flops"] <= 0.5 + 1e-9
    loop.finish()
    loop.pipeline.close()
    source.close()


def test_resumed_positions_are_what_the_next_checkpoint_records(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A run resumed from a checkpoint and stopped before new data arrives settles at the resumed
    positions, not at those the source had before they were loaded."""
    shards = tmp_path / "shards"
    write_parquet_shards(
        itertools.islice(iter_records("fashion-mnist", seed=2), 100), str(shards), per_shard=50
    )

    def loop_on_shards() -> OnlineLoop:
        arch = tiny_arch()
        train = TrainConfig(batch_size=16, warmup_steps=2)
        rec = Recorder()
        return OnlineLoop(
            source=ShardSource(str(shards)),
            dead_letter=ShardDeadLetter(str(tmp_path / "dead.jsonl")),
            pipeline=DecodePipeline(
                Decoder(ImageTransform(arch.image_size, arch.channels), RecordLimits()), 0.1, 1, "thread"
            ),
            tokenizer=ByteTokenizer(arch.context_length),
            trainer=OnlineTrainer(GrowCLIP(arch), train),
            growth=GrowthController(GrowthConfig(enabled=False), train),
            cfg=LoopConfig(holdout_fraction=0.1, poll_timeout_s=0.05),
            publish=rec.publish,
            observer=rec,
        )

    first = loop_on_shards()
    run_until(first, lambda: first.source.finished and first.pipeline.in_flight() == 0)
    first.finish()
    saved = first.settled_source_state
    assert len(saved["completed"]) == 2
    first.pipeline.close()

    second = loop_on_shards()
    second.load_source_state(saved)
    second.finish()  # stopped at once: nothing new was read
    assert second.settled_source_state == saved and second.trainer.samples == 0
    second.pipeline.close()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Training with intra-op threads beside a decode thread crawls on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_the_online_loop_learns_as_well_as_the_bare_trainer(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Same records in the same order, same seed, same number of steps: the loop (decode pipeline,
    held-out split, replay mixed into every batch) ends with a validation loss within LOSS_TOLERANCE
    of the bare trainer fed those records directly. Steps are counted, not seconds."""
    loop_loss, bare_loss = loop_and_bare_loss(tmp_path, LoopConfig(poll_timeout_s=0.05))
    assert loop_loss <= bare_loss + LOSS_TOLERANCE, (loop_loss, bare_loss)


def loop_and_bare_loss(tmp_path, loop_cfg: LoopConfig, seed: int = 0) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Validation losses after STEPS_VS_BARE steps of the loop and of the bare trainer on its records."""
    steps, batch_size = STEPS_VS_BARE, 64
    tower = TowerConfig(32, 1, 64, head_dim=16)
    arch = ArchConfig(tower, tower, TowerConfig(32, 0, 64, head_dim=16))
    records = list(itertools.islice(iter_records("fashion-mnist", seed=3 + seed), steps * batch_size + 2000))
    write_parquet_shards(records, str(tmp_path / "shards"), per_shard=4000)
    transform = ImageTransform(arch.image_size, arch.channels)
    tok = ByteTokenizer(arch.context_length)

    def sample(r: Record) -> Sample:  # what the decode pipeline makes of the record
        return Sample(r.id, torch.from_numpy(transform.pixels(r.image, RecordLimits())), r.caption)

    val_records = itertools.islice(iter_records("fashion-mnist", split="test", seed=0), 512)
    val = list(full_batches([sample(r) for r in val_records], 128, tok))
    train = TrainConfig(batch_size=batch_size, seed=seed)

    torch.manual_seed(seed)
    rec = Recorder()
    loop = OnlineLoop(
        source=ShardSource(str(tmp_path / "shards")),
        dead_letter=ShardDeadLetter(str(tmp_path / "dead.jsonl")),
        pipeline=DecodePipeline(Decoder(transform, RecordLimits()), loop_cfg.holdout_fraction, 1, "thread"),
        tokenizer=tok,
        trainer=OnlineTrainer(GrowCLIP(arch), train),
        growth=GrowthController(GrowthConfig(enabled=False), train),
        cfg=loop_cfg,
        publish=rec.publish,
        observer=rec,
    )
    try:
        run_until(loop, lambda: loop.trainer.step >= steps, timeout_s=500)
    finally:
        loop.pipeline.close()
    assert loop.trainer.step == steps and any(s.fresh < s.batch_size for s in rec.steps)  # replay ran
    loop_loss = loop.trainer.eval_loss(val)

    torch.manual_seed(seed)
    bare = OnlineTrainer(GrowCLIP(arch), train)
    fresh = [sample(r) for r in records if not is_held_out(r.id, loop_cfg.holdout_fraction)]
    for batch in itertools.islice(full_batches(fresh, batch_size, tok), steps):
        bare.train_step(batch)
    bare_loss = bare.eval_loss(val)
    assert loop_loss is not None and bare_loss is not None
    return loop_loss, bare_loss
