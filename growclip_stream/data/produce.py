"""Publishing records to Kafka: topic pre-creation, a tuned producer that survives broker restarts,
and a rate-limited publisher.

:class:`ReliableProducer` is the piece everything that writes to Kafka goes through (the dataset
publisher :func:`produce` and the dead letter). It keeps every record it was handed until the
broker acknowledges it, and recreates the underlying kafka-python producer after a failure
(DESIGN §6: after a broker restart an idempotent kafka-python 3.x producer stays broken until
recreated), sending the unacknowledged records again.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from kafka import KafkaAdminClient, KafkaProducer
from kafka.errors import (
    AuthorizationError,
    InvalidTopicError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAlreadyExistsError,
)

from growclip_stream.data.records import Record, encode_binary, encode_json, sniff_content_type

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 32 * 1024 * 1024  # above any record we accept, so oversized ones reach the dead letter
_ADMIN_TIMEOUT_MS = 10_000
_ADMIN_ATTEMPTS = 4  # ensure_topics: tries of a dropped connection, 0.5, 1 and 2 s apart
_STOP_GRACE_S = 10.0  # after `stop`, how long produce() still tries to deliver what it already sent

# The broker (or the client, before sending) refuses these records for what they are; sending them
# again cannot succeed, so they are reported instead of retried.
_PERMANENT_ERRORS: tuple[type[KafkaError], ...] = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    InvalidTopicError,
    AuthorizationError,
)


def make_producer(
    bootstrap: str,
    *,
    client_id: str = "growclip-producer",
    max_block_ms: int = 60_000,
    reconnect_backoff_max_ms: int = 5_000,
    bootstrap_timeout_ms: int = 30_000,
    security: Mapping[str, Any] | None = None,
) -> KafkaProducer:
    """A producer for image records: ~1 MB batches, 5 ms linger, acks from all replicas.

    kafka-python 3.x makes it idempotent by default. DESIGN §6: after a broker restart an
    idempotent producer stays broken until recreated; :class:`ReliableProducer` does that.
    ``max_block_ms`` bounds how long ``send`` may block (metadata unknown, buffer full);
    ``reconnect_backoff_max_ms`` caps the client's reconnect backoff (its default, 30 s, would add
    up to 30 s to the recovery after an outage). ``security``: kafka-python's TLS/SASL keyword
    arguments (:func:`growclip_stream.data.kafka_security.client_options`).
    """
    return KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        batch_size=1024 * 1024,
        linger_ms=5,
        max_request_size=MAX_REQUEST_BYTES,
        client_id=client_id,
        max_block_ms=max_block_ms,
        reconnect_backoff_max_ms=reconnect_backoff_max_ms,
        bootstrap_timeout_ms=bootstrap_timeout_ms,
        **(security or {}),
    )


def ensure_topics(
    bootstrap: str, topics: Sequence[str], partitions: int = 1, security: Mapping[str, Any] | None = None
) -> None:
    """Creates the topics that do not exist yet, and waits until all are usable. Idempotent.

    Topics are pre-created rather than left to the broker's auto-create, which can reuse offsets
    (DESIGN §6). An existing topic keeps its partition count. A connection dropped mid-request
    (a loaded broker or proxy, a restart) is retried with a fresh client, a few times with backoff:
    one dropped connection must not fail a daemon's start.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    names = list(dict.fromkeys(topics))
    if not names:
        return
    for attempt in range(1, _ADMIN_ATTEMPTS + 1):
        try:
            created = _create_topics(bootstrap, names, partitions, security)
            break
        except (KafkaConnectionError, KafkaTimeoutError) as err:
            if attempt == _ADMIN_ATTEMPTS:
                raise
            delay = 0.5 * 2 ** (attempt - 1)
            log.warning(
                "creating topics failed; retrying",
                extra={"topics": names, "error": repr(err), "attempt": attempt, "retry_in_s": delay},
            )
            time.sleep(delay)
    if created:
        log.info("created topics", extra={"topics": created, "partitions": partitions})


def _create_topics(
    bootstrap: str, names: list[str], partitions: int, security: Mapping[str, Any] | None
) -> list[str]:
    """One attempt of :func:`ensure_topics`: the names it created."""
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=_ADMIN_TIMEOUT_MS, **(security or {})
    )
    try:
        result = admin.create_topics(
            {name: {"num_partitions": partitions, "replication_factor": 1} for name in names},
            timeout_ms=_ADMIN_TIMEOUT_MS,
            raise_errors=False,
        )
        created = []
        for entry in result["topics"]:
            code = entry["error_code"]
            if code == 0:
                created.append(entry["name"])
            elif code != TopicAlreadyExistsError.errno:
                raise KafkaError(f"creating topic {entry['name']!r} failed: {code} {entry['error_message']}")
        admin.wait_for_topics(names, timeout_ms=_ADMIN_TIMEOUT_MS)
        return created
    finally:
        admin.close()


def broker_reachable(bootstrap: str, timeout_s: float = 0.25) -> bool:
    """Whether any ``host:port`` of ``bootstrap`` accepts a TCP connection now.

    A cheap check before the expensive one: a refused connection answers at once, whereas a Kafka
    client waits out its whole timeout. It says nothing about whether the broker is healthy.
    """
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit():
            continue
        try:
            socket.create_connection((host, int(port)), timeout=timeout_s).close()
        except OSError:
            continue
        return True
    return False


class Backoff:
    """Exponential backoff with a cap: ``initial_s``, twice that, ... up to ``max_s``.

    :meth:`ready` says whether the next attempt is due; :meth:`fail` records a failed attempt and
    schedules the next one; :meth:`reset` after a success. Also paces log lines about the failures,
    so a long outage logs at most once per backoff period.
    """

    def __init__(self, initial_s: float, max_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if initial_s <= 0 or max_s < initial_s:
            raise ValueError(f"need 0 < initial_s <= max_s, got {initial_s} and {max_s}")
        self.initial_s = initial_s
        self.max_s = max_s
        self._clock = clock
        self.failures = 0
        self._next_at = 0.0

    @property
    def delay_s(self) -> float:
        """The wait after the latest failure (0 before any)."""
        if self.failures == 0:
            return 0.0
        return min(self.max_s, self.initial_s * 2 ** min(self.failures - 1, 62))

    def ready(self) -> bool:
        return self._clock() >= self._next_at

    def remaining_s(self) -> float:
        return max(0.0, self._next_at - self._clock())

    def fail(self) -> float:
        """Records a failed attempt; returns the delay until the next one."""
        self.failures += 1
        delay = self.delay_s
        self._next_at = self._clock() + delay
        return delay

    def reset(self) -> None:
        self.failures = 0
        self._next_at = 0.0


@dataclass
class _Outgoing:
    seq: int
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    generation: int = -1  # the producer generation it was last handed to (-1: none yet)


class RecordRejectedError(KafkaError):
    """The broker or the client refused a record for what it is (too large, bad topic, not
    authorised); sending it again cannot succeed."""


class ReliableProducer:
    """Sends records to Kafka without losing any across broker outages and restarts.

    Every record handed to :meth:`send` is kept until the broker acknowledges it. A failed delivery,
    or a ``send`` the client refused, marks the producer broken; the next :meth:`send`,
    :meth:`maintain` or :meth:`flush` after the backoff delay closes the kafka-python producer,
    builds a new one once the broker accepts connections again, and sends every unacknowledged
    record again in its original order. Delivery is therefore at-least-once across a recreation: a
    record whose acknowledgement was lost with the old producer reaches the topic twice.

    Records refused for what they are (:data:`_PERMANENT_ERRORS`) are not retried: a synchronous
    refusal raises :class:`RecordRejectedError` from :meth:`send`; an asynchronous one is kept in
    :attr:`rejected` and counted in :attr:`rejected_count`.

    Memory: unacknowledged records stay in memory until acknowledged (there is no cap: dropping
    would lose them). ``send`` blocks at most ``max_block_ms`` (client metadata or buffer waits).

    Threading: one thread calls ``send``/``maintain``/``flush``/``close``; the client's delivery
    callbacks run on its IO thread.
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        client_id: str = "growclip-producer",
        max_block_ms: int = 60_000,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 5.0,
        keep_rejected: int = 100,
        security: Mapping[str, Any] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.security = dict(security or {})
        self.client_id = client_id
        self.max_block_ms = max_block_ms
        self._backoff = Backoff(backoff_initial_s, backoff_max_s)
        self._lock = threading.RLock()
        self._unacked: dict[int, _Outgoing] = {}  # insertion (= send) order
        self._seq = 0
        self._generation = 0
        self._broken = False
        self._last_error: BaseException | None = None
        self._keep_rejected = keep_rejected
        self.rejected: list[tuple[str, BaseException]] = []  # (topic, error), the latest few
        self.rejected_count = 0
        self.delivered = 0
        self.reconnects = 0  # producers recreated after a failure
        self._producer: KafkaProducer | None = self._create()

    # -- state ------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Records handed to :meth:`send` and not acknowledged yet."""
        with self._lock:
            return len(self._unacked)

    @property
    def healthy(self) -> bool:
        """False from a failure until a recreated producer is in place."""
        return not self._broken and self._producer is not None

    # -- sending ----------------------------------------------------------------------------------

    def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        """Queues one record; it is delivered or retried until it is (or reported as rejected)."""
        with self._lock:
            self._seq += 1
            out = _Outgoing(self._seq, topic, key, value, list(headers))
            self._unacked[out.seq] = out
        if self._broken:
            self.maintain()  # a recreated producer sends every unacknowledged record, this one too
            return
        self._dispatch(out, raise_rejected=True)

    def _dispatch(self, out: _Outgoing, raise_rejected: bool) -> None:
        producer, generation = self._producer, self._generation
        if producer is None:
            self._mark_broken(None)
            return
        out.generation = generation
        try:
            future = producer.send(out.topic, key=out.key, value=out.value, headers=out.headers)
        except _PERMANENT_ERRORS as e:
            self._reject(out, e)
            if raise_rejected:
                raise RecordRejectedError(f"record to {out.topic!r} refused: {e!r}") from e
            return
        except (KafkaError, OSError) as e:  # e.g. metadata unavailable within max_block_ms
            self._mark_broken(e)
            return
        future.add_callback(partial(self._on_delivered, out.seq))
        future.add_errback(partial(self._on_failed, out.seq, generation))

    def _on_delivered(self, seq: int, _metadata: Any) -> None:
        with self._lock:
            if self._unacked.pop(seq, None) is not None:
                self.delivered += 1
            if not self._broken:
                self._backoff.reset()

    def _on_failed(self, seq: int, generation: int, exc: BaseException) -> None:
        with self._lock:
            out = self._unacked.get(seq)
            if out is None or generation != self._generation:
                return  # delivered meanwhile, or a failure of a producer already replaced
            if isinstance(exc, _PERMANENT_ERRORS):
                self._reject(out, exc)
                return
            self._mark_broken(exc)

    def _reject(self, out: _Outgoing, exc: BaseException) -> None:
        with self._lock:
            self._unacked.pop(out.seq, None)
            self.rejected_count += 1
            self.rejected.append((out.topic, exc))
            del self.rejected[: -self._keep_rejected]
        log.error("record refused by Kafka", extra={"topic": out.topic, "error": repr(exc)})

    def _mark_broken(self, exc: BaseException | None) -> None:
        with self._lock:
            if exc is not None:
                self._last_error = exc
            if not self._broken:
                self._broken = True
                log.warning(
                    "producer failed; it will be recreated",
                    extra={"client_id": self.client_id, "error": repr(exc), "pending": len(self._unacked)},
                )

    def maintain(self) -> None:
        """Recreates a broken producer when its backoff delay has passed, and sends the
        unacknowledged records again. Cheap when nothing is broken."""
        if not self._broken or not self._backoff.ready():
            return
        with self._lock:
            self._generation += 1  # callbacks of the old producer are ignored from here on
            old, self._producer = self._producer, None
        if old is not None:
            _discard_producer(old)
        try:
            if not broker_reachable(self.bootstrap):
                raise KafkaError("no bootstrap server accepts connections")
            producer = self._create()
        except (KafkaError, OSError) as e:
            delay = self._backoff.fail()
            log.warning(
                "producer still cannot reach the broker",
                extra={
                    "client_id": self.client_id,
                    "error": repr(e),
                    "retry_in_s": round(delay, 2),
                    "pending": self.pending,
                },
            )
            return
        with self._lock:
            self._producer = producer
            self._broken = False
            self.reconnects += 1
            resend = sorted(self._unacked.values(), key=lambda o: o.seq)
        self._backoff.fail()  # paces the next recreation in case this one fails at once too
        log.info(
            "producer recreated",
            extra={"client_id": self.client_id, "resending": len(resend), "reconnects": self.reconnects},
        )
        for out in resend:
            if self._broken:
                break
            self._dispatch(out, raise_rejected=False)

    def flush(self, timeout_s: float | None = None, stop: threading.Event | None = None) -> bool:
        """Waits until every record is acknowledged (or rejected), recreating the producer as
        needed. Gives up after ``timeout_s`` (None: no limit) or, once ``stop`` is set, after a
        short grace period. True when nothing is pending."""
        t0 = time.monotonic()
        deadline = None if timeout_s is None else t0 + timeout_s
        while True:
            self.maintain()
            if self.pending == 0:
                return True
            now = time.monotonic()
            if stop is not None and stop.is_set():
                grace = now + _STOP_GRACE_S
                deadline = grace if deadline is None else min(deadline, grace)
                stop = None
            if deadline is not None and now >= deadline:
                return False
            wait = 0.5 if deadline is None else max(0.0, min(0.5, deadline - now))
            producer = self._producer
            if producer is None or self._broken:
                time.sleep(min(wait, max(0.01, self._backoff.remaining_s())))
                continue
            with contextlib.suppress(KafkaTimeoutError):
                producer.flush(timeout=wait)

    def close(self, timeout_s: float = 5.0) -> int:
        """Flushes for at most ``timeout_s``, then closes; returns how many records were never
        acknowledged (logged as an error when not 0)."""
        self.flush(timeout_s)
        with self._lock:
            producer, self._producer = self._producer, None
            self._generation += 1
            lost = len(self._unacked)
        if producer is not None:
            _discard_producer(producer)
        if lost:
            log.error(
                "producer closed with unacknowledged records",
                extra={"client_id": self.client_id, "records": lost, "error": repr(self._last_error)},
            )
        return lost

    def _create(self) -> KafkaProducer:
        return make_producer(
            self.bootstrap,
            client_id=self.client_id,
            max_block_ms=self.max_block_ms,
            reconnect_backoff_max_ms=int(self._backoff.max_s * 1000),
            bootstrap_timeout_ms=min(30_000, max(1000, self.max_block_ms)),
            security=self.security,
        )

    def __enter__(self) -> ReliableProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _discard_producer(producer: KafkaProducer) -> None:
    """Closes a producer without waiting for its pending records (they are sent again by its
    replacement). kafka-python's ``close(0)`` raises when records are pending, before it stops
    its IO thread, so the thread is force-closed here."""
    try:
        producer.close(timeout=0)
    except Exception:  # a broken client may fail in any way while closing
        sender = getattr(producer, "_sender", None)
        if sender is not None:
            sender.force_close()
            sender.join(timeout=2.0)
        producer._closed = True  # its __del__ would otherwise try to flush again


def produce(
    bootstrap: str,
    topic: str,
    records: Iterable[Record],
    *,
    fmt: Literal["json", "binary"] = "json",
    rate: float | None = None,
    limit: int | None = None,
    stop: threading.Event | None = None,
    security: Mapping[str, Any] | None = None,
) -> int:
    """Publishes records to ``topic``; returns how many were sent (all of them acknowledged).

    ``rate`` is records per second, paced steadily (a token bucket holding at most a tenth of a
    second of records); None sends as fast as the client goes. Stops after ``limit`` records, when
    ``records`` ends, or when ``stop`` is set.

    Survives broker outages and restarts: the producer is recreated after a failure and the
    records not acknowledged yet are sent again (at-least-once: a record whose acknowledgement was
    lost in the outage may be written twice). Before returning it waits until every record sent
    is acknowledged; once ``stop`` is set it waits at most a short grace period. Raises
    :class:`KafkaError` if a record was refused for what it is, or is still unacknowledged then.
    """
    if fmt not in ("json", "binary"):
        raise ValueError(f"fmt must be 'json' or 'binary', got {fmt!r}")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if limit is not None and limit <= 0:
        return 0
    bucket = _TokenBucket(rate) if rate is not None else None
    sent = 0
    t0 = time.monotonic()
    producer = ReliableProducer(bootstrap, client_id="growclip-producer", security=security)
    try:
        for rec in records:
            if stop is not None and stop.is_set():
                break
            if bucket is not None and not bucket.take(stop):
                break  # stopped while waiting for a token
            headers: list[tuple[str, bytes]] = []
            if fmt == "json":
                value = encode_json(rec)
            else:
                value, headers = encode_binary(rec, sniff_content_type(rec.image))
            producer.send(topic, value, key=rec.id.encode("utf-8"), headers=headers)
            sent += 1
            if producer.rejected_count:
                break
            if limit is not None and sent >= limit:
                break
        producer.flush(stop=stop)
    finally:
        undelivered = producer.close(timeout_s=1.0)
    if producer.rejected_count:
        topic_err = producer.rejected[0][1]
        raise KafkaError(f"{producer.rejected_count} record(s) to {topic!r} refused: {topic_err!r}")
    if undelivered:
        raise KafkaError(f"{undelivered} of {sent} record(s) to {topic!r} were not acknowledged")
    elapsed = time.monotonic() - t0
    log.info(
        "produced records",
        extra={
            "topic": topic,
            "records": sent,
            "record_format": fmt,
            "seconds": round(elapsed, 3),
            "producer_reconnects": producer.reconnects,
        },
    )
    return sent


class _TokenBucket:
    """Steady pacing at ``rate`` tokens/s with a burst of at most a tenth of a second (>= 1 token)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate / 10)
        self.tokens = 1.0
        self.updated = time.monotonic()

    def take(self, stop: threading.Event | None) -> bool:
        """Waits for one token; False when ``stop`` was set while waiting."""
        while True:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return True
            wait = (1.0 - self.tokens) / self.rate
            if stop is not None:
                if stop.wait(wait):
                    return False
            else:
                time.sleep(wait)
