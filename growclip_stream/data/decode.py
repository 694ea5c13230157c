"""Parallel decode and validation of stream messages, on ``torchdata.nodes``.

:class:`DecodePipeline` takes messages and hands back :class:`Routed` items (the message, where it
goes, and its sample or :class:`RecordError`) exactly as the sequential
``pipeline.route(decoder, msg, holdout_fraction)`` would, in arrival order, with the decode spread
over worker threads or processes:

    submit ─► feed ─► IterableWrapper ─► ParallelMapper(route, num_workers, method)
           ─► [PinMemory] ─► Prefetcher ─► collector thread ─► take()

- **Determinism**: with ``in_order=True`` (the default) the output is the same, item for item and
  in the same order, whatever ``num_workers`` and ``method``: ``route`` is a pure function of the
  message and the held-out split is ``is_held_out(id)``, a stable hash. With ``in_order=False``
  items come out as they finish; only the set is the same.
- **Bounded memory, backpressure to the consumer**: at most ``max_in_flight`` messages are inside
  the pipeline (submitted and not taken). :meth:`DecodePipeline.room` says how many more fit; the
  online loop polls the source for at most that many and not at all while it is 0 (the consumer's
  own fetch buffer is bounded), so a slow trainer slows the consumer instead of growing a queue.
- **Threads or processes**: decoding is OpenCV (or Pillow) work, which releases the GIL, plus
  envelope parsing and Python glue, which do not. ``method="process"`` runs the decode in worker
  processes (``multiprocessing_context``, default ``forkserver``: never fork a process that runs
  Kafka client threads); messages go to the workers as bytes and images come back as ``uint8``
  numpy arrays (pickled inline, no shared-memory file per tensor). The decoder must then be picklable
  (``pipeline.Decoder`` is), and the main module import-safe (``if __name__ == "__main__"``).
  Each worker imports torch: ~1 s to start, ~280 MiB resident. Worker processes point their file
  descriptor 2 at /dev/null (``images.silence_native_warnings``): libpng and libjpeg would write
  a line there for every damaged image, outside the structured log. :data:`DEFAULT_METHOD` is
  ``"process"``: on our 2-core machines the full ingest path ran at 0.31 of raw consumption with
  two processes against 0.22 with two threads for ~2 KB images (the GIL-bound share is larger);
  for ~20 KB images threads edge ahead, 0.52 against 0.48, since no message is copied to another
  process (``bench/ingest.py``, ``bench/README.md``).
- **pin_memory**: images come out one by one in page-locked memory (torchdata's ``PinMemory``
  node). The daemon leaves it off: stacking pinned samples makes an unpinned batch, so
  ``pipeline.collate(..., pin_memory=True)`` pins the stacked batch instead, the one tensor that is
  copied to the GPU. It needs a CUDA build of torch and a GPU; it is not exercised by the CPU tests.
- **A worker process that dies** (a decoder library crashing on hostile bytes, the OOM killer)
  would otherwise stall the pipeline for good: torchdata waits for its results forever.
  :meth:`~DecodePipeline.take` checks the workers every ``_WATCH_INTERVAL_S``; when one is gone,
  the pipeline is rebuilt, and the records that were inside it are decoded again one at a time in
  a separate process. A record whose decoding kills that process too comes out as ``bad_image``
  (:data:`CRASH_DETAIL`), to be dead-lettered; the order of the output is kept. A worker that
  has been decoding one record for ``stall_timeout_s`` (each worker notes in shared memory when it
  starts a record, so its start-up never counts) gets the workers killed and handled the same
  way; a record that alone takes longer in an isolated process that has answered a first call,
  twice (the second time with twice the time), is dead-lettered (:data:`STALL_DETAIL`). A slow,
  loaded machine delays records; it does not get good ones dead-lettered.
- **Shutdown**: :meth:`DecodePipeline.close` (or leaving the ``with`` block) drops what was not
  decoded yet, stops and joins every thread and worker process. An exception other than
  ``RecordError`` raised while decoding (a bug, not a bad record) is re-raised by ``take``.

Two ways to use it:

- streaming, for the online loop: :meth:`~DecodePipeline.submit` what ``poll`` returned (at most
  :meth:`~DecodePipeline.room`), then :meth:`~DecodePipeline.take` what is ready (non-blocking
  with ``timeout_s=0``); the decode overlaps the training step;
- :meth:`~DecodePipeline.map` over an iterable: a generator of routed items, pulling from the
  iterable in the caller's thread (so an iterable that polls a Kafka consumer stays on one thread).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.queues
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import islice
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import torch
import torchdata.nodes as tn

from growclip_stream.data.images import silence_native_warnings
from growclip_stream.data.pipeline import Decoder, RawMessage, Sample, route
from growclip_stream.data.records import RecordError

log = logging.getLogger(__name__)

Method = Literal["thread", "process"]

DEFAULT_METHOD: Method = "process"
"""Measured faster on 2 cores for ~2 KB and ~20 KB images; see ``bench/README.md``."""

M = TypeVar("M", bound=RawMessage)

_SUBMIT_CHUNK = 64  # map(): messages pulled from the iterable per submit
_JOIN_TIMEOUT_S = 5.0
_WATCH_INTERVAL_S = 0.5  # how often take() checks that the worker processes are alive
_ISOLATED_START_TIMEOUT_S = 300.0  # a process that has not started by then is replaced
CRASH_DETAIL = "a decode worker process died while decoding this record"
STALL_DETAIL = "decoding this record took longer than the decode stall timeout"


@dataclass(frozen=True)
class Routed(Generic[M]):
    """One message and where it goes: ``status`` is ``"trained"``, ``"held_out"`` or the
    :class:`RecordError` reason; ``result`` the sample, or the error for the dead letter."""

    message: M
    status: str
    result: Sample | RecordError

    @property
    def sample(self) -> Sample | None:
        return self.result if isinstance(self.result, Sample) else None

    @property
    def error(self) -> RecordError | None:
        return self.result if isinstance(self.result, RecordError) else None


@dataclass(frozen=True)
class _Payload:
    """What a worker needs of a message (a RawMessage), without the rest of it."""

    value: bytes
    headers: tuple[tuple[str, bytes], ...]


# (sequence number, status, payload): payload is (id, image, caption) or (reason, detail)
_WorkerOut = tuple[int, str, tuple[Any, ...]]
_WorkItem = tuple[int, bytes, tuple[tuple[str, bytes], ...]]  # (sequence number, value, headers)


class _BusyClock:
    """When each worker process started the record it is decoding (0 while it is idle), in
    shared memory: the pipeline sees a record that stalls a worker, and counts only the time that
    worker has been running that record, never its start-up (importing torch takes seconds on a
    loaded machine). CLOCK_MONOTONIC is one clock for every process on the host."""

    def __init__(self, context: Any, slots: int) -> None:
        self.since = context.RawArray("d", max(1, slots))
        self._next = context.Value("i", 0)
        self._slot: int | None = None  # this process's slot, claimed on first use

    def __getstate__(self) -> dict[str, Any]:
        return {"since": self.since, "_next": self._next, "_slot": None}

    def begin(self) -> None:
        if self._slot is None:
            with self._next.get_lock():
                self._slot = self._next.value % len(self.since)
                self._next.value += 1
        self.since[self._slot] = time.monotonic()

    def end(self) -> None:
        if self._slot is not None:
            self.since[self._slot] = 0.0

    def longest_busy_s(self, now: float) -> float:
        """How long the longest-running record has been in its worker; 0 when all are idle."""
        started = [t for t in self.since if t > 0]
        return now - min(started) if started else 0.0


class _RouteWorker:
    """The function the workers run: ``route`` on each message of a chunk. Picklable, for
    process workers."""

    def __init__(
        self, decoder: Decoder, holdout_fraction: float, to_numpy: bool, clock: _BusyClock | None = None
    ) -> None:
        self.decoder = decoder
        self.holdout_fraction = holdout_fraction
        self.to_numpy = to_numpy
        self.clock = clock
        self._silenced = False  # each worker process has its own copy

    def __call__(self, chunk: list[_WorkItem]) -> list[_WorkerOut]:
        if self.to_numpy and not self._silenced and multiprocessing.parent_process() is not None:
            silence_native_warnings()  # a decode worker process: see images.silence_native_warnings
            self._silenced = True
        if self.clock is None:
            return [self._one(item) for item in chunk]
        out = []
        for item in chunk:
            self.clock.begin()
            out.append(self._one(item))
            self.clock.end()
        return out

    def _one(self, item: _WorkItem) -> _WorkerOut:
        seq, value, headers = item
        status, result = route(self.decoder, _Payload(value, headers), self.holdout_fraction)
        if isinstance(result, RecordError):  # the exception itself does not survive pickling
            return seq, status, (result.reason, result.detail)
        image: Any = result.image.numpy() if self.to_numpy else result.image
        return seq, status, (result.id, image, result.caption)


def _images_to_tensors(chunk: list[_WorkerOut]) -> list[_WorkerOut]:
    out = []
    for seq, status, payload in chunk:
        if len(payload) == 3 and isinstance(payload[1], np.ndarray):
            payload = (payload[0], torch.from_numpy(payload[1]), payload[2])
        out.append((seq, status, payload))
    return out


class _Feed:
    """The pipeline's input: a queue the reader thread iterates in chunks; ends once closed and
    empty. A chunk is what is queued when the reader asks, split across the workers and capped
    at ``max_chunk``: one message when they trickle in, bigger chunks under load, which spreads
    the per-item cost of the queues between threads or processes over many messages."""

    def __init__(self, num_workers: int, max_chunk: int) -> None:
        self._items: deque[_WorkItem] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._num_workers = max(1, num_workers)
        self._max_chunk = max_chunk

    def put(self, items: Iterable[_WorkItem]) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the decode pipeline is closed")
            self._items.extend(items)
            self._cond.notify()

    def close(self, discard: bool) -> None:
        with self._cond:
            self._closed = True
            if discard:
                self._items.clear()
            self._cond.notify_all()

    def detach(self) -> list[_WorkItem]:
        """Closes the feed and hands back what its reader has not taken yet."""
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._closed = True
            self._cond.notify_all()
        return items

    def __iter__(self) -> Iterator[list[_WorkItem]]:
        return self

    def __next__(self) -> list[_WorkItem]:
        with self._cond:
            while not self._items:
                if self._closed:
                    raise StopIteration
                self._cond.wait(0.1)
            queued = len(self._items)
            n = min(self._max_chunk, max(1, -(-queued // self._num_workers)))
            return [self._items.popleft() for _ in range(n)]


class DecodePipeline(Generic[M]):
    """Decodes, validates and routes messages in parallel; see the module docstring.

    Args:
        decoder: message -> Sample, raising RecordError (``pipeline.Decoder``).
        holdout_fraction: fraction of records (by id hash) routed to ``"held_out"``.
        num_workers: decode workers; 0 decodes in the pipeline's own thread.
        method: ``"thread"`` or ``"process"`` workers.
        prefetch: decoded chunks (up to ``max_chunk`` messages each) the Prefetcher stage holds
            ahead of the collector; memory is bounded by ``max_in_flight`` in any case.
        in_order: items come out in arrival order (deterministic); False: as they finish.
        pin_memory: page-locked images for asynchronous copies to CUDA (needs a GPU).
        max_in_flight: most messages inside the pipeline (submitted and not taken).
        multiprocessing_context: start method for process workers.
        max_chunk: most messages a worker takes at once (see ``_Feed``); 128 spreads the queues'
            per-chunk cost over more messages under load, and a trickle still goes one at a time.
        stall_timeout_s: process workers only: a worker busy with one record for this long is
            taken as stuck and the workers are replaced, like dead ones; a single record that
            takes longer alone (see the module docstring) is dead-lettered. None: never.
    """

    def __init__(
        self,
        decoder: Decoder,
        holdout_fraction: float,
        num_workers: int = 2,
        method: Method = DEFAULT_METHOD,
        prefetch: int = 4,
        in_order: bool = True,
        *,
        pin_memory: bool = False,
        pin_memory_device: str = "",
        max_in_flight: int = 1024,
        multiprocessing_context: str = "forkserver",
        max_chunk: int = 128,
        stall_timeout_s: float | None = 60.0,
    ) -> None:
        if not 0.0 <= holdout_fraction <= 1.0:
            raise ValueError(f"holdout_fraction must be in [0, 1], got {holdout_fraction}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if method not in ("thread", "process"):
            raise ValueError(f"method must be 'thread' or 'process', got {method!r}")
        if prefetch < 1 or max_in_flight < 1 or max_chunk < 1:
            raise ValueError("prefetch, max_in_flight and max_chunk must be >= 1")
        if stall_timeout_s is not None and stall_timeout_s <= 0:
            raise ValueError(f"stall_timeout_s must be positive or None, got {stall_timeout_s}")
        if pin_memory and pin_memory_device in ("", "cuda") and not torch.cuda.is_available():
            raise ValueError("pin_memory needs a CUDA device, and torch.cuda.is_available() is False")
        if multiprocessing_context not in multiprocessing.get_all_start_methods():
            raise ValueError(f"unknown multiprocessing context {multiprocessing_context!r}")
        self.decoder = decoder
        self.holdout_fraction = holdout_fraction
        self.num_workers = num_workers
        self.method: Method = method
        self.prefetch = prefetch
        self.in_order = in_order
        self.pin_memory = pin_memory
        self.pin_memory_device = pin_memory_device
        self.max_in_flight = max_in_flight
        self.multiprocessing_context = multiprocessing_context
        self.max_chunk = max_chunk
        self.stall_timeout_s = stall_timeout_s

        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._messages: dict[int, M] = {}  # submitted, not taken: seq -> message
        self._out: deque[tuple[int, str, tuple[Any, ...]]] = deque()
        self._seq = 0
        self._error: BaseException | None = None
        self._finished = False  # the collector saw the end of the stream
        self._closed = False
        self._feed = _Feed(num_workers, max_chunk)
        self._node: tn.BaseNode[list[_WorkerOut]] | None = None
        self._collector: threading.Thread | None = None
        self._next_watch = 0.0
        self._recovering = False
        self._clock: _BusyClock | None = None  # the process workers' record clocks
        self.worker_deaths = 0  # worker processes found dead (each one rebuilt the pipeline)
        self.crashed_records = 0  # records that, decoded alone, killed or stalled a decode process
        self.stalls = 0  # times the workers were replaced for making no progress
        self._torch_threads = torch.get_num_threads()  # the caller's intra-op threads, kept as they are
        self._threads_in_process = (method == "thread" and num_workers > 0) or pin_memory

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the workers (``submit`` does it on first use; call it to pay the start-up early:
        process workers import torch, which takes about a second)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the decode pipeline is closed")
            if self._collector is not None or self._recovering:
                return
            self._start_node()

    def _start_node(self) -> None:
        """Builds the node chain over the current feed and its collector thread (lock held)."""
        node = self._build()
        node.reset()  # starts the threads and workers now, in this thread
        torch.set_num_threads(self._torch_threads)  # see _keep_torch_threads
        self._node = node
        self._collector = threading.Thread(
            target=self._collect, args=(node,), name="decode-collector", daemon=True
        )
        self._collector.start()

    def _keep_torch_threads(self) -> None:
        """torchdata's worker and pin-memory threads call ``torch.set_num_threads(1)``. With
        torch's OpenMP backend that also becomes the count of threads that initialise later (a
        trainer thread started after the pipeline) or have not used OpenMP yet: the trainer's
        intra-op parallelism would silently drop to 1. The count the pipeline was built with is
        put back after the workers start, and on every submit and take (a set costs ~0.1 us)."""
        if self._threads_in_process:
            torch.set_num_threads(self._torch_threads)

    def _build(self) -> tn.BaseNode[list[_WorkerOut]]:
        to_numpy = self.method == "process" and self.num_workers > 0
        self._clock = (
            _BusyClock(multiprocessing.get_context(self.multiprocessing_context), self.num_workers)
            if to_numpy
            else None
        )
        node: tn.BaseNode[Any] = tn.IterableWrapper(self._feed)
        node = tn.ParallelMapper(
            node,
            _RouteWorker(self.decoder, self.holdout_fraction, to_numpy, self._clock),
            num_workers=self.num_workers,
            in_order=self.in_order,
            method=self.method,
            multiprocessing_context=self.multiprocessing_context if self.method == "process" else None,
            snapshot_frequency=0,  # no checkpointing of this node: positions live in the source
        )
        if to_numpy:
            node = tn.Mapper(node, _images_to_tensors)
        if self.pin_memory:
            node = tn.PinMemory(node, pin_memory_device=self.pin_memory_device, snapshot_frequency=0)
        return tn.Prefetcher(node, prefetch_factor=self.prefetch, snapshot_frequency=0)

    def _collect(self, node: tn.BaseNode[list[_WorkerOut]]) -> None:
        """Moves decoded chunks to the output; a node replaced after a worker died is left alone
        (its records are decoded again by the recovery)."""
        try:
            for chunk in node:
                with self._ready:
                    if node is not self._node:
                        return
                    if not self._closed:
                        self._out.extend(chunk)
                    self._ready.notify_all()
        except BaseException as e:  # re-raised by take(): a bug in decoding, not a bad record
            with self._ready:
                if node is self._node:
                    self._error = e
                    self._ready.notify_all()
        finally:
            with self._ready:
                if node is self._node:
                    self._finished = True
                    self._ready.notify_all()

    # -- dead worker processes --------------------------------------------------------------------

    def _watch_workers(self) -> None:
        if self.method != "process" or self.num_workers == 0:
            return
        now = time.monotonic()
        if now < self._next_watch:
            return
        self._next_watch = now + _WATCH_INTERVAL_S
        node = self._node
        if node is None:
            return
        workers = _worker_processes(node)
        dead = [p for p in workers if not p.is_alive()]
        if dead:
            self.worker_deaths += len(dead)
            self._recover(node, f"{len(dead)} decode worker process(es) died", [p.exitcode for p in dead])
            return
        clock = self._clock
        if self.stall_timeout_s is not None and clock is not None:
            busy_s = clock.longest_busy_s(now)
            if busy_s > self.stall_timeout_s:
                self.stalls += 1
                for p in workers:
                    p.kill()
                    p.join(1.0)
                why = f"a decode worker has been decoding one record for {busy_s:.1f} s"
                self._recover(node, why, [p.exitcode for p in workers])

    def _recover(self, node: tn.BaseNode[list[_WorkerOut]], why: str, exitcodes: list[int | None]) -> None:
        """Replaces a node that lost (or stopped) its workers; decodes the records it held one at a
        time, then starts a new node on what was still queued."""
        with self._lock:
            if node is not self._node or self._closed:
                return
            self._recovering = True  # start() must not build a node meanwhile
            self._node = None  # its collector now leaves the output alone
            queued = self._feed.detach()  # not read by the old node yet: they go to the new one
            self._feed = _Feed(self.num_workers, self.max_chunk)
            collector, self._collector = self._collector, None
        _shutdown_nodes(node)
        if collector is not None:
            collector.join(_JOIN_TIMEOUT_S)
        with self._lock:
            out = {seq for seq, _, _ in self._out}
            waiting = {seq for seq, _, _ in queued}
            suspects = [
                (seq, msg.value, tuple(msg.headers))
                for seq, msg in sorted(self._messages.items())
                if seq not in out and seq not in waiting
            ]
        log.error(
            f"{why}; re-decoding the records they may have held one at a time",
            extra={"exitcodes": exitcodes, "records": len(suspects)},
        )
        routed = self._decode_one_by_one(suspects)
        with self._ready:
            self._recovering = False
            if self._closed:  # closed meanwhile: nothing to restart
                return
            self._out.extend(routed)  # in order: before anything still queued
            self._feed.put(queued)
            self._start_node()
            self._ready.notify_all()

    def _decode_one_by_one(self, items: list[_WorkItem]) -> list[_WorkerOut]:
        """Each item decoded alone in a separate process, so a record that kills it (or takes
        longer than ``stall_timeout_s``) is identified and dead-lettered.

        A slow machine must never get a good record dead-lettered: the timeout starts only once
        the process has answered a first call (its start-up, seconds under load, is not the
        record's), and a record that times out is tried once more, in a fresh process, with twice
        the time, before it counts as stalling its decoder."""
        worker = _RouteWorker(self.decoder, self.holdout_fraction, to_numpy=True)
        context = multiprocessing.get_context(self.multiprocessing_context)
        out: list[_WorkerOut] = []
        pool: ProcessPoolExecutor | None = None
        try:
            for item in items:
                detail = ""
                for attempt, timeout_s in enumerate(self._isolated_timeouts()):
                    if pool is None:
                        pool = self._isolated_pool(context, worker)
                    future = pool.submit(worker, [item])
                    try:
                        out.extend(future.result(timeout=timeout_s))
                        detail = ""
                        break
                    except BrokenProcessPool:
                        detail = CRASH_DETAIL
                    except TimeoutError:
                        detail = STALL_DETAIL
                    _kill_pool(pool)
                    pool = None
                    if detail == CRASH_DETAIL:
                        break  # a crash is the record's doing whatever the load
                    log.warning(
                        "a record timed out in an isolated decode process",
                        extra={"attempt": attempt + 1, "timeout_s": timeout_s},
                    )
                if detail:
                    self.crashed_records += 1
                    log.error(
                        "a record broke the decode process; dead-lettering it", extra={"detail": detail}
                    )
                    out.append((item[0], "bad_image", ("bad_image", detail)))
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        return _images_to_tensors(out)

    def _isolated_timeouts(self) -> list[float | None]:
        if self.stall_timeout_s is None:
            return [None]
        return [self.stall_timeout_s, 2 * self.stall_timeout_s]

    def _isolated_pool(self, context: Any, worker: _RouteWorker) -> ProcessPoolExecutor:
        """A one-process pool that has answered a first call (the worker on no records: started,
        its modules imported, the decoder unpickled once) and is idle."""
        while True:
            pool = ProcessPoolExecutor(max_workers=1, mp_context=context)
            try:
                pool.submit(worker, []).result(timeout=_ISOLATED_START_TIMEOUT_S)
                return pool
            except (BrokenProcessPool, TimeoutError) as err:
                _kill_pool(pool)
                log.warning(
                    "an isolated decode process did not start; starting another", extra={"error": repr(err)}
                )
                if self._closed:
                    raise RuntimeError("the decode pipeline was closed") from err

    def close(self) -> None:
        """Drops what was not decoded yet, then stops and joins every thread and worker. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._out.clear()
            self._messages.clear()
        self._feed.close(discard=True)
        collector, self._collector = self._collector, None
        if collector is not None:
            collector.join(_JOIN_TIMEOUT_S)
            if collector.is_alive():
                log.error("decode collector did not stop", extra={"timeout_s": _JOIN_TIMEOUT_S})
        if self._node is not None:
            _shutdown_nodes(self._node)
            self._node = None

    def __enter__(self) -> DecodePipeline[M]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- streaming --------------------------------------------------------------------------------

    def in_flight(self) -> int:
        """Messages submitted and not taken yet."""
        with self._lock:
            return len(self._messages)

    def room(self) -> int:
        """How many more messages :meth:`submit` accepts now."""
        return max(0, self.max_in_flight - self.in_flight())

    def submit(self, messages: Sequence[M]) -> None:
        """Queues messages for decoding. Raises if they do not fit in :meth:`room`: the caller
        polls at most that many (and pauses its source while there is no room)."""
        self._keep_torch_threads()
        if not messages:
            return
        self.start()
        with self._lock:
            if self._error is not None:
                raise self._error
            if len(self._messages) + len(messages) > self.max_in_flight:
                raise OverflowError(
                    f"{len(messages)} messages do not fit: {len(self._messages)} in flight, "
                    f"max_in_flight={self.max_in_flight}"
                )
            items = []
            for msg in messages:
                seq = self._seq
                self._seq += 1
                self._messages[seq] = msg
                items.append((seq, msg.value, tuple(msg.headers)))
            self._feed.put(items)  # under the lock: a recovery may swap the feed

    def take(self, max_items: int | None = None, timeout_s: float = 0.0) -> list[Routed[M]]:
        """Routed items ready now (at most ``max_items``), in arrival order when ``in_order``.

        Waits up to ``timeout_s`` for the first one when none is ready and some are in flight;
        ``timeout_s=0`` never blocks. Re-raises an unexpected decode exception. Checks that the
        worker processes are alive (see the module docstring).
        """
        self._keep_torch_threads()
        self._watch_workers()
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._ready:
            while not self._out:
                if self._error is not None:
                    raise self._error
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._messages or self._finished:
                    return []
                self._ready.wait(remaining)
            n = len(self._out) if max_items is None else min(max_items, len(self._out))
            raw = [self._out.popleft() for _ in range(n)]
            messages = [self._messages.pop(seq) for seq, _, _ in raw]
        return [
            _routed(msg, status, payload) for msg, (_, status, payload) in zip(messages, raw, strict=True)
        ]

    # -- one-shot ---------------------------------------------------------------------------------

    def map(self, messages: Iterable[M]) -> Iterator[Routed[M]]:
        """Routed items for ``messages``, pulled from the iterable in the caller's thread as room
        frees up (at most ``max_in_flight`` ahead). Sequential calls may reuse the pipeline."""
        it = iter(messages)
        exhausted = False
        while True:
            room = self.room()
            if not exhausted and room > 0:
                chunk = list(islice(it, min(room, _SUBMIT_CHUNK)))
                if chunk:
                    self.submit(chunk)
                if len(chunk) < min(room, _SUBMIT_CHUNK):
                    exhausted = True
                yield from self.take()  # what is ready; keep feeding
                continue
            if exhausted and self.in_flight() == 0:
                return
            yield from self.take(timeout_s=0.1)


class SettledStates:
    """Which source state is settled while messages are still inside a decode pipeline.

    A checkpoint may only record, and Kafka may only be given, positions up to which every
    record is settled (trained, held out or dead-lettered). With a pipeline, ``source.state_dict()``
    right after a poll also covers messages still being decoded. Record it with
    :meth:`submitted` after each poll's messages went in; report with :meth:`taken` how many
    routed items came out. Items come out in the order they went in (``in_order=True``), so a
    recorded state is settled once as many items were taken as had been submitted when it was
    recorded. :meth:`settled` returns the latest such state, or, given ``advance`` (the source's
    ``state_after``) and the polled messages, the exact state after any number of them: a
    checkpoint can then stop in the middle of a poll. Source-agnostic: the states are opaque.
    """

    def __init__(
        self,
        initial: Mapping[str, Any],
        advance: Callable[[dict[str, Any], Sequence[Any]], dict[str, Any]] | None = None,
    ) -> None:
        self._submitted = 0
        self._taken = 0
        self._advance = advance
        # (submitted count after the poll, state after it, its messages)
        self._states: deque[tuple[int, dict[str, Any], Sequence[Any]]] = deque()
        self._settled: dict[str, Any] = dict(initial)
        self._settled_count = 0

    def submitted(self, count: int, state: Mapping[str, Any], messages: Sequence[Any] = ()) -> None:
        """``count`` messages went into the pipeline; ``state`` is the source's state after them.
        Pass the messages themselves for record-exact states (see ``advance``)."""
        if messages and len(messages) != count:
            raise ValueError(f"{len(messages)} messages for a count of {count}")
        self._submitted += count
        self._states.append((self._submitted, dict(state), tuple(messages)))

    def taken(self, count: int) -> None:
        """``count`` routed items came out of the pipeline."""
        self._taken += count
        if self._taken > self._submitted:
            raise ValueError(f"{self._taken} items taken but only {self._submitted} submitted")

    def settled(self, upto: int | None = None) -> dict[str, Any]:
        """The state after the first ``upto`` messages (default: all taken), capped at what was
        taken. Without ``advance`` (or the messages), the latest whole poll within that."""
        limit = self._taken if upto is None else min(upto, self._taken)
        if limit < self._settled_count:
            raise ValueError(f"settled state asked for {limit} messages, already past {self._settled_count}")
        while self._states and self._states[0][0] <= limit:
            end, self._settled, _ = self._states.popleft()
            self._settled_count = end
        if not self._states or self._advance is None:
            return self._settled
        end, _, messages = self._states[0]
        start = end - len(messages)
        if not messages or limit <= start:
            return self._settled
        return self._advance(self._settled, messages[: limit - start])


def _routed(message: M, status: str, payload: tuple[Any, ...]) -> Routed[M]:
    if len(payload) == 2:
        reason, detail = payload
        return Routed(message, status, RecordError(reason, detail))
    sample_id, image, caption = payload
    return Routed(message, status, Sample(sample_id, image, caption))


def _kill_pool(pool: ProcessPoolExecutor) -> None:
    """Shuts a one-process pool down now, killing its process if it is stuck in a decode."""
    processes = list(getattr(pool, "_processes", {}).values())  # CPython's executor internals
    for p in processes:
        if p.is_alive():
            p.kill()
    pool.shutdown(wait=True, cancel_futures=True)


def _node_chain(node: tn.BaseNode[Any]) -> Iterator[Any]:
    """The node and the iterators and sources under it (torchdata 0.11 internals: ``_it``, ``source``)."""
    seen: set[int] = set()
    stack: list[Any] = [node]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        for attr in ("_it", "source"):
            stack.append(getattr(obj, attr, None))


def _worker_processes(node: tn.BaseNode[Any]) -> list[multiprocessing.process.BaseProcess]:
    return [
        worker
        for obj in _node_chain(node)
        for worker in getattr(obj, "_workers", ())
        if isinstance(worker, multiprocessing.process.BaseProcess)
    ]


def _shutdown_nodes(node: tn.BaseNode[Any]) -> None:
    """Stops the threads and worker processes of a node chain now rather than at garbage
    collection. torchdata 0.11 has no public shutdown: each node's running iterator has a
    ``_shutdown()`` (joins its threads and processes); worker processes still alive after it are
    terminated, and its multiprocessing queues are not flushed at exit."""
    for obj in _node_chain(node):
        shutdown = getattr(obj, "_shutdown", None)
        if callable(shutdown):
            try:
                shutdown()
            except Exception as e:
                log.warning(
                    "decode node shutdown failed", extra={"node": type(obj).__name__, "error": repr(e)}
                )
            for worker in getattr(obj, "_workers", ()):
                if isinstance(worker, multiprocessing.process.BaseProcess) and worker.is_alive():
                    worker.terminate()
                    worker.join(1.0)
        for value in list(vars(obj).values()) if hasattr(obj, "__dict__") else ():
            if isinstance(value, multiprocessing.queues.Queue):
                # what is still queued for a worker is dropped; without this, interpreter exit
                # waits for the queue's feeder thread, which blocks for good on a pipe that no
                # (dead) worker reads
                value.cancel_join_thread()
