"""The checkpointer: owns cadence, the background writer, retries and failure accounting.

The training loop only calls :meth:`CheckpointManager.maybe_save` between steps. When a save is
due (``every_s`` seconds or ``every_steps`` steps since the last one, and something changed), the
training thread pays only for ``capture()`` (a copy of the state to CPU); a writer thread then
serialises, hashes, writes, fsyncs and prunes. A failed write is retried with a doubling backoff;
when every attempt fails it is counted (:attr:`failures`, ``on_failure``) and logged, and training
goes on: the next due time tries again. A periodic save never raises into the training thread.

``on_durable`` runs on the *calling* thread (the training thread), at the next ``maybe_save`` or
``save`` after the write finished: a source's offsets may only be committed from the thread that
polls it, and only once the checkpoint holding them is durable.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from growclip_stream.checkpoint.state import TrainingState
from growclip_stream.checkpoint.store import CheckpointError, CheckpointStore, Saved

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointPolicy:
    every_s: float = 300.0  # periodic save at least this often while something changes; 0 = off
    every_steps: int = 0  # and/or every this many trainer steps; 0 = off
    attempts: int = 3  # tries per save before it counts as failed
    backoff_s: float = 1.0  # first retry delay, doubling up to max_backoff_s
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        if self.every_s < 0 or self.every_steps < 0:
            raise ValueError("every_s and every_steps must be >= 0")
        if self.attempts < 1:
            raise ValueError("attempts must be >= 1")
        if self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise ValueError("need 0 <= backoff_s <= max_backoff_s")


@dataclass(frozen=True)
class SaveResult:
    """A durable save, handed to ``on_durable`` on the training thread."""

    saved: Saved
    state: TrainingState
    reason: str
    stall_s: float  # what the training thread spent capturing the state
    attempts: int
    progress: Any = None  # what the caller passed as progress

    @property
    def path(self) -> str:
        return self.saved.path


class CheckpointManager:
    def __init__(
        self,
        store: CheckpointStore,
        policy: CheckpointPolicy | None = None,
        *,
        on_durable: Callable[[SaveResult], None] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.policy = policy or CheckpointPolicy()
        self.on_durable = on_durable
        self.on_failure = on_failure
        self._clock = clock
        self._last_time = clock()
        self._last_step: int | None = None
        self._last_progress: Any = None
        self._finished: queue.SimpleQueue[SaveResult] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self.failures = 0  # saves that failed after every attempt
        self.last: SaveResult | None = None  # the newest durable save delivered

    # -- the training thread -----------------------------------------------------------------------

    def mark_saved(self, step: int, progress: Any = None) -> None:
        """Start the cadence from a known state (e.g. the checkpoint a run resumed from)."""
        self._last_time, self._last_step, self._last_progress = self._clock(), step, progress

    def due(self, step: int, progress: Any = None) -> bool:
        """A periodic save is due: cadence reached and step or progress moved since the last save."""
        p = self.policy
        if progress is not None and (step, progress) == (self._last_step, self._last_progress):
            return False
        if progress is None and step == self._last_step:
            return False
        by_time = p.every_s > 0 and self._clock() - self._last_time >= p.every_s
        by_steps = p.every_steps > 0 and step - (self._last_step or 0) >= p.every_steps
        return by_time or by_steps

    def maybe_save(self, step: int, capture: Callable[[], TrainingState], progress: Any = None) -> bool:
        """Deliver finished saves; start a background save when one is due and none is running.

        ``progress``: anything comparable that changes when a save would hold something new
        (e.g. the settled source positions); with ``step`` unchanged too, no save is made.
        Returns whether a save was started.
        """
        self.deliver()
        if self._closing.is_set() or not self._idle.is_set() or not self.due(step, progress):
            return False
        start = time.perf_counter()
        self._last_time = self._clock()  # a failed save is tried again one period later
        try:
            state = capture()
        except Exception as err:  # counted and logged like a failed write: training goes on
            self._failed(err, "periodic", None)
            return False
        stall = time.perf_counter() - start
        self._idle.clear()
        threading.Thread(
            target=self._write_in_background,
            args=(state, "periodic", stall, progress),
            name="checkpoint-writer",
            daemon=True,
        ).start()
        return True

    def save(self, capture: Callable[[], TrainingState], reason: str, progress: Any = None) -> SaveResult:
        """Save now, in the calling thread, after any background save finished; raises
        :class:`CheckpointError` when every attempt failed (counted like a periodic failure)."""
        self.wait()
        self.deliver()
        start = time.perf_counter()
        state: TrainingState | None = None
        try:
            state = capture()
            stall = time.perf_counter() - start
            saved, attempts = self._write_with_retries(state, reason)
        except Exception as err:
            self._failed(err, reason, state)
            raise CheckpointError(f"{reason} checkpoint failed: {err!r}") from err
        self._last_time = self._clock()
        result = SaveResult(saved, state, reason, stall, attempts, progress)
        self._deliver_one(result)
        return result

    def deliver(self) -> None:
        """Hand finished background saves to ``on_durable`` (on this thread), oldest first."""
        while True:
            try:
                result = self._finished.get_nowait()
            except queue.Empty:
                return
            self._deliver_one(result)

    def _deliver_one(self, result: SaveResult) -> None:
        self.last = result
        self._last_step, self._last_progress = result.state.step, result.progress
        if self.on_durable is not None:
            self.on_durable(result)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for a running background save; returns whether the writer is idle."""
        return self._idle.wait(timeout_s)

    @property
    def writing(self) -> bool:
        return not self._idle.is_set()

    def close(self, timeout_s: float | None = None) -> None:
        """Stop starting saves, cut retry waits short, wait for the writer, deliver what finished."""
        self._closing.set()
        self.wait(timeout_s)
        self.deliver()

    # -- the writer thread -------------------------------------------------------------------------

    def _write_in_background(self, state: TrainingState, reason: str, stall: float, progress: Any) -> None:
        try:
            saved, attempts = self._write_with_retries(state, reason)
        except Exception as err:
            self._failed(err, reason, state)
        else:
            self._finished.put(SaveResult(saved, state, reason, stall, attempts, progress))
        finally:
            self._idle.set()

    def _write_with_retries(self, state: TrainingState, reason: str) -> tuple[Saved, int]:
        p = self.policy
        delay = p.backoff_s
        for attempt in range(1, p.attempts + 1):
            try:
                return self.store.write(state, reason=reason), attempt
            except Exception as err:
                if attempt == p.attempts:
                    raise
                log.warning(
                    "checkpoint write failed; retrying",
                    extra={"reason": reason, "step": state.step, "attempt": attempt, "retry_in_s": delay,
                           "error": repr(err)},
                )  # fmt: skip
                self._closing.wait(delay)  # stopping: the remaining attempts go at once
                delay = min(delay * 2, p.max_backoff_s)
        raise AssertionError("unreachable")

    def _failed(self, err: BaseException, reason: str, state: TrainingState | None) -> None:
        with self._lock:
            self.failures += 1
        log.error(
            "checkpoint failed; training goes on and the next save tries again",
            extra={"reason": reason, "step": state.step if state is not None else None, "error": repr(err),
                   "failures": self.failures},
        )  # fmt: skip
        if self.on_failure is not None:
            try:
                self.on_failure(err)
            except Exception:  # a broken metrics hook must not take the writer down
                log.exception("checkpoint failure hook raised")
