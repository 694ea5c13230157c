"""The training service: one thread owns the online loop; the rest of the daemon reads what it
publishes and asks it things through thread-safe requests (status, grow, checkpoint, pause)."""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch

from growclip_daemon.audit import AuditLog
from growclip_daemon.config import DaemonConfig
from growclip_daemon.durability import Durability
from growclip_daemon.faults import point as fault_point
from growclip_daemon.http import ControlRejected
from growclip_daemon.ingest import Ingest, open_ingest
from growclip_daemon.metrics import Metrics
from growclip_daemon.observer import IngestMetrics, MetricsObserver
from growclip_daemon.service import ThreadService
from growclip_stream.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointPolicy,
    CheckpointStore,
    restore_global_rng,
    restore_optimizer,
)
from growclip_stream.growth.controller import GrowthController
from growclip_stream.model import GrowCLIP
from growclip_stream.model.tokenizer import ByteTokenizer
from growclip_stream.serving import ModelSnapshot, SnapshotStore
from growclip_stream.train.loop import OnlineLoop
from growclip_stream.train.trainer import OnlineTrainer

log = logging.getLogger(__name__)


class FinalCheckpointError(RuntimeError):
    """The training thread stopped without writing its final checkpoint."""


class TrainingService(ThreadService):
    """Owns the online loop in its own thread; everything else only reads what it publishes.

    ``bootstrap`` is read at start (the embedded broker's address is known only then). The final
    checkpoint is written by the training thread after the loop finished its step; when that
    fails the thread ends with :class:`FinalCheckpointError` and the daemon exits non-zero.
    """

    name = "training"

    def __init__(
        self,
        cfg: DaemonConfig,
        bootstrap: Any,
        store: SnapshotStore,
        metrics: Metrics,
        on_crash: Any,
        join_timeout_s: float = 120.0,
    ) -> None:
        super().__init__(on_crash=on_crash, join_timeout_s=join_timeout_s)
        self.cfg = cfg
        self._bootstrap = bootstrap  # a callable: the broker address at start time
        self.store = store
        self.metrics = metrics
        self.paused = threading.Event()
        self.loop: OnlineLoop | None = None
        self.ingest: Ingest | None = None
        self.durability: Durability | None = None
        self.ingest_metrics: IngestMetrics | None = None
        self.observer = MetricsObserver(metrics, source_label=cfg.source)
        self.checkpointer = CheckpointStore(cfg.checkpoint.root, keep=cfg.checkpoint.keep)
        # A fresh id per start: versions (growclip@<generation>.<step>.<run>) stay unique when a
        # restart repeats the steps after its checkpoint.
        self.run_id = secrets.token_hex(3)
        self.final_checkpoint: str | None = None
        # told after every publish, in the training thread: each only hands the reference over
        self.publish_listeners: list[Callable[[ModelSnapshot], None]] = []

    def publish(
        self,
        model: GrowCLIP,
        *,
        generation: int,
        step: int,
        samples_trained: int,
        growth_history: Sequence[dict],
    ) -> None:
        train = self.cfg.train
        snap = ModelSnapshot.capture(
            model,
            generation=generation,
            step=step,
            samples_trained=samples_trained,
            growth_history=growth_history,
            run=self.run_id,
            # on a GPU, serving answers from a bf16 copy when training runs in bf16
            dtype=torch.bfloat16 if train.precision == "bf16" and train.device.startswith("cuda") else None,
        )
        self.store.publish(snap)
        self.metrics.set_model(snap)
        self.metrics.serve_versions_held.set(len(self.store.held()))
        for listener in self.publish_listeners:
            listener(snap)  # a reference hand-over: drift and evaluation run on their own threads

    # -- lifecycle ---------------------------------------------------------------------------
    def on_start(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        if cfg.train.torch_threads:
            torch.set_num_threads(cfg.train.torch_threads)
        resumed = self.checkpointer.load_latest()  # the newest usable one; None when there is none
        self.ingest = ingest = open_ingest(cfg, self._bootstrap())
        try:
            model = resumed.model if resumed is not None else GrowCLIP(cfg.model)
            audit = AuditLog(cfg.audit_log) if cfg.audit_log is not None else None
            self.loop = OnlineLoop(
                source=ingest.source,
                dead_letter=ingest.dead_letter,
                pipeline=ingest.pipeline,
                tokenizer=ByteTokenizer(cfg.model.context_length),
                trainer=OnlineTrainer(model, cfg.train),
                growth=GrowthController(cfg.growth, cfg.train, on_phase=self.observer.on_phase),
                cfg=cfg.loop,
                publish=self.publish,
                observer=self.observer,
                audit=audit is not None,
            )
            self.durability = Durability(
                self.checkpointer,
                CheckpointPolicy(every_s=cfg.checkpoint.every_s, every_steps=cfg.checkpoint.every_steps),
                ingest.source,
                ingest.dead_letter,
                self.metrics,
                audit=audit,
                source_label=ingest.kind,
                run_id=self.run_id,
            )
            self.ingest_metrics = IngestMetrics(
                self.metrics, ingest.source, ingest.pipeline, ingest.lag_topic
            )
            if audit is not None:
                audit.resume(None if resumed is None else resumed.manifest.get("run", {}).get("audit"))
            if resumed is not None:
                self._resume(resumed)
        except BaseException:
            ingest.close()
            self.ingest = None
            raise
        super().on_start()

    def _resume(self, ckpt: Checkpoint) -> None:
        """Continue where the checkpoint left off: counters, optimizer, growth history, RNG,
        reservoirs, and source positions (which the source refuses when they come from another
        cluster or topic, e.g. an earlier embedded broker's)."""
        assert self.loop is not None and self.durability is not None
        trainer = self.loop.trainer
        trainer.resume(step=ckpt.step, samples=ckpt.samples)
        restore_optimizer(trainer.model, trainer.optimizer, ckpt.optimizer_state)
        self.loop.growth.load_state_dict(ckpt.manifest.get("growth", {}))
        restore_global_rng(ckpt.rng)
        self.loop.load_state_dict(ckpt.loop_state)
        self.loop.load_source_state(ckpt.source)
        self.durability.resumed(ckpt.path, ckpt.step, self.loop)
        log.info(
            "resumed from checkpoint",
            extra={"path": ckpt.path, "step": ckpt.step, "generation": self.loop.growth.generation,
                   "run": self.run_id},
        )  # fmt: skip

    def run(self, stop: threading.Event) -> None:
        if self.loop is None or self.durability is None:
            raise RuntimeError("training service started without a loop")
        try:
            self.loop.run(stop, self.paused, tick=self._tick)
            # the loop has finished its step: everything consumed is settled
            try:
                self.final_checkpoint = self.durability.save(self.loop, "shutdown")
            except CheckpointError as err:
                raise FinalCheckpointError(f"the final checkpoint was not written: {err}") from err
        finally:
            self.durability.close()

    def _tick(self) -> None:
        """Runs in the training thread between iterations (and between growth search steps)."""
        assert self.loop is not None and self.durability is not None and self.ingest_metrics is not None
        if self.observer.phase in ("training_supernet", "selecting"):
            fault_point("search")
        self.ingest_metrics.update()
        self.durability.tick(self.loop)

    def on_stop(self) -> None:
        super().on_stop()  # the loop finishes its step, trains what it consumed, checkpoints
        if self.alive:
            # Closing the pipeline and the source under a running thread would corrupt what it
            # writes; the process exits without them (the broker connections just drop).
            log.error("the training thread is still running; leaving its source and pipeline open")
            return
        if self.ingest is not None:
            self.ingest.close()
            self.ingest = None

    # -- what the HTTP API may ask ----------------------------------------------------------
    def status(self) -> dict[str, Any]:
        loop, ingest = self.loop, self.ingest
        if loop is None or ingest is None:
            return {"training": {"state": "starting"}}
        lag = self.ingest_metrics.lag if self.ingest_metrics is not None else {}
        return {
            "training": {
                "state": "paused" if self.paused.is_set() else ("running" if self.alive else "stopped"),
                "step": loop.trainer.step,
                "samples_trained": loop.trainer.samples,
                "samples_per_second": round(self.observer.samples_per_s, 1),
                "loss_first": self.observer.first_loss,
                "loss_ema": self.observer.loss_ema,
                "held_out_records": len(loop.holdout),
                "holdout_loss": loop.last_eval_loss,
                "replay_samples": len(loop.replay),
                "recent_samples": len(loop.recent),  # what the next growth search trains its supernet on
                "growth_search_running": loop.searching,
                "growth_guard_running": loop.guarding,
                # why a due growth search waits for its budget (null when none waits)
                "growth_waiting_for_budget": loop.budget_wait or None,
                "last_checkpoint": self.durability.last_path if self.durability else None,
            },
            "source": {
                "kind": ingest.kind,
                "topic": ingest.name,
                "positions": ingest.source.state_dict(),
                "lag": {str(p): v for p, v in lag.items()},
            },
        }

    def request_grow(self) -> dict[str, Any]:
        if self.loop is None:
            raise ControlRejected("training has not started")
        if self.loop.searching or self.loop.guarding:
            raise ControlRejected("a growth is already running (its search, or its guard window)")
        self.loop.request_grow()
        return {"accepted": True, "detail": "growth runs at the next training step"}

    def request_checkpoint(self) -> dict[str, Any]:
        """Ask the training thread to save at its next iteration, and wait for the result."""
        if self.durability is None or not self.alive:
            raise ControlRejected("training is not running")
        request = self.durability.request()
        try:
            return {"path": request.result(timeout=120)}
        except FutureTimeout:
            raise ControlRejected("the training thread did not save within 120 s") from None
        except Exception as err:
            raise ControlRejected(f"checkpoint not written: {err}") from None

    def pause(self) -> dict[str, Any]:
        self.paused.set()
        return {"paused": True}

    def resume(self) -> dict[str, Any]:
        self.paused.clear()
        return {"paused": False}
