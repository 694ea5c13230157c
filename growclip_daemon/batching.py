"""Dynamic batching: concurrent embedding requests share one forward pass per modality.

One :class:`Batcher` per modality owns a worker thread. A request's items go into a bounded queue
as one job; the worker takes the oldest job and every job queued behind it on the same snapshot
(up to ``max_batch_items``), runs them as one forward pass and hands each request its rows. While a
forward pass runs, new jobs queue up, so under load batches fill without any timer, and a lone
request runs at once. ``max_wait_s`` > 0 makes the first job wait that long (from its arrival)
for company: bigger batches where a forward pass has a large fixed cost, at the price of that
wait for every request at low load. Off by default: on 2 CPU cores a 5 ms wait cut one client's
throughput 2.5x (idle daemon), and at 8 and 32 clients it was within 20% of no wait, ahead in some cells and
behind in others.

Admission is decided before any work is done for a request:

- the queue holds at most ``max_queue_items`` items; past that a request is refused with
  :class:`Overloaded` (HTTP 429, ``Retry-After`` = the estimated time to drain the queue);
- a request whose estimated wait (queued items / measured items per second) exceeds
  ``timeout_s`` is refused at once (HTTP 503); one that still waits past its deadline in the queue
  is dropped when the worker reaches it (HTTP 503), never run late.

Work for a request is split in two: ``prepare`` (tokenize, or decode the images) runs per job on
the worker thread, so that one bad image fails its own request only; ``forward`` runs once on
the concatenation. Nothing here runs on the HTTP event loop: the route awaits the job's future.

``batching=False`` runs every job alone, the per-request forward the benchmark compares against.

Each batcher thread runs the model on ``threads`` intra-op threads (1 by default): on a small
machine the trainer keeps its own pool, and small serving batches gain little from more.

Device seam: with ``device`` a CUDA device, the worker moves each batch there and runs it on its
own CUDA stream (created in the worker thread), so serving overlaps the trainer's stream.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from threadpoolctl import threadpool_limits

from growclip_daemon.metrics import Metrics
from growclip_stream.serving import ModelSnapshot

log = logging.getLogger(__name__)

Item = TypeVar("Item")


class Overloaded(Exception):
    """A request refused or dropped because serving is over capacity. ``status`` is 429 (queue
    full) or 503 (the wait would pass, or passed, the request's deadline)."""

    def __init__(self, status: int, message: str, reason: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retry_after_s = retry_after_s

    @property
    def retry_after(self) -> str:
        """The ``Retry-After`` header value: whole seconds, at least 1."""
        return str(max(1, math.ceil(self.retry_after_s)))


@dataclass(frozen=True)
class BatchLimits:
    batching: bool = True  # False: every request runs its own forward pass
    max_batch_items: int = 64  # items per forward pass (a larger request runs alone)
    max_wait_s: float = 0.0  # longest a first job waits for company (0: run what is queued)
    max_queue_items: int = 1024  # items queued at once; past that, 429
    timeout_s: float = 10.0  # a request's deadline in the queue; past it, 503
    threads: int = 1  # intra-op (OpenMP) threads of each batcher thread; the trainer's pool is untouched


@dataclass
class _Job(Generic[Item]):
    snap: ModelSnapshot
    items: Sequence[Item]
    future: Future[torch.Tensor]
    enqueued: float
    deadline: float


@dataclass
class _Throughput:
    """Items per second of the forward passes, smoothed; None until measured."""

    items_per_s: float | None = None
    alpha: float = 0.2

    def add(self, items: int, seconds: float) -> None:
        rate = items / max(seconds, 1e-6)
        self.items_per_s = (
            rate if self.items_per_s is None else (1 - self.alpha) * self.items_per_s + self.alpha * rate
        )


@dataclass
class Batcher(Generic[Item]):
    """Batches one modality's requests onto a worker thread (see the module docstring)."""

    modality: str  # "text" or "image": the metrics label and the thread name
    prepare: Callable[[ModelSnapshot, Sequence[Item]], torch.Tensor]  # one job's items -> model input
    forward: Callable[[ModelSnapshot, torch.Tensor], torch.Tensor]  # model input -> (N, D) embeddings
    limits: BatchLimits
    metrics: Metrics
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _queue: deque[_Job[Item]] = field(init=False, default_factory=deque)
    _queued_items: int = field(init=False, default=0)
    _cond: threading.Condition = field(init=False, default_factory=threading.Condition)
    _closing: bool = field(init=False, default=False)
    _thread: threading.Thread | None = field(init=False, default=None)
    _throughput: _Throughput = field(init=False, default_factory=_Throughput)

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._closing = False
            self._thread = threading.Thread(target=self._run, name=f"batcher-{self.modality}", daemon=True)
            self._thread.start()
        self.metrics.serve_queue_items.labels(modality=self.modality).set(0)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop taking jobs; the worker finishes what is queued, then exits."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        with self._cond:
            self._thread = None
            while self._queue:  # only if the worker did not finish in time
                job = self._queue.popleft()
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(Overloaded(503, "serving is stopping", "stopping", 1.0))

    @property
    def queued_items(self) -> int:
        return self._queued_items

    def estimated_wait_s(self, extra_items: int = 0) -> float:
        rate = self._throughput.items_per_s
        if rate is None:
            return 0.0
        return (self._queued_items + extra_items) / rate

    def submit(self, snap: ModelSnapshot, items: Sequence[Item]) -> Future[torch.Tensor]:
        """Queue ``items`` (one request) for ``snap``; the future gets their (N, D) embeddings, or
        raises what ``prepare`` raised for them, or :class:`Overloaded`. Raises :class:`Overloaded`
        at once when the request is not admitted."""
        n = len(items)
        limits = self.limits
        with self._cond:
            if self._closing or self._thread is None:
                raise self._refuse(Overloaded(503, "serving is not running", "stopping", 1.0))
            if self._queued_items and self._queued_items + n > limits.max_queue_items:
                raise self._refuse(
                    Overloaded(
                        429,
                        f"{self.modality} queue is full ({self._queued_items} items queued, limit "
                        f"{limits.max_queue_items}); retry later",
                        "queue_full",
                        self.estimated_wait_s(),
                    )
                )
            wait = self.estimated_wait_s(n)
            if self._queued_items and wait > limits.timeout_s:
                raise self._refuse(
                    Overloaded(
                        503,
                        f"{self.modality} requests would wait about {wait:.1f} s, over the "
                        f"{limits.timeout_s:g} s deadline; retry later",
                        "deadline",
                        wait,
                    )
                )
            now = time.monotonic()
            future: Future[torch.Tensor] = Future()
            self._queue.append(_Job(snap, items, future, now, now + limits.timeout_s))
            self._queued_items += n
            self._cond.notify_all()
        self.metrics.serve_queue_items.labels(modality=self.modality).set(self._queued_items)
        return future

    def _refuse(self, err: Overloaded) -> Overloaded:
        self.metrics.serve_rejected.labels(modality=self.modality, reason=err.reason).inc()
        return err

    # -- worker ---------------------------------------------------------------------------------

    def _take(self) -> list[_Job[Item]] | None:
        """The next jobs to run together; None when closing with nothing queued."""
        limits = self.limits
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            if limits.batching:
                until = self._queue[0].enqueued + limits.max_wait_s
                while self._queued_items < limits.max_batch_items and not self._closing:
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            taken = [self._queue.popleft()]
            size = len(taken[0].items)
            while (
                limits.batching
                and self._queue
                and self._queue[0].snap is taken[0].snap
                and size + len(self._queue[0].items) <= limits.max_batch_items
            ):
                job = self._queue.popleft()
                size += len(job.items)
                taken.append(job)
            self._queued_items -= size
        self.metrics.serve_queue_items.labels(modality=self.modality).set(self._queued_items)
        return taken

    def _run(self) -> None:
        # torch sizes a thread's OpenMP pool at its first parallel op from the process-wide setting;
        # OpenMP keeps the size per thread, so this limits the batcher, not the trainer.
        torch.get_num_threads()
        with threadpool_limits(limits=self.limits.threads, user_api="openmp"):
            self._serve()

    def _serve(self) -> None:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        torch.set_grad_enabled(False)
        while True:
            jobs = self._take()
            if jobs is None:
                return
            try:
                self._run_batch(jobs, stream)
            except BaseException as err:  # never leave a request hanging; keep serving
                log.exception("batch failed", extra={"modality": self.modality, "jobs": len(jobs)})
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(err)

    def _run_batch(self, jobs: list[_Job[Item]], stream: Any) -> None:
        start = time.perf_counter()  # the throughput estimate covers preparing and the forward pass
        now = time.monotonic()
        wait_hist = self.metrics.serve_queue_wait.labels(modality=self.modality)
        ready: list[tuple[_Job[Item], torch.Tensor]] = []
        for job in jobs:
            if not job.future.set_running_or_notify_cancel():
                continue  # its request went away (the client disconnected): nothing to answer
            wait_hist.observe(now - job.enqueued)
            if now > job.deadline:
                self.metrics.serve_rejected.labels(modality=self.modality, reason="deadline").inc()
                job.future.set_exception(
                    Overloaded(
                        503,
                        f"waited {now - job.enqueued:.1f} s in the {self.modality} queue, past the "
                        f"{self.limits.timeout_s:g} s deadline; retry later",
                        "deadline",
                        self.estimated_wait_s(),
                    )
                )
                continue
            try:
                ready.append((job, self.prepare(job.snap, job.items)))
            except Exception as err:  # a bad item fails its own request only
                job.future.set_exception(err)
        if not ready:
            return
        snap = ready[0][0].snap
        batch = torch.cat([x for _, x in ready]) if len(ready) > 1 else ready[0][1]
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            out = self.forward(snap, batch.to(self.device, non_blocking=True)).cpu()
        self._throughput.add(len(batch), time.perf_counter() - start)
        self.metrics.serve_batch_size.labels(modality=self.modality).observe(len(batch))
        at = 0
        for job, x in ready:
            job.future.set_result(out[at : at + len(x)])
            at += len(x)
