"""Publishing records to Kafka: topic pre-creation, a tuned producer, and a rate-limited publisher."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Literal

from kafka import KafkaAdminClient, KafkaProducer
from kafka.errors import KafkaError, TopicAlreadyExistsError

from growclip_stream.data.records import Record, encode_binary, encode_json, sniff_content_type

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 32 * 1024 * 1024  # above any record we accept, so oversized ones reach the dead letter
_ADMIN_TIMEOUT_MS = 10_000


def make_producer(bootstrap: str) -> KafkaProducer:
    """A producer for image records: ~1 MB batches, 5 ms linger, acks from all replicas.

    kafka-python 3.x makes it idempotent by default. DESIGN §6: after a broker restart an
    idempotent producer stays broken until recreated, so long-lived owners recreate it on errors.
    """
    return KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        batch_size=1024 * 1024,
        linger_ms=5,
        max_request_size=MAX_REQUEST_BYTES,
        client_id="growclip-producer",
    )


def ensure_topics(bootstrap: str, topics: Sequence[str], partitions: int = 1) -> None:
    """Creates the topics that do not exist yet, and waits until all are usable. Idempotent.

    Topics are pre-created rather than left to the broker's auto-create, which can reuse offsets
    (DESIGN §6). An existing topic keeps its partition count.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    names = list(dict.fromkeys(topics))
    if not names:
        return
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=_ADMIN_TIMEOUT_MS)
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
    finally:
        admin.close()
    if created:
        log.info("created topics", extra={"topics": created, "partitions": partitions})


def produce(
    bootstrap: str,
    topic: str,
    records: Iterable[Record],
    *,
    fmt: Literal["json", "binary"] = "json",
    rate: float | None = None,
    limit: int | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Publishes records to ``topic``; returns how many were sent.

    ``rate`` is records per second, paced steadily (a token bucket holding at most a tenth of a
    second of records); None sends as fast as the client goes. Stops after ``limit`` records, when
    ``records`` ends, or when ``stop`` is set. Always flushes before returning, and raises if the
    broker rejected any record.
    """
    if fmt not in ("json", "binary"):
        raise ValueError(f"fmt must be 'json' or 'binary', got {fmt!r}")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if limit is not None and limit <= 0:
        return 0
    bucket = _TokenBucket(rate) if rate is not None else None
    failures: list[BaseException] = []
    sent = 0
    t0 = time.monotonic()
    producer = make_producer(bootstrap)
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
            future = producer.send(topic, key=rec.id.encode("utf-8"), value=value, headers=headers)
            future.add_errback(failures.append)
            sent += 1
            if failures:
                break
            if limit is not None and sent >= limit:
                break
        producer.flush()
    finally:
        producer.close()
    if failures:
        raise KafkaError(f"{len(failures)} record(s) to {topic!r} failed: {failures[0]!r}")
    elapsed = time.monotonic() - t0
    log.info(
        "produced records",
        extra={"topic": topic, "records": sent, "record_format": fmt, "seconds": round(elapsed, 3)},
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
