"""The daemon: builds every component from the config and runs them as one service tree.

Start order: embedded broker (optional) -> HTTP server (bound early, /healthz answers during the
slow start) -> drift monitor and evaluator (optional) -> training engine -> demo producer
(optional). Stop is the reverse: the producer stops, the engine finishes its step, the evaluator
ends between suites, the server closes, the broker child is stopped last.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import queue
import secrets
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from growclip_daemon.batching import BatchLimits
from growclip_daemon.broker import EmbeddedBroker
from growclip_daemon.config import DaemonConfig
from growclip_daemon.drift import DriftMonitor, load_probes
from growclip_daemon.evaluator import EvaluatorService
from growclip_daemon.http import AppState, ControlRejected, HttpServer, ServeLimits, build_app
from growclip_daemon.metrics import Metrics
from growclip_daemon.service import Service, ServiceTree, ThreadService
from growclip_stream.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointManager,
    CheckpointPolicy,
    CheckpointStore,
    SaveResult,
    TrainingState,
    capture,
    restore_global_rng,
    restore_optimizer,
)
from growclip_stream.data.datasets import iter_records
from growclip_stream.data.decode import DecodePipeline
from growclip_stream.data.images import ImageTransform
from growclip_stream.data.kafka_source import KafkaDeadLetter, KafkaSource, KafkaSourceConfig
from growclip_stream.data.pipeline import Decoder
from growclip_stream.data.produce import ensure_topics, produce
from growclip_stream.data.records import RecordLimits
from growclip_stream.data.shards import ShardDeadLetter, ShardSource, dead_letter_url
from growclip_stream.growth.controller import GrowthController, GrowthEvent
from growclip_stream.model import GrowCLIP
from growclip_stream.model.tokenizer import ByteTokenizer
from growclip_stream.serving import ModelSnapshot, SnapshotStore
from growclip_stream.train.loop import OnlineLoop
from growclip_stream.train.trainer import OnlineTrainer, StepStats

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Facts the services learn while starting (the broker's address) and the stop signal."""

    bootstrap: str
    stop_requested: threading.Event = field(default_factory=threading.Event)
    crash: BaseException | None = None


class MetricsObserver:
    """Turns the loop's reports into Prometheus series."""

    def __init__(self, metrics: Metrics, source_label: str) -> None:
        self.metrics = metrics
        self.source_label = source_label
        self.samples_per_s = 0.0
        self.first_loss: float | None = None
        self.loss_ema: float | None = None  # smoothed training loss, the trend a person watches

    def on_records(self, counts: dict[str, int]) -> None:
        for status, n in counts.items():
            self.metrics.ingest_records.labels(source=self.source_label, status=status).inc(n)

    def on_step(self, stats: StepStats, data_wait_s: float) -> None:
        m = self.metrics
        m.train_steps.inc()
        m.train_samples.inc(stats.fresh)
        m.train_loss.set(stats.loss)
        m.train_step_seconds.observe(stats.seconds)
        m.train_data_wait.observe(data_wait_s)
        self.samples_per_s = stats.batch_size / max(stats.seconds + data_wait_s, 1e-9)
        m.train_throughput.set(self.samples_per_s)
        if self.first_loss is None:
            self.first_loss = stats.loss
        self.loss_ema = stats.loss if self.loss_ema is None else 0.95 * self.loss_ema + 0.05 * stats.loss

    def on_growth(self, event: GrowthEvent) -> None:
        m = self.metrics
        if event.outcome == "grown":
            m.growth_events.labels(trigger=event.trigger).inc()
            m.growth_last_duration.set(event.duration_s)
        elif event.outcome == "declined":
            m.growth_declined.inc()
        else:
            m.growth_failures.labels(outcome="rolled_back").inc()
        if event.work:
            m.growth_search_seconds.set(event.work["growth_seconds"])
            m.growth_search_flops.set(event.work["growth_flops"])
            for basis, share in event.work["fractions"].items():
                m.growth_search_fraction.labels(basis=basis).set(share)

    def on_eval(self, loss: float) -> None:
        self.metrics.eval_loss.set(loss)

    def on_phase(self, phase: str) -> None:
        self.metrics.growth_phase.state(phase)


class BrokerService(Service):
    name = "broker"

    def __init__(self, runtime: Runtime, port: int, log_path: Path) -> None:
        super().__init__()
        self.runtime = runtime
        self.broker = EmbeddedBroker(port=port, log_path=log_path)

    def on_start(self) -> None:
        self.broker.start()
        self.runtime.bootstrap = self.broker.bootstrap

    def on_stop(self) -> None:
        self.broker.stop()


class ProducerService(ThreadService):
    """Streams a real dataset into the topic at a steady rate (the demo's firehose)."""

    name = "producer"

    def __init__(self, cfg: DaemonConfig, runtime: Runtime) -> None:
        super().__init__(on_crash=None)  # a failed demo producer must not take training or serving down
        self.cfg = cfg
        self.runtime = runtime

    def run(self, stop: threading.Event) -> None:
        p = self.cfg.producer
        sent = produce(
            self.runtime.bootstrap,
            self.cfg.kafka.topic,
            iter_records(p.dataset, split="train", seed=self.cfg.train.seed, repeat=True),
            fmt=p.format,
            rate=p.rate,
            limit=p.limit,
            stop=stop,
            security=self.cfg.kafka.client_security(),
        )
        log.info("producer finished", extra={"records": sent, "dataset": p.dataset})


class TrainingService(ThreadService):
    """Owns the online loop in its own thread; everything else only reads what it publishes."""

    name = "training"

    def __init__(self, cfg: DaemonConfig, runtime: Runtime, store: SnapshotStore, metrics: Metrics) -> None:
        super().__init__(on_crash=self._crashed)
        self.cfg = cfg
        self.runtime = runtime
        self.store = store
        self.metrics = metrics
        self.paused = threading.Event()
        self.loop: OnlineLoop | None = None
        self.pipeline: DecodePipeline[Any] | None = None
        self.source: KafkaSource | ShardSource | None = None
        self.dead_letter: KafkaDeadLetter | ShardDeadLetter | None = None
        self.observer = MetricsObserver(metrics, source_label=cfg.source)
        self._last_lag_update = 0.0
        self._worker_deaths = self._stalls = 0  # decode worker deaths and stalls already in the metrics
        self._lag: dict[int, int] = {}
        # A fresh id per start: versions (growclip@<generation>.<step>.<run>) stay unique when a
        # restart repeats the steps after its checkpoint.
        self.run_id = secrets.token_hex(3)
        self.parent_checkpoint: str | None = None
        self.checkpointer = CheckpointStore(cfg.checkpoint.root, keep=cfg.checkpoint.keep)
        self.checkpoints = CheckpointManager(
            self.checkpointer,
            CheckpointPolicy(every_s=cfg.checkpoint.every_s, every_steps=cfg.checkpoint.every_steps),
            on_durable=self._checkpoint_durable,
            on_failure=lambda err: metrics.checkpoint_failures.inc(),
        )
        self._checkpoint_requests: queue.SimpleQueue[Future[str]] = queue.SimpleQueue()
        self.last_checkpoint: str | None = None
        # told after every publish, in the training thread: each only hands the reference over
        self.publish_listeners: list[Callable[[ModelSnapshot], None]] = []

    def _crashed(self, err: BaseException) -> None:
        self.runtime.crash = err
        self.runtime.stop_requested.set()

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

    def on_start(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        if cfg.train.torch_threads:
            torch.set_num_threads(cfg.train.torch_threads)
        self.source, self.dead_letter = self._open_source()
        arch = cfg.model
        limits = RecordLimits(
            max_message_bytes=cfg.data.max_message_bytes,
            max_caption_chars=cfg.data.max_caption_chars,
            max_image_pixels=cfg.data.max_image_pixels,
        )
        resumed = self.checkpointer.load_latest()  # the newest usable one; None when there is none
        model = resumed.model if resumed is not None else GrowCLIP(arch)
        self.pipeline = DecodePipeline(
            Decoder(ImageTransform(arch.image_size, arch.channels), limits),
            cfg.loop.holdout_fraction,
            num_workers=cfg.data.decode_workers,
            method=cfg.data.decode_method,
            max_in_flight=4 * cfg.train.batch_size,
            stall_timeout_s=cfg.data.decode_stall_timeout_s,
        )
        self.pipeline.start()
        self.loop = OnlineLoop(
            source=self.source,
            dead_letter=self.dead_letter,
            pipeline=self.pipeline,
            tokenizer=ByteTokenizer(arch.context_length),
            trainer=OnlineTrainer(model, cfg.train),
            growth=GrowthController(cfg.growth, cfg.train, on_phase=self.observer.on_phase),
            cfg=cfg.loop,
            publish=self.publish,
            observer=self.observer,
        )
        if resumed is not None:
            self._resume(resumed)
        super().on_start()

    def _open_source(self) -> tuple[KafkaSource | ShardSource, KafkaDeadLetter | ShardDeadLetter]:
        cfg = self.cfg
        if cfg.source == "shards":
            url = cfg.shards.url
            assert url is not None  # the config validation guarantees it
            shards = cfg.shards
            source = ShardSource(
                url,
                watch=shards.watch,
                poll_interval_s=shards.poll_interval_s,
                storage_options=shards.storage_options,
            )
            dlq_url = shards.dead_letter or dead_letter_url(url)
            return source, ShardDeadLetter(dlq_url, storage_options=shards.storage_options)
        topic = cfg.kafka.topic
        security = cfg.kafka.client_security()
        ensure_topics(
            self.runtime.bootstrap,
            [topic, f"{topic}.dlq"],
            partitions=cfg.kafka.partitions,
            security=security,
        )
        kafka = KafkaSource(
            KafkaSourceConfig(
                bootstrap=self.runtime.bootstrap,
                topic=topic,
                group_id=cfg.kafka.group_id,
                session_timeout_ms=cfg.kafka.session_timeout_ms,
                heartbeat_interval_ms=cfg.kafka.heartbeat_interval_ms,
                max_poll_records=cfg.kafka.max_poll_records,
                security=security,
            )
        )
        return kafka, KafkaDeadLetter(self.runtime.bootstrap, topic, security=security)

    def _resume(self, ckpt: Checkpoint) -> None:
        """Continue where the checkpoint left off: counters, optimizer, growth history, RNG,
        reservoirs, and source positions (which the source refuses when they come from another
        cluster or topic, e.g. an earlier embedded broker's)."""
        assert self.loop is not None and self.source is not None
        trainer = self.loop.trainer
        trainer.resume(step=ckpt.step, samples=ckpt.samples)
        restore_optimizer(trainer.model, trainer.optimizer, ckpt.optimizer_state)
        self.loop.growth.load_state_dict(ckpt.manifest.get("growth", {}))
        restore_global_rng(ckpt.rng)
        self.loop.load_state_dict(ckpt.loop_state)
        self.loop.load_source_state(ckpt.source)
        self.last_checkpoint = self.parent_checkpoint = ckpt.path
        self.checkpoints.mark_saved(ckpt.step, self._progress())
        log.info(
            "resumed from checkpoint",
            extra={"path": ckpt.path, "step": ckpt.step, "generation": self.loop.growth.generation,
                   "run": self.run_id},
        )  # fmt: skip

    def run(self, stop: threading.Event) -> None:
        if self.loop is None:
            raise RuntimeError("training service started without a loop")
        self.loop.run(stop, self.paused, tick=self._tick)
        try:  # the loop has finished its step: everything consumed is settled
            self.save_checkpoint("shutdown")
        except CheckpointError:
            pass  # counted and logged; offsets stay uncommitted, so the next start re-reads them
        finally:
            self.checkpoints.close()

    def _tick(self) -> None:
        """Runs in the training thread between iterations: ingest metrics (lag, decode worker deaths
        and stalls), and checkpoints (never mid-step)."""
        self._update_ingest_metrics()
        assert self.loop is not None
        self.checkpoints.maybe_save(self.loop.trainer.step, self._capture, progress=self._progress())
        while not self._checkpoint_requests.empty():
            request = self._checkpoint_requests.get()
            try:
                request.set_result(self.save_checkpoint("admin"))
            except Exception as err:
                request.set_exception(err)

    def _progress(self) -> str:
        """What changes when a checkpoint would hold something new beyond the step: the positions."""
        assert self.loop is not None
        return json.dumps(self.loop.settled_source_state, sort_keys=True)

    def _capture(self) -> TrainingState:
        """The training thread's part of a save: everything copied to CPU, between steps."""
        assert self.loop is not None
        loop = self.loop
        return capture(
            loop.trainer.model,
            loop.trainer.optimizer,
            step=loop.trainer.step,
            samples=loop.trainer.samples,
            generation=loop.growth.generation,
            growth=loop.growth.state_dict(),
            source=loop.settled_source_state,
            loop=loop.state_dict(),
            run={"id": self.run_id, "parent": self.parent_checkpoint},
        )

    def save_checkpoint(self, reason: str) -> str:
        """Save now (after a background save in progress), in this thread; raises CheckpointError."""
        return self.checkpoints.save(self._capture, reason, progress=self._progress()).path

    def _checkpoint_durable(self, result: SaveResult) -> None:
        """On the training thread once a save is durable: only now are its positions committed."""
        assert self.dead_letter is not None and self.source is not None
        self.metrics.checkpoint_seconds.observe(result.saved.seconds + result.stall_s)
        self.metrics.checkpoint_stall.observe(result.stall_s)
        self.dead_letter.flush()  # dead-lettered records are out before their offsets are committed
        self.metrics.checkpoint_last_success.set_to_current_time()
        self.source.commit(result.state.source)
        self.last_checkpoint = result.path
        log.info(
            "checkpoint committed",
            extra={"reason": result.reason, "path": result.path, "positions": result.state.source,
                   "stall_s": round(result.stall_s, 4), "write_s": round(result.saved.seconds, 3)},
        )  # fmt: skip

    def _update_ingest_metrics(self) -> None:
        now = time.monotonic()
        if self.source is None or now - self._last_lag_update < 2.0:
            return
        self._last_lag_update = now
        if self.pipeline is not None:
            deaths, stalls = self.pipeline.worker_deaths, self.pipeline.stalls
            self.metrics.decode_worker_deaths.inc(deaths - self._worker_deaths)
            self.metrics.decode_stalls.inc(stalls - self._stalls)
            self._worker_deaths, self._stalls = deaths, stalls
        previous, self._lag = self._lag, self.source.lag()
        if self.cfg.source == "kafka":
            topic = self.cfg.kafka.topic
            for partition, lag in self._lag.items():
                self.metrics.kafka_lag.labels(topic=topic, partition=str(partition)).set(lag)
            for partition in previous.keys() - self._lag.keys():  # revoked: its series goes too
                self.metrics.kafka_lag.remove(topic, str(partition))
        else:
            self.metrics.shard_lag.labels(url=str(self.cfg.shards.url)).set(sum(self._lag.values()))

    def on_stop(self) -> None:
        super().on_stop()  # the loop finishes its step and trains what it consumed
        if self.pipeline is not None:
            self.pipeline.close()
        if self.dead_letter is not None:
            self.dead_letter.flush()
            self.dead_letter.close()
        if self.source is not None:
            self.source.close()

    # -- what the HTTP API may ask ----------------------------------------------------------
    def status(self) -> dict[str, Any]:
        loop = self.loop
        if loop is None:
            return {"training": {"state": "starting"}}
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
                "growth_search_running": loop.searching,
                "growth_guard_running": loop.guarding,
                "last_checkpoint": self.last_checkpoint,
            },
            "source": {
                "kind": self.cfg.source,
                "topic": self.cfg.kafka.topic if self.cfg.source == "kafka" else self.cfg.shards.url,
                "positions": self.source.state_dict() if self.source is not None else {},
                "lag": {str(p): v for p, v in self._lag.items()},
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
        if self.loop is None or not self.alive:
            raise ControlRejected("training is not running")
        request: Future[str] = Future()
        self._checkpoint_requests.put(request)
        try:
            return {"path": request.result(timeout=120)}
        except TimeoutError:
            raise ControlRejected("the training thread did not save within 120 s") from None

    def pause(self) -> dict[str, Any]:
        self.paused.set()
        return {"paused": True}

    def resume(self) -> dict[str, Any]:
        self.paused.clear()
        return {"paused": False}


class HttpService(Service):
    name = "http"

    def __init__(self, cfg: DaemonConfig, state: AppState) -> None:
        super().__init__()
        self.server = HttpServer(build_app(state), cfg.serve.host, cfg.serve.port)

    def on_start(self) -> None:
        self.server.start()
        log.info("serving", extra={"url": f"http://{self.server.host}:{self.server.port}"})

    def on_stop(self) -> None:
        self.server.stop()


def serve_limits(cfg: DaemonConfig) -> ServeLimits:
    """Serving's limits: its own serve.* keys, and the per-image limits ingest uses (data.*)."""
    serve = cfg.serve
    return ServeLimits(
        max_request_bytes=serve.max_request_bytes,
        max_items=serve.max_items,
        max_text_chars=serve.max_text_chars,
        records=RecordLimits(
            max_message_bytes=cfg.data.max_message_bytes,
            max_caption_chars=cfg.data.max_caption_chars,
            max_image_pixels=cfg.data.max_image_pixels,
        ),
        max_request_pixels=serve.max_request_pixels,
        batch=BatchLimits(
            batching=serve.batching,
            max_batch_items=serve.batch_max_items,
            max_wait_s=serve.batch_max_wait_ms / 1000,
            max_queue_items=serve.queue_max_items,
            timeout_s=serve.queue_timeout_s,
            threads=serve.batch_threads,
        ),
        device=cfg.train.device,
    )


class Daemon:
    """The whole process: build, start, wait for a signal or a crash, stop cleanly."""

    def __init__(self, cfg: DaemonConfig) -> None:
        self.cfg = cfg
        self.runtime = Runtime(bootstrap=cfg.kafka.bootstrap)
        self.metrics = Metrics()
        self.store = SnapshotStore(keep_versions=cfg.serve.keep_versions)
        self.training = TrainingService(cfg, self.runtime, self.store, self.metrics)
        limits = serve_limits(cfg)
        probes = load_probes(cfg.serve.drift_probe_dataset, cfg.serve.drift_probe_size)
        self.drift = (
            DriftMonitor(
                self.store, self.metrics, probes, limits.records, interval_s=cfg.serve.drift_interval_s
            )
            if probes is not None
            else None
        )
        if self.drift is not None:
            self.training.publish_listeners.append(self.drift.notify)
        self.evaluator: EvaluatorService | None = None
        if cfg.evaluation.enabled:
            self.evaluator = EvaluatorService(
                cfg.evaluation,
                self.store,
                self.metrics,
                geometry=(cfg.model.image_size, cfg.model.channels),
                limits=limits.records,
            )
            self.training.publish_listeners.append(self.evaluator.notify)
        state = AppState(
            store=self.store,
            metrics=self.metrics,
            limits=limits,
            controls=self.training,
            admin_token=os.environ.get(cfg.serve.admin_token_env) or None,
            status_extra=self.status,
            drift_status=self.drift.status if self.drift is not None else None,
        )
        self.http = HttpService(cfg, state)
        children: list[Service] = []
        if cfg.kafka.embedded:
            children.append(
                BrokerService(self.runtime, cfg.kafka.embedded_port, self.state_dir / "broker.log")
            )
        children.append(self.http)
        if self.drift is not None:
            children.append(self.drift)  # started before training publishes, stopped after it
        if self.evaluator is not None:
            children.append(self.evaluator)  # likewise
        children.append(self.training)
        if cfg.producer.enabled:
            children.append(ProducerService(cfg, self.runtime))
        self.tree = ServiceTree(children)

    def status(self) -> dict[str, Any]:
        """What GET /v1/model adds to the snapshot's own description: training, source, evaluation."""
        evaluation = (
            self.evaluator.status() if self.evaluator is not None else {"evaluation": {"state": "disabled"}}
        )
        return {**self.training.status(), **evaluation}

    @property
    def state_dir(self) -> Path:
        path = self.cfg.pidfile.parent
        path.mkdir(parents=True, exist_ok=True)
        return path

    def request_stop(self, *_: Any) -> None:
        if not self.runtime.stop_requested.is_set():
            log.info("stop requested")
        self.runtime.stop_requested.set()

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (or a crashed engine); return the exit code."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self.cfg.pidfile.parent.mkdir(parents=True, exist_ok=True)
        self.cfg.pidfile.write_text(str(os.getpid()))
        try:
            self.tree.start()
            # Everything allocated at start-up (modules, datasets, the first model) lives as long as
            # the process: keep it out of the collector's full passes, whose pauses stall serving.
            gc.freeze()
            while not self.runtime.stop_requested.wait(1.0):
                pass
        finally:
            self.tree.stop()
            self.cfg.pidfile.unlink(missing_ok=True)
        if self.runtime.crash is not None:
            log.error("stopped after a crash", extra={"error": repr(self.runtime.crash)})
            return 1
        log.info("stopped cleanly")
        return 0
