"""The evaluator: the evaluation suites run on the published model, in a thread of their own.

It reads only the immutable published snapshot (never the model being trained), so it needs no
lock against the trainer and never pauses it. It wakes when the training service announces a
publish (:meth:`EvaluatorService.notify`, a non-blocking flag) or on stop, and evaluates the newest
snapshot when one is due: the first one, one of a new generation (after every growth), or one at
least ``evaluation.every_steps`` trainer steps after the last evaluated. Publishes in between are
skipped, never queued.

The suites' images are read and decoded once, at start, for the configured input geometry (and
again only for a model of another geometry). The thread limits its own OpenMP pool to
``evaluation.torch_threads`` (1 by default) so that on a small machine it takes one core from
training at most; the limit is per thread, the rest of the process keeps its own.

The latest result of every suite, with the model version it was computed on, goes to the metrics
(``growclip_eval_zeroshot_top1_ratio``, ``growclip_eval_retrieval_recall_ratio``), to
``GET /v1/model`` under ``evaluation`` (so ``growclip-daemon status`` shows it) and to the log.
The first evaluation of every generation, the one right after its growth, is also kept
(``evaluation.by_generation``) and shown with that growth in ``growth_history``.
A suite whose data cannot be read, or whose evaluation fails, is logged and shown under
``evaluation.errors``; the others and the daemon carry on.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch
from threadpoolctl import threadpool_limits

from growclip_daemon.config import EvaluationSettings
from growclip_daemon.metrics import Metrics
from growclip_daemon.service import ThreadService
from growclip_stream.data.records import RecordLimits
from growclip_stream.evaluation import EvalSet, SuiteItems, decode_suite, evaluate, read_suite
from growclip_stream.serving import ModelSnapshot, SnapshotStore

log = logging.getLogger(__name__)

POLL_S = 5.0
"""The evaluator also looks at the store this often, in case a publish was not announced."""

MAX_GENERATIONS = 100
"""Generations whose first evaluation (right after their growth) is kept for the growth history."""


class EvaluatorService(ThreadService):
    name = "evaluator"

    def __init__(
        self,
        settings: EvaluationSettings,
        store: SnapshotStore,
        metrics: Metrics,
        *,
        geometry: tuple[int, int] | None = None,
        limits: RecordLimits | None = None,
    ) -> None:
        """``geometry``: (image_size, channels) to decode the suites for at start (the configured
        model's); a snapshot of another geometry gets its own decoded copy when first evaluated."""
        super().__init__(on_crash=None)  # a broken evaluator must not take training or serving down
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.geometry = geometry
        self.limits = limits or RecordLimits()
        self.suites = {name: s for name, s in settings.suites.items() if s.enabled}
        self._wake = threading.Event()
        self._lock = threading.Lock()  # guards the fields status() reads
        self._state = "starting"
        self._items: dict[str, SuiteItems] = {}
        self._decoded: dict[tuple[str, int, int], EvalSet] = {}
        self._results: dict[str, dict[str, Any]] = {}
        self._errors: dict[str, str] = {}
        self._by_generation: dict[int, dict[str, dict[str, Any]]] = {}  # first results of each generation
        self._last: tuple[int, int] | None = None  # (generation, step) of the last evaluated snapshot
        self.rounds = 0  # completed evaluations of a snapshot (all suites)
        self.threads: int | None = None  # torch's intra-op threads in the evaluator's thread

    def notify(self, snap: ModelSnapshot | None = None) -> None:
        """A new snapshot was published: wake the evaluator, which takes the store's newest when it
        gets to it (``snap`` is not kept). Never blocks the caller."""
        self._wake.set()

    def on_stop(self) -> None:
        self._wake.set()
        super().on_stop()

    def run(self, stop: threading.Event) -> None:
        # torch sizes a thread's OpenMP pool at its first parallel op, from the process-wide
        # setting: let that happen first, then limit this thread's pool (OpenMP keeps it per thread)
        torch.get_num_threads()
        with threadpool_limits(limits=self.settings.torch_threads, user_api="openmp"):
            self.threads = torch.get_num_threads()
            self._load(stop)
            self._wake.set()  # a snapshot may already be there
            while not stop.is_set():
                self._wake.wait(POLL_S)
                self._wake.clear()
                snap = self.store.current
                if snap is not None and not stop.is_set() and self._due(snap):
                    self._evaluate(snap, stop)

    def _load(self, stop: threading.Event) -> None:
        self._set_state("loading")
        for name, cfg in self.suites.items():
            if stop.is_set():
                return
            start = time.monotonic()
            try:
                items = read_suite(cfg)
                if self.geometry is not None:
                    self._decoded[(name, *self.geometry)] = decode_suite(items, *self.geometry, self.limits)
            except Exception as err:  # missing dataset, unreadable folder or shard, no usable image
                self._fail(name, "load", err)
                continue
            self._items[name] = items
            log.info(
                "evaluation suite loaded",
                extra={
                    "suite": name,
                    "source": cfg.source,
                    "images": len(items.images),
                    "seconds": round(time.monotonic() - start, 3),
                },
            )
        self._set_state("idle")

    def _due(self, snap: ModelSnapshot) -> bool:
        if self._last is None:
            return True
        generation, step = self._last
        return snap.generation != generation or snap.step - step >= self.settings.every_steps

    def _evaluate(self, snap: ModelSnapshot, stop: threading.Event) -> None:
        self._last = (snap.generation, snap.step)
        self._set_state("evaluating")
        geometry = (snap.arch.image_size, snap.arch.channels)
        for name, items in self._items.items():
            if stop.is_set():
                return
            try:
                key = (name, *geometry)
                if key not in self._decoded:
                    self._decoded[key] = decode_suite(items, *geometry, self.limits)
                result = evaluate(snap.model, self.suites[name], self._decoded[key], self.settings.batch_size)
            except Exception as err:
                self._fail(name, "evaluate", err)
                continue
            entry = {
                "model_version": snap.version,
                "generation": snap.generation,
                "step": snap.step,
                "evaluated_at": time.time(),
                **result.to_dict(),
            }
            with self._lock:
                self._results[name] = entry
                self._errors.pop(name, None)
            self.metrics.set_evaluation(name, result)
            log.info("evaluation", extra={"suite": name, **entry})
        with self._lock:
            self.rounds += 1
            self._state = "idle"
            first = {n: e for n, e in self._results.items() if e["model_version"] == snap.version}
            if first and snap.generation not in self._by_generation:
                self._by_generation[snap.generation] = first  # right after its growth
                while len(self._by_generation) > MAX_GENERATIONS:
                    del self._by_generation[min(self._by_generation)]

    def _fail(self, name: str, stage: str, err: Exception) -> None:
        message = f"{stage}: {type(err).__name__}: {err}"
        with self._lock:
            self._errors[name] = message
        log.error("evaluation suite failed", extra={"suite": name, "stage": stage, "error": message})

    def _set_state(self, state: str) -> None:
        with self._lock:
            self._state = state

    def latest(self) -> dict[str, dict[str, Any]]:
        """The latest result of every suite evaluated so far (suite -> result and model version)."""
        with self._lock:
            return {name: dict(entry) for name, entry in self._results.items()}

    def status(self) -> dict[str, Any]:
        """What ``GET /v1/model`` shows under ``evaluation``."""
        with self._lock:
            return {
                "evaluation": {
                    "state": self._state if self.alive or self._state == "starting" else "stopped",
                    "every_steps": self.settings.every_steps,
                    "rounds": self.rounds,
                    "suites": {name: dict(entry) for name, entry in self._results.items()},
                    "errors": dict(self._errors),
                    "by_generation": {str(g): dict(r) for g, r in self._by_generation.items()},
                }
            }
