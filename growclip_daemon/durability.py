"""Making progress durable, in the one order that loses nothing and trains nothing twice.

1. the dead letter is flushed: every record the new positions skip as unusable is acknowledged
   by the broker (or written to storage) first;
2. the audit entries of the settled records are appended and fsynced (when ``audit_log`` is set);
3. the state is captured and the checkpoint written (in the background for periodic saves, by
   the checkpointer of ``growclip_stream.checkpoint``);
4. only once it is durable are the positions committed to the source (Kafka's group offsets),
   on the training thread.

When step 1 fails no checkpoint is taken (counted in
``growclip_dead_letter_write_failures_total``), and the next try comes after ``retry_s``: the
weights already hold records past the positions of the last checkpoint, so writing them with
older positions would train those records twice after a restart, and writing them with the new
positions would lose the dead letters.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import time
from concurrent.futures import Future
from typing import Any

from growclip_daemon.audit import AuditLog
from growclip_daemon.faults import point as fault_point
from growclip_daemon.metrics import Metrics
from growclip_stream.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointPolicy,
    CheckpointStore,
    SaveResult,
    TrainingState,
    capture,
)
from growclip_stream.train.loop import DeadLetter, OnlineLoop, Source

log = logging.getLogger(__name__)


class DeadLetterNotDurable(CheckpointError):
    """The dead letter could not be made durable, so no checkpoint was taken."""


class Durability:
    """Checkpoints from the training thread: periodic (written in the background), on request and
    at stop. A periodic save never raises into the training thread."""

    def __init__(
        self,
        store: CheckpointStore,
        policy: CheckpointPolicy,
        source: Source,
        dead_letter: DeadLetter,
        metrics: Metrics,
        *,
        audit: AuditLog | None = None,
        source_label: str = "kafka",
        run_id: str | None = None,
        retry_s: float = 5.0,
    ) -> None:
        self.store = store
        self.source = source
        self.dead_letter = dead_letter
        self.metrics = metrics
        self.audit = audit
        self.source_label = source_label  # "kafka" or "shards", the failures counter's label
        self.retry_s = retry_s
        # A fresh id per start: versions (growclip@<generation>.<step>.<run>) stay unique when a
        # restart repeats the steps after its checkpoint.
        self.run_id = run_id or secrets.token_hex(3)
        self.parent: str | None = None  # the checkpoint this run resumed from
        self.last_path: str | None = None
        self.manager = CheckpointManager(
            store,
            policy,
            on_durable=self._durable,
            on_failure=lambda err: metrics.checkpoint_failures.inc(),
        )
        self._dead_lettered = 0  # the loop's dead-letter count at the last flush that succeeded
        self._blocked_until = 0.0  # after a failed dead-letter flush, no save before this
        self._requests: queue.SimpleQueue[Future[str]] = queue.SimpleQueue()

    def resumed(self, path: str, step: int, loop: OnlineLoop) -> None:
        """The run continues from the checkpoint at ``path``: the cadence starts there."""
        self.parent = self.last_path = path
        self.manager.mark_saved(step, self._progress(loop))

    def request(self) -> Future[str]:
        """Ask for a checkpoint at the training thread's next tick (any thread)."""
        future: Future[str] = Future()
        self._requests.put(future)
        return future

    # -- the training thread -------------------------------------------------------------------
    def tick(self, loop: OnlineLoop) -> None:
        """Between steps: deliver finished saves (commit), start a periodic one when due, and
        answer checkpoint requests."""
        self.manager.deliver()
        if time.monotonic() >= self._blocked_until:
            try:
                self.manager.maybe_save(loop.trainer.step, lambda: self._capture(loop), self._progress(loop))
            except DeadLetterNotDurable as err:
                log.error(
                    "periodic checkpoint not taken", extra={"error": str(err), "retry_in_s": self.retry_s}
                )
        while not self._requests.empty():
            future = self._requests.get()
            try:
                future.set_result(self.save(loop, "admin"))
            except Exception as err:
                future.set_exception(err)

    def save(self, loop: OnlineLoop, reason: str) -> str:
        """Save now, in this thread (after a background save in progress); the checkpoint's path.
        Raises :class:`DeadLetterNotDurable` or :class:`CheckpointError`."""
        return self.manager.save(lambda: self._capture(loop), reason, progress=self._progress(loop)).path

    def close(self) -> None:
        self.manager.close()

    def _progress(self, loop: OnlineLoop) -> str:
        """What changes when a checkpoint would hold something new beyond the step: the positions."""
        return json.dumps(loop.settled_state(), sort_keys=True)

    def _capture(self, loop: OnlineLoop) -> TrainingState:
        """Steps 1-3 up to the write: called by the checkpointer only when a save happens."""
        if loop.dead_lettered != self._dead_lettered:  # some sent since the last flush
            fault_point("dead_letter", within_s=0.02)
        if not self.dead_letter.flush():
            self.metrics.dead_letter_failures.labels(source=self.source_label).inc()
            self._blocked_until = time.monotonic() + self.retry_s
            raise DeadLetterNotDurable("the dead letter is not durable: checkpoint and positions held back")
        self._dead_lettered = loop.dead_lettered
        run: dict[str, Any] = {"id": self.run_id, "parent": self.parent}
        if self.audit is not None:
            run["audit"] = self.audit.append(loop.take_settled_fates(), step=loop.trainer.step)
        fault_point("checkpoint", within_s=0.05)
        return capture(
            loop.trainer.model,
            loop.trainer.optimizer,
            step=loop.trainer.step,
            samples=loop.trainer.samples,
            generation=loop.growth.generation,
            growth=loop.growth.state_dict(),
            source=loop.settled_state(),
            loop=loop.state_dict(),
            run=run,
        )

    def _durable(self, result: SaveResult) -> None:
        """Step 4, on the training thread once a save is durable: commit its positions."""
        self.metrics.checkpoint_seconds.observe(result.saved.seconds + result.stall_s)
        self.metrics.checkpoint_stall.observe(result.stall_s)
        self.metrics.checkpoint_last_success.set_to_current_time()
        self.source.commit(result.state.source)
        self.last_path = result.path
        log.info(
            "checkpoint committed",
            extra={"reason": result.reason, "path": result.path, "positions": result.state.source,
                   "stall_s": round(result.stall_s, 4), "write_s": round(result.saved.seconds, 3)},
        )  # fmt: skip
