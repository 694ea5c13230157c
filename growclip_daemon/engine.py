"""The daemon: builds the service tree from the config, runs it, watches it, and says how it ended.

Start order: embedded broker (optional) -> HTTP server (bound early, /healthz answers during the
slow start) -> drift monitor and evaluator (optional) -> training -> demo producer (optional).
Stop is the reverse: the producer stops, the training thread finishes its step and writes the
final checkpoint, the evaluator ends between suites, the server closes, the broker child is
stopped last.

Exit codes (:class:`ExitCode`): 0 after a clean stop with the final checkpoint written; 1 when a
service died or crashed (a supervisor restarts the daemon, which resumes from its newest
checkpoint); 3 when the final checkpoint could not be written; 4 when another daemon holds the
checkpoint root. The log line before the exit names the reason.
"""

from __future__ import annotations

import enum
import gc
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from growclip_daemon.batching import BatchLimits
from growclip_daemon.broker import EmbeddedBroker
from growclip_daemon.config import DaemonConfig
from growclip_daemon.drift import DriftMonitor, load_probes
from growclip_daemon.evaluator import EvaluatorService
from growclip_daemon.http import AppState, HttpServer, ServeLimits, build_app, control_only
from growclip_daemon.lock import AlreadyRunning, RootLock, lock_path
from growclip_daemon.metrics import Metrics
from growclip_daemon.service import Service, ServiceTree, ThreadService
from growclip_daemon.training import FinalCheckpointError, TrainingService
from growclip_stream.data.datasets import iter_records
from growclip_stream.data.produce import produce
from growclip_stream.data.records import RecordLimits
from growclip_stream.serving import SnapshotStore

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 1.0  # how often the watchdog checks the services


class ExitCode(enum.IntEnum):
    OK = 0
    SERVICE_FAILED = 1  # a service crashed or died; the last checkpoint is where a restart resumes
    CONFIG = 2  # the config is invalid (the CLI's)
    NO_FINAL_CHECKPOINT = 3  # stopped, but the final checkpoint could not be written
    ALREADY_RUNNING = 4  # another daemon holds the checkpoint root


@dataclass
class Runtime:
    """Facts the services learn while starting (the broker's address) and the stop signal."""

    bootstrap: str
    stop_requested: threading.Event = field(default_factory=threading.Event)
    crash: BaseException | None = None
    failure: str | None = None  # a service the watchdog found dead


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

    def failure(self) -> str | None:
        code = self.broker.returncode
        return None if code is None else f"broker process exited with status {code}"


class ProducerService(ThreadService):
    """Streams a real dataset into the topic at a steady rate (the demo's firehose)."""

    name = "producer"

    def __init__(self, cfg: DaemonConfig, runtime: Runtime) -> None:
        # it ends when its limit is reached, and a failed demo producer must not take training or
        # serving down: no crash handler, so the watchdog leaves it alone
        super().__init__(on_crash=None)
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


class HttpService(Service):
    name = "http"

    def __init__(self, cfg: DaemonConfig, state: AppState) -> None:
        super().__init__()
        app = build_app(state)
        self.server = HttpServer(app, cfg.serve.host, cfg.serve.port)
        self.control: HttpServer | None = None
        if cfg.serve.control_port is not None:  # the main server's lifespan runs the batchers
            self.control = HttpServer(
                control_only(app), cfg.serve.host, cfg.serve.control_port, lifespan=False, name="http-control"
            )

    def on_start(self) -> None:
        self.server.start()
        if self.control is not None:
            self.control.start()
        log.info(
            "serving",
            extra={
                "url": f"http://{self.server.host}:{self.server.port}",
                "control_url": f"http://{self.control.host}:{self.control.port}" if self.control else None,
            },
        )

    def on_stop(self) -> None:
        if self.control is not None:
            self.control.stop()
        self.server.stop()

    def failure(self) -> str | None:
        if not self.server.alive:
            return "server thread exited"
        if self.control is not None and not self.control.alive:
            return "control server thread exited"
        return None


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
    """The whole process: lock, build, start, watch, stop cleanly, exit with a code that says how."""

    def __init__(self, cfg: DaemonConfig) -> None:
        self.cfg = cfg
        self.runtime = Runtime(bootstrap=cfg.kafka.bootstrap)
        self.metrics = Metrics()
        self.store = SnapshotStore(keep_versions=cfg.serve.keep_versions)
        self.training = TrainingService(
            cfg, lambda: self.runtime.bootstrap, self.store, self.metrics, on_crash=self._crashed
        )
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
        self.lock = RootLock(lock_path(cfg.checkpoint.root, self.state_dir), cfg.checkpoint.root)

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

    def _crashed(self, err: BaseException) -> None:
        self.runtime.crash = err
        self.runtime.stop_requested.set()

    def request_stop(self, *_: Any) -> None:
        if not self.runtime.stop_requested.is_set():
            log.info("stop requested")
        self.runtime.stop_requested.set()

    def run(self) -> int:
        """Run until SIGTERM/SIGINT, a crashed service or one the watchdog finds dead; the exit code."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        try:
            self.lock.acquire()
        except AlreadyRunning as err:
            log.error("refusing to start", extra={"reason": str(err)})
            return ExitCode.ALREADY_RUNNING
        try:
            self.cfg.pidfile.write_text(str(os.getpid()))
            if self.cfg.serve.gil_switch_interval_ms is not None:
                sys.setswitchinterval(self.cfg.serve.gil_switch_interval_ms / 1000)
            try:
                self.tree.start()
                # Everything allocated at start-up (modules, datasets, the first model) lives as long
                # as the process: keep it out of the collector's full passes, whose pauses stall serving.
                gc.freeze()
                self._watch()
            finally:
                self.tree.stop()
                self.cfg.pidfile.unlink(missing_ok=True)
        finally:
            self.lock.release()
        return self._outcome()

    def _watch(self) -> None:
        """The watchdog: a service that died without a word stops the daemon (exit 1)."""
        while not self.runtime.stop_requested.wait(WATCH_INTERVAL_S):
            why = self.tree.failure()
            if why is not None:
                self.runtime.failure = why
                log.error("a service died; stopping", extra={"reason": why})
                self.runtime.stop_requested.set()

    def _outcome(self) -> int:
        crash = self.runtime.crash or self.training.error
        if isinstance(crash, FinalCheckpointError) and self.runtime.failure is None:
            log.error("stopped without the final checkpoint", extra={"reason": str(crash)})
            return ExitCode.NO_FINAL_CHECKPOINT
        if crash is not None or self.runtime.failure is not None:
            reason = self.runtime.failure or repr(crash)
            log.error("stopped after a failure", extra={"reason": reason})
            return ExitCode.SERVICE_FAILED
        if self.training.final_checkpoint is None:
            log.error(
                "stopped without the final checkpoint",
                extra={"reason": "the training thread did not finish in time" if self.training.alive
                       else "no final checkpoint was written"},
            )  # fmt: skip
            return ExitCode.NO_FINAL_CHECKPOINT
        log.info("stopped cleanly", extra={"checkpoint": self.training.final_checkpoint})
        return ExitCode.OK
