"""The online loop: poll the source, route records, train, grow, publish. One thread owns it.

It is the only place that mutates the training model. Serving sees the model only through what
`publish` is handed: the engine there copies it into an immutable snapshot.

Each training batch is `batch_size - k` fresh records from the stream plus `k` replayed ones
(k = round(replay_fraction x batch_size), once the replay reservoir has them): every fresh record is
trained on exactly once, and past data keeps coming back against forgetting.
"""

from __future__ import annotations

import copy
import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from growclip_stream.batch import Batch
from growclip_stream.checkpoint.state import python_rng_state, restore_python_rng
from growclip_stream.data.decode import DecodePipeline, Routed, SettledStates
from growclip_stream.data.pipeline import Batcher, Sample, collate, full_batches
from growclip_stream.data.records import RecordError
from growclip_stream.data.reservoir import Reservoir, samples_from_state, samples_state
from growclip_stream.growth.budget import TRAIN_FLOPS_FACTOR
from growclip_stream.growth.controller import GrowthController, GrowthEvent, GrowthPlan
from growclip_stream.growth.pim import carry_optimizer_state
from growclip_stream.model import GrowCLIP
from growclip_stream.model.tokenizer import ByteTokenizer
from growclip_stream.train.trainer import OnlineTrainer, StepStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopConfig:
    holdout_fraction: float = 0.02  # fraction of records (by id hash) never trained on
    holdout_capacity: int = 512  # records kept in the held-out reservoir
    eval_batch_size: int = 64  # held-out batches (evaluation and growth selection) have this size
    publish_every_steps: int = 20  # refresh the served snapshot this often (and after every growth)
    eval_every_steps: int = 100  # held-out loss this often
    poll_timeout_s: float = 0.5
    replay_capacity: int = 10_000  # samples kept in the replay reservoir; 0 disables replay
    replay_fraction: float = 0.25  # share of each training batch that is replayed, in [0, 1)
    recent_capacity: int = 4096  # latest training samples kept for supernet training (with replay)

    __pydantic_config__ = {"extra": "forbid"}  # noqa: RUF012 - read by the daemon's config validation

    def __post_init__(self) -> None:
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError("holdout_fraction must be within [0, 1)")
        if self.publish_every_steps < 1 or self.eval_every_steps < 1:
            raise ValueError("publish_every_steps and eval_every_steps must be >= 1")
        if self.eval_batch_size < 2:
            raise ValueError("eval_batch_size must be >= 2")
        if self.replay_capacity < 0:
            raise ValueError("replay_capacity must be >= 0")
        if not 0 <= self.replay_fraction < 1:
            raise ValueError("replay_fraction must be within [0, 1)")
        if self.recent_capacity < 2:
            raise ValueError("recent_capacity must be >= 2")


class SearchCancelled(Exception):
    """A growth search gave up because the loop is stopping."""


class Source(Protocol):
    """Where records come from (Kafka, shards): one interface, so the daemon needs no union of kinds.

    ``state_dict`` is the position after the last record ``poll`` returned; ``state_after(state,
    messages)`` the position after ``messages`` (returned in that order) read from ``state``, so a
    checkpoint can stop at any record, not only where a poll ended; ``commit(state)`` is
    told that a checkpoint holding ``state`` is durable; ``lag`` is records not read yet, per
    partition. ``pause`` stops delivery while ``poll`` keeps being called (Kafka group membership).
    """

    def poll(self, timeout_s: float, max_records: int | None = None) -> Sequence[Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> bool | None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    @property
    def paused(self) -> bool: ...
    def state_after(self, state: dict[str, Any], messages: Sequence[Any]) -> dict[str, Any]: ...
    def commit(self, state: dict[str, Any] | None = None) -> object: ...
    def lag(self) -> dict[int, int]: ...
    def close(self) -> None: ...


class DeadLetter(Protocol):
    """Where unusable records go. ``flush`` returns True once everything sent so far is durable
    (acknowledged by the broker, written to storage), False when it could not be made so."""

    def send(self, msg: Any, reason: str, detail: str) -> None: ...
    def flush(self) -> bool: ...
    def close(self) -> None: ...


class Publisher(Protocol):
    def __call__(
        self,
        model: GrowCLIP,
        *,
        generation: int,
        step: int,
        samples_trained: int,
        growth_history: Sequence[dict],
    ) -> None: ...


class LoopObserver(Protocol):
    """Where the loop reports what happened (metrics, logs); it never decides anything."""

    def on_records(self, counts: dict[str, int]) -> None: ...
    def on_step(self, stats: StepStats, data_wait_s: float) -> None: ...
    def on_growth(self, event: GrowthEvent) -> None: ...
    def on_eval(self, loss: float) -> None: ...


class OnlineLoop:
    def __init__(
        self,
        *,
        source: Source,
        dead_letter: DeadLetter,
        pipeline: DecodePipeline[Any],
        tokenizer: ByteTokenizer,
        trainer: OnlineTrainer,
        growth: GrowthController,
        cfg: LoopConfig,
        publish: Publisher,
        observer: LoopObserver,
        audit: bool = False,
    ) -> None:
        """``audit``: keep each taken record's fate (see :meth:`take_settled_fates`)."""
        self.source = source
        self.dead_letter = dead_letter
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.trainer = trainer
        self.growth = growth
        self.cfg = cfg
        self.publish = publish
        self.observer = observer
        batch_size = trainer.cfg.batch_size
        self.replay_per_batch = round(cfg.replay_fraction * batch_size) if cfg.replay_capacity else 0
        self.batcher = Batcher(batch_size - self.replay_per_batch, tokenizer)
        self.replay = Reservoir(cfg.replay_capacity, seed=trainer.cfg.seed)
        self.recent: deque[Sample] = deque(maxlen=cfg.recent_capacity)
        self.holdout = Reservoir(cfg.holdout_capacity, seed=trainer.cfg.seed + 1)
        self.last_eval_loss: float | None = None
        # Source positions up to which every record is settled (trained, held out or dead-lettered):
        # what a checkpoint may record and what may be committed. Records are taken out of the
        # decode pipeline in arrival order; the batcher trains them first in, first out, so the
        # settled records are exactly those taken before the oldest one still pending in the
        # batcher. The ledger turns that count into source positions, record-exact.
        self.ledger = SettledStates(source.state_dict(), advance=source.state_after)
        self.settled_source_state: dict[str, Any] = source.state_dict()  # as of the last iteration
        self._taken = 0  # records taken out of the pipeline
        self.dead_lettered = 0  # records sent to the dead letter
        self._pending_index: deque[int] = deque()  # the take index of each sample in the batcher
        # (take index, source key, record id, fate, reason) of records taken, for an audit trail
        self._fates: deque[tuple[int, str, str | None, str, str]] | None = deque() if audit else None
        self._rng = random.Random(trainer.cfg.seed)
        self._grow_requested = threading.Event()
        self._stop = threading.Event()  # set by run()'s caller: a growth search in progress gives up
        self._search: Future[GrowthPlan | None] | None = None  # a search running beside training
        self._search_thread: threading.Thread | None = None
        self._search_started = 0.0
        self._guard: GrowthGuard | None = None  # the base model trained beside a fresh growth
        self._tick: Callable[[], None] | None = None
        self._wait_since = time.perf_counter()
        self.budget_wait = ""  # why a due growth search is waiting for its budget ("" when none is)

    # -- control, callable from any thread -------------------------------------------------
    def request_grow(self) -> None:
        """Force a growth step at the next loop iteration (admin API)."""
        self._grow_requested.set()

    def load_source_state(self, state: dict[str, Any]) -> None:
        """Resume the source at a checkpoint's positions; they are settled by definition.

        The ledger is restarted from them too: it would otherwise report the positions the source
        had when the loop was built, and a checkpoint taken before new data arrives would record those.
        """
        self.source.load_state_dict(state)
        self.ledger = SettledStates(self.source.state_dict(), advance=self.source.state_after)
        self.settled_source_state = self.source.state_dict()
        self._taken = 0
        self._pending_index.clear()
        if self._fates is not None:
            self._fates.clear()

    def settled_state(self) -> dict[str, Any]:
        """The source state up to which every record is settled, now (loop thread only)."""
        return self.ledger.settled(self._settled_count())

    def _settled_count(self) -> int:
        return self._pending_index[0] if self._pending_index else self._taken

    def take_settled_fates(self) -> list[tuple[str, str | None, str, str]]:
        """``(source key, record id, fate, reason)`` of every settled record not handed out yet,
        in source order; fate is ``trained``, ``held_out`` or ``dead_letter`` (loop thread only,
        with ``audit``). The records are those :meth:`settled_state` covers, so an audit trail
        written with a checkpoint names exactly the records that checkpoint accounts for."""
        if self._fates is None:
            raise RuntimeError("the loop was built without audit")
        upto = self._settled_count()
        out = []
        while self._fates and self._fates[0][0] < upto:
            out.append(self._fates.popleft()[1:])
        return out

    def state_dict(self) -> dict[str, Any]:
        """What a restart needs beyond weights, optimizer and growth: the loop's generator, the
        replay and held-out reservoirs and the recent samples the next search trains its
        supernet on (their samples as tensors; see ``Reservoir.state_dict``)."""
        return {
            "rng": python_rng_state(self._rng),
            "replay": self.replay.state_dict(),
            "holdout": self.holdout.state_dict(),
            "recent": samples_state(list(self.recent)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (parts missing from an older checkpoint stay as built)."""
        if "rng" in state:
            restore_python_rng(self._rng, state["rng"])
        if "replay" in state:
            self.replay.load_state_dict(state["replay"])
        if "holdout" in state:
            self.holdout.load_state_dict(state["holdout"])
        if "recent" in state:
            self.recent.clear()
            self.recent.extend(samples_from_state(state["recent"]))

    @property
    def searching(self) -> bool:
        return self._search is not None

    @property
    def guarding(self) -> bool:
        """A fresh growth is on trial against the base trained beside it (no other growth starts)."""
        return self._guard is not None

    # -- the loop thread -------------------------------------------------------------------
    def run(
        self,
        stop: threading.Event,
        paused: threading.Event | None = None,
        tick: Callable[[], None] | None = None,
    ) -> None:
        """Loop until `stop` is set, idling while `paused` is; `tick` runs after every iteration,
        and between the steps of a growth search (which `stop` cancels)."""
        self._stop = stop
        self._tick = tick
        self.publish_now()
        while not stop.is_set():
            try:
                if paused is not None and paused.is_set():
                    self.idle()
                else:
                    self.run_once()
            except SearchCancelled:
                log.info("growth search cancelled: stopping")
                break
            if tick is not None:
                tick()
        self.finish()

    def idle(self) -> None:
        """Paused: keep polling a paused source (a consumer that stops polling leaves its group)."""
        self.source.pause()
        self.source.poll(0.2, max_records=1)
        self.source.resume()

    def run_once(self) -> None:
        """Poll once, route what arrived, train every full batch, grow when due."""
        if self._search is not None and self._search.done():
            self._finish_search()
        batch_size = self.batcher.batch_size
        in_flight = self.pipeline.in_flight()
        want = min(2 * batch_size - self.batcher.pending() - in_flight, self.pipeline.room())
        if want > 0:  # keep up to two batches in the pipeline: decoding overlaps training
            messages = self.source.poll(self.cfg.poll_timeout_s if in_flight == 0 else 0.0, max_records=want)
            if messages:
                self.pipeline.submit(messages)
                self.ledger.submitted(len(messages), self.source.state_dict(), messages)
        lack = batch_size - self.batcher.pending()
        if lack > 0:
            self._ingest(self.pipeline.take(max_items=lack, timeout_s=0.05))
        while (fresh := self.batcher.take()) is not None:
            data_wait = time.perf_counter() - self._wait_since
            self._train(fresh, data_wait)
            self._wait_since = time.perf_counter()
        self.settled_source_state = self.settled_state()
        if self._grow_requested.is_set():
            self._grow_requested.clear()
            self.grow_now("forced")

    def finish(self) -> None:
        """Train what is pending as a smaller last batch, so the consumed records are settled.

        A single leftover record cannot make a contrastive step (it has no negatives): it stays
        unsettled, so the next run reads it again instead of it being lost. A search still running
        beside training is cancelled and waited for (the next run's triggers will start another).
        """
        self._stop.set()  # a search thread gives up at its next step
        while self.pipeline.in_flight():  # what is being decoded is routed too
            self._ingest(self.pipeline.take(timeout_s=1.0))
        while (fresh := self.batcher.take()) is not None:
            self._train(fresh, 0.0, grow=False)
        pending = self.batcher.drain()
        if len(pending) >= 2:
            self._train(pending, 0.0, replay=False, grow=False)
            self._pending_index.clear()
        elif pending:
            self.batcher.add(pending[0])  # it stays pending: the settled state stops before it
            log.info("a single last record stays unsettled for the next run", extra={"id": pending[0].id})
        self.settled_source_state = self.settled_state()
        search, self._search = self._search, None
        if search is not None and self._search_thread is not None:
            self._search_thread.join()  # it stops at its next supernet step
        self._search_thread = None
        self.publish_now()

    def _ingest(self, routed: Sequence[Routed[Any]]) -> None:
        if not routed:
            return
        self.ledger.taken(len(routed))
        counts: Counter[str] = Counter()
        for item in routed:
            index = self._taken
            self._taken += 1
            counts[item.status] += 1
            if isinstance(item.result, RecordError):
                self.dead_letter.send(item.message, item.result.reason, item.result.detail)
                self.dead_lettered += 1
                fate, sample_id = "dead_letter", None
            elif item.status == "held_out":
                self.holdout.add(item.result)
                fate, sample_id = "held_out", item.result.id
            else:
                self.batcher.add(item.result)
                self._pending_index.append(index)
                fate, sample_id = "trained", item.result.id
            if self._fates is not None:
                reason = item.status if fate == "dead_letter" else ""
                self._fates.append((index, _source_key(item.message), sample_id, fate, reason))
        self.observer.on_records(dict(counts))

    def _train(self, fresh: list[Sample], data_wait_s: float, replay: bool = True, grow: bool = True) -> None:
        replayed = self.replay.sample(self.replay_per_batch, {s.id for s in fresh}) if replay else []
        # on an accelerator, raw uint8 pixels cross to it (pinned for CUDA) and are normalised there
        on_device = self.trainer.device.type != "cpu"
        batch = collate(
            fresh + replayed, self.tokenizer, uint8=on_device, pin_memory=self.trainer.device.type == "cuda"
        )
        train_batch = Batch(batch.images, batch.tokens, batch.ids, replayed=len(replayed))
        stats = self.trainer.train_step(train_batch)
        for _ in range(min(len(fresh), len(self._pending_index))):
            self._pending_index.popleft()  # trained: the batcher hands samples out first in, first out
        for sample in fresh:
            self.replay.add(sample)
            self.recent.append(sample)
        self.growth.observe_step(
            self.trainer.model, stats.loss, samples=len(train_batch), seconds=stats.seconds
        )
        self.observer.on_step(stats, data_wait_s)
        if self._guard is not None:
            self._guard_step(train_batch)
        if stats.step % self.cfg.eval_every_steps == 0:
            self.evaluate()
        trigger = None
        if self._search is None and self._guard is None and grow:
            trigger = self.growth.due(
                samples=self.trainer.samples,
                step=self.trainer.step,
                num_params=self.trainer.model.arch.num_params(),
            )
        if trigger is not None and self._budget_wait(trigger):
            trigger = None
        if trigger is not None:
            self.grow_now(trigger)
        elif stats.step % self.cfg.publish_every_steps == 0:
            self.publish_now()

    def _budget_wait(self, trigger: str) -> bool:
        """True while a due search waits for its budget (logged once per wait; the trigger stays armed)."""
        why = self.growth.search_wait(self.trainer.model.arch, self.trainer.cfg.batch_size)
        if why and not self.budget_wait:
            log.info("growth due, waiting for search budget", extra={"trigger": trigger, "why": why})
        self.budget_wait = why
        return bool(why)

    def holdout_batches(self) -> list[Batch]:
        return list(full_batches(self.holdout.samples, self.cfg.eval_batch_size, self.tokenizer))

    def evaluate(self) -> float | None:
        loss = self.trainer.eval_loss(self.holdout_batches())
        if loss is not None:
            self.last_eval_loss = loss
            self.observer.on_eval(loss)
        return loss

    def _supernet_batches(self, between: Callable[[], None]) -> Iterator[Batch]:
        """Endless batches drawn from a snapshot of recent and replayed samples, each sample once
        (a recent sample is usually in the replay reservoir too); ``between`` runs before each one,
        between the supernet's steps (it may raise :class:`SearchCancelled`)."""
        pool = dedupe_by_id([*self.recent, *self.replay.sample(len(self.recent))])
        rng = random.Random(self._rng.random())
        size = min(self.trainer.cfg.batch_size, len(pool))
        while size >= 2:
            between()
            yield collate(rng.sample(pool, size), self.tokenizer)

    def _between_search_steps(self) -> None:
        """A search in the loop thread: give up when stopping, keep the paused source polled (a
        Kafka consumer that stops polling for max_poll_interval_ms leaves its group), and run the
        tick, so checkpoints, admin requests and lag go on during a long search."""
        if self._stop.is_set():
            raise SearchCancelled("stop requested during a growth search")
        if not self.source.paused:
            self.source.pause()
        self.source.poll(0.0, max_records=1)  # returns nothing while paused
        if self._tick is not None:
            self._tick()

    def _check_cancelled(self) -> None:
        """A search beside training: give up when stopping."""
        if self._stop.is_set():
            raise SearchCancelled("stop requested during a growth search")

    # -- growth ------------------------------------------------------------------------------
    def grow_now(self, trigger: str) -> GrowthEvent | None:
        """Grow now (or start a search beside training when so configured); the event when grown here.

        Raises :class:`SearchCancelled` when the loop is stopped during the search."""
        if self._search is not None or self._guard is not None:
            log.info("growth already in progress", extra={"trigger": trigger})
            return None
        holdout = self.holdout_batches()
        start = time.perf_counter()
        if self.growth.cfg.train_during_search:
            model = copy.deepcopy(self.trainer.model)  # the search reads its own copy
            batches = self._supernet_batches(self._check_cancelled)
            self._search_started = start
            self._search = Future()
            future = self._search

            def search() -> None:
                try:
                    with self.trainer.autocast():  # autocast is per thread: the search's own
                        plan = self.growth.search(
                            model,
                            trigger=trigger,
                            train_batches=batches,
                            holdout_batches=holdout,
                            between=self._check_cancelled,
                        )
                    future.set_result(plan)
                except BaseException as err:  # reported in the loop thread
                    future.set_exception(err)

            self._search_thread = threading.Thread(target=search, name="growth-search", daemon=True)
            self._search_thread.start()
            log.info("growth search started beside training", extra={"trigger": trigger})
            return None
        # The supernet's forward passes run in the trainer's precision; weights, growth operators
        # and PIM stay exact fp32 (autocast only casts matmul inputs, never parameters).
        was_paused = self.source.paused
        try:
            with self.trainer.autocast():
                plan = self.growth.search(
                    self.trainer.model,
                    trigger=trigger,
                    train_batches=self._supernet_batches(self._between_search_steps),
                    holdout_batches=holdout,
                    optimizer=self.trainer.optimizer,
                    between=self._between_search_steps,
                )
        finally:
            if not was_paused and self.source.paused:
                self.source.resume()
        return self._apply(plan, trigger, start)

    def _finish_search(self) -> None:
        future, self._search = self._search, None
        assert future is not None
        self._apply(future.result(), "search beside training", self._search_started)

    def _apply(self, plan: GrowthPlan | None, trigger: str, start: float) -> GrowthEvent | None:
        if plan is None:
            self.growth.defer(samples=self.trainer.samples, step=self.trainer.step)
            log.info(
                "growth due but nothing searched",
                extra={"trigger": trigger, "why": self.growth.last_refusal},
            )
            return None
        if plan.declined:
            event = self.growth.record_declined(
                plan, step=self.trainer.step, samples=self.trainer.samples,
                duration_s=time.perf_counter() - start,
            )  # fmt: skip
            log.info("growth declined", extra={"trigger": trigger, "reason": event.reason})
            self.observer.on_growth(event)
            return event
        old_model, old_optimizer = self.trainer.model, self.trainer.optimizer
        # The base goes on beside the grown model for the guard: a shallow copy keeps its model,
        # optimizer and learning-rate schedule; swap_model rebinds the trainer's, not the copy's.
        base = copy.copy(self.trainer) if self.growth.cfg.guard_steps > 0 else None
        grown = self.growth.inherit(plan, old_model)
        self.trainer.swap_model(grown)
        carried = carry_optimizer_state(
            old_model, old_optimizer, grown, self.trainer.optimizer, plan.choice.ops
        )
        event = self.growth.record(
            plan, grown, step=self.trainer.step, samples=self.trainer.samples,
            duration_s=time.perf_counter() - start, optimizer_carry=carried,
        )  # fmt: skip
        if base is not None:
            self._guard = GrowthGuard(base, self.growth.cfg.guard_steps, event.generation)
        log.info(
            "grew model",
            extra={
                "generation": event.generation, "ops": list(event.ops), "trigger": event.trigger,
                "params": event.params_after, "step": event.step, "reason": event.reason,
                "seconds": round(event.duration_s, 3),
            },
        )  # fmt: skip
        self.observer.on_growth(event)
        self.publish_now()
        return event

    def _guard_step(self, batch: Batch) -> None:
        """Train the base on the grown model's batch; after guard_steps, judge the growth."""
        guard = self._guard
        assert guard is not None
        stats = guard.base.train_step(batch)
        flops = TRAIN_FLOPS_FACTOR * guard.base.model.arch.flops_per_sample() * len(batch)
        self.growth.work.add_growth(stats.seconds, flops)
        guard.left -= 1
        if guard.left > 0:
            return
        self._guard = None
        holdout = self.holdout_batches()
        start = time.perf_counter()
        grown_loss = self.trainer.eval_loss(holdout)
        base_loss = guard.base.eval_loss(holdout)
        scored = sum(len(b) for b in holdout)
        eval_flops = scored * (
            self.trainer.model.arch.flops_per_sample() + guard.base.model.arch.flops_per_sample()
        )
        self.growth.work.add_growth(time.perf_counter() - start, eval_flops)
        if grown_loss is None or base_loss is None:
            log.info(
                "growth guard: no held-out data, the growth stands", extra={"generation": guard.generation}
            )
            return
        margin = self.growth.cfg.guard_margin
        worse = grown_loss > base_loss + margin
        verdict = {
            "steps": guard.steps, "grown_loss": grown_loss, "base_loss": base_loss, "margin": margin,
            "samples": scored, "verdict": "rolled_back" if worse else "kept",
        }  # fmt: skip
        if not worse:
            self.growth.record_guard(
                verdict, rolled_back_to=None, step=self.trainer.step, samples=self.trainer.samples
            )
            log.info("growth guard: kept", extra={"generation": guard.generation, **verdict})
            return
        self.trainer.restore_from(guard.base)
        event = self.growth.record_guard(
            verdict, rolled_back_to=guard.base.model, step=self.trainer.step, samples=self.trainer.samples
        )
        assert event is not None
        log.info("growth guard: rolled back", extra={"generation": event.generation, **verdict})
        self.observer.on_growth(event)
        self.publish_now()

    def publish_now(self) -> None:
        self.publish(
            self.trainer.model,
            generation=self.growth.generation,
            step=self.trainer.step,
            samples_trained=self.trainer.samples,
            growth_history=[e.to_dict() for e in self.growth.history],
        )


@dataclass
class GrowthGuard:
    """The base model (in a trainer of its own) trained on the grown model's batches after a growth."""

    base: OnlineTrainer
    steps: int
    generation: int  # of the growth under guard
    left: int = -1

    def __post_init__(self) -> None:
        if self.left < 0:
            self.left = self.steps


def dedupe_by_id(samples: Sequence[Sample]) -> list[Sample]:
    """`samples` with each id kept once (first occurrence), in order."""
    seen: set[str] = set()
    out = []
    for sample in samples:
        if sample.id not in seen:
            seen.add(sample.id)
            out.append(sample)
    return out


def _source_key(message: Any) -> str:
    """Where a record sits in its source: ``<topic or shard>:<partition>:<offset>``."""
    return f"{message.topic}:{message.partition}:{message.offset}"
