"""The online loop: poll the source, route records, train, grow, publish. One thread owns it.

It is the only place that mutates the training model. Serving sees the model only through what
`publish` is handed: the engine there copies it into an immutable snapshot.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from growclip_stream.data.pipeline import Batcher, Decoder, HoldoutBuffer, RawMessage, collate, route
from growclip_stream.data.records import RecordError
from growclip_stream.growth.controller import GrowthController, GrowthEvent
from growclip_stream.model import GrowCLIP
from growclip_stream.model.tokenizer import ByteTokenizer
from growclip_stream.train.trainer import OnlineTrainer, StepStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopConfig:
    holdout_fraction: float = 0.02  # fraction of records (by id hash) never trained on
    holdout_capacity: int = 512  # records kept in the held-out reservoir
    publish_every_steps: int = 20  # refresh the served snapshot this often (and after every growth)
    eval_every_steps: int = 100  # held-out loss this often
    poll_timeout_s: float = 0.5

    __pydantic_config__ = {"extra": "forbid"}  # noqa: RUF012 - read by the daemon's config validation

    def __post_init__(self) -> None:
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError("holdout_fraction must be within [0, 1)")
        if self.publish_every_steps < 1 or self.eval_every_steps < 1:
            raise ValueError("publish_every_steps and eval_every_steps must be >= 1")


class Source(Protocol):
    def poll(self, timeout_s: float, max_records: int | None = None) -> Sequence[Any]: ...
    def state_dict(self) -> dict[str, Any]: ...


class DeadLetter(Protocol):
    def send(self, msg: Any, reason: str, detail: str) -> None: ...


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
        decoder: Decoder,
        tokenizer: ByteTokenizer,
        trainer: OnlineTrainer,
        growth: GrowthController,
        cfg: LoopConfig,
        publish: Publisher,
        observer: LoopObserver,
    ) -> None:
        self.source = source
        self.dead_letter = dead_letter
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.trainer = trainer
        self.growth = growth
        self.cfg = cfg
        self.publish = publish
        self.observer = observer
        self.batcher = Batcher(trainer.cfg.batch_size, tokenizer)
        self.holdout = HoldoutBuffer(cfg.holdout_capacity, seed=trainer.cfg.seed)
        self.last_eval_loss: float | None = None
        # Source positions up to which every record is settled (trained, held out or dead-lettered):
        # what a checkpoint may record and what may be committed. Polls never ask for more than the
        # batch lacks, so the batcher empties at every step and this advances with each step.
        self.settled_source_state: dict[str, Any] = source.state_dict()
        self._grow_requested = threading.Event()
        self._wait_since = time.perf_counter()

    # -- control, callable from any thread -------------------------------------------------
    def request_grow(self) -> None:
        """Force a growth step at the next loop iteration (admin API)."""
        self._grow_requested.set()

    # -- the loop thread -------------------------------------------------------------------
    def run(
        self,
        stop: threading.Event,
        paused: threading.Event | None = None,
        tick: Callable[[], None] | None = None,
    ) -> None:
        """Loop until `stop` is set, idling while `paused` is; `tick` runs after every iteration."""
        self.publish_now()
        while not stop.is_set():
            if paused is not None and paused.is_set():
                stop.wait(0.2)
            else:
                self.run_once()
            if tick is not None:
                tick()
        self.finish()

    def run_once(self) -> None:
        """Poll once, route what arrived, train every full batch, grow when due."""
        want = max(1, self.batcher.batch_size - self.batcher.pending())
        messages = self.source.poll(self.cfg.poll_timeout_s, max_records=want)
        if messages:
            self._ingest(messages)
        while (batch := self.batcher.next_batch()) is not None:
            data_wait = time.perf_counter() - self._wait_since
            self._after_step(self.trainer.train_step(batch), data_wait)
            self._wait_since = time.perf_counter()
        if self.batcher.pending() == 0:
            self.settled_source_state = self.source.state_dict()
        if self._grow_requested.is_set():
            self._grow_requested.clear()
            self.grow_now("forced")

    def finish(self) -> None:
        """Train what is pending as a smaller last batch, so the consumed records are settled.

        A single leftover record cannot make a contrastive step (it has no negatives): it stays
        unsettled, so the next run reads it again instead of it being lost.
        """
        pending = self.batcher.drain()
        if len(pending) >= 2:
            self._after_step(self.trainer.train_step(collate(pending, self.tokenizer)), 0.0)
        if len(pending) != 1:
            self.settled_source_state = self.source.state_dict()
        else:
            log.info("a single last record stays unsettled for the next run", extra={"id": pending[0].id})
        self.publish_now()

    def _ingest(self, messages: Sequence[RawMessage]) -> None:
        counts: Counter[str] = Counter()
        for msg in messages:
            status, result = route(self.decoder, msg, self.cfg.holdout_fraction)
            counts[status] += 1
            if isinstance(result, RecordError):
                self.dead_letter.send(msg, result.reason, result.detail)
            elif status == "held_out":
                self.holdout.add(result)
            else:
                self.batcher.add(result)
        self.observer.on_records(dict(counts))

    def _after_step(self, stats: StepStats, data_wait_s: float) -> None:
        self.observer.on_step(stats, data_wait_s)
        step = stats.step
        if step % self.cfg.eval_every_steps == 0:
            self.evaluate()
        trigger = self.growth.due(self.trainer.samples, self.trainer.model.arch.num_params())
        if trigger is not None:
            self.grow_now(trigger)
        elif step % self.cfg.publish_every_steps == 0:
            self.publish_now()

    def evaluate(self) -> float | None:
        loss = self.trainer.eval_loss(self.holdout.batches(self.trainer.cfg.batch_size, self.tokenizer))
        if loss is not None:
            self.last_eval_loss = loss
            self.observer.on_eval(loss)
        return loss

    def grow_now(self, trigger: str) -> GrowthEvent | None:
        grown = self.growth.grow(
            self.trainer.model, trigger=trigger, step=self.trainer.step, samples=self.trainer.samples
        )
        if grown is None:
            log.info("growth due but no candidate fits the bounds", extra={"trigger": trigger})
            return None
        model, event = grown
        self.trainer.swap_model(model)
        log.info(
            "grew model",
            extra={
                "generation": event.generation,
                "ops": list(event.ops),
                "trigger": trigger,
                "params": event.params_after,
                "step": event.step,
            },
        )
        self.observer.on_growth(event)
        self.publish_now()
        return event

    def publish_now(self) -> None:
        self.publish(
            self.trainer.model,
            generation=self.growth.generation,
            step=self.trainer.step,
            samples_trained=self.trainer.samples,
            growth_history=[e.to_dict() for e in self.growth.history],
        )
