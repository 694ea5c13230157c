"""Kafka as a record source with positions kept in the checkpoint, plus the dead-letter topic.

Delivery contract (DESIGN §2): the source tracks, per partition, the offset of the next record it
has *returned* to the caller. :meth:`KafkaSource.state_dict` goes into the checkpoint;
:meth:`KafkaSource.load_state_dict` seeks back to it on restart; :meth:`KafkaSource.commit` writes
positions to Kafka only after the checkpoint holding them is durable. Kafka's committed offsets
are therefore a fallback for a start without a checkpoint, never ahead of what a checkpoint holds.

Whenever partitions are (re)assigned, the source seeks each one it has a position for to that
position, so a rebalance neither skips nor repeats records for this model.

Threading: one thread drives ``poll``/``commit``/``load_state_dict``; ``lag()`` and
``state_dict()`` may be read from another thread (metrics, checkpointer).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import IllegalStateError
from kafka.structs import OffsetAndMetadata

from growclip_stream.data.produce import MAX_REQUEST_BYTES, ensure_topics, make_producer

log = logging.getLogger(__name__)

DLQ_SUFFIX = ".dlq"
_MAX_DETAIL_CHARS = 1000


@dataclass(frozen=True)
class Message:
    topic: str
    partition: int
    offset: int
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int


@dataclass
class KafkaSourceConfig:
    bootstrap: str  # "host:port[,host:port...]"
    topic: str
    group_id: str = "growclip"
    auto_offset_reset: str = "earliest"  # where a partition starts with neither checkpoint nor commit
    # DESIGN §6: the broker holds a JoinGroup for session_timeout_ms / 2, so keep this small
    # (6000/1000 joins in ~3 s; tests use 2000/500 for ~1 s).
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1000
    max_poll_records: int = 500
    request_timeout_ms: int = 10000


class KafkaSource:
    def __init__(self, cfg: KafkaSourceConfig) -> None:
        if cfg.auto_offset_reset not in ("earliest", "latest"):
            raise ValueError(
                f"auto_offset_reset must be 'earliest' or 'latest', got {cfg.auto_offset_reset!r}"
            )
        self.cfg = cfg
        self._lock = threading.Lock()
        self._positions: dict[int, int] = {}  # partition -> next offset to return
        self._lag: dict[int, int] = {}  # snapshot after the last poll
        self._consumer = KafkaConsumer(
            bootstrap_servers=cfg.bootstrap,
            group_id=cfg.group_id,
            client_id=f"growclip-source-{cfg.group_id}",
            enable_auto_commit=False,
            auto_offset_reset=cfg.auto_offset_reset,
            session_timeout_ms=cfg.session_timeout_ms,
            heartbeat_interval_ms=cfg.heartbeat_interval_ms,
            max_poll_records=cfg.max_poll_records,
            request_timeout_ms=cfg.request_timeout_ms,
            # large enough for any record the broker accepted, so an oversized one cannot stall a partition
            max_partition_fetch_bytes=MAX_REQUEST_BYTES,
        )
        self._consumer.subscribe(topics=[cfg.topic], listener=_SeekOnAssign(self))

    # -- consuming ------------------------------------------------------------------------------

    def poll(self, timeout_s: float, max_records: int | None = None) -> list[Message]:
        """Up to ``max_records`` (default: config's max_poll_records) messages, ordered by partition
        then offset; waits at most ``timeout_s`` when none are ready. Advances the tracked positions."""
        batches = self._consumer.poll(timeout_ms=max(0, int(timeout_s * 1000)), max_records=max_records)
        out: list[Message] = []
        advanced: dict[int, int] = {}
        for tp in sorted(batches, key=lambda tp: tp.partition):
            for rec in batches[tp]:
                out.append(
                    Message(
                        topic=rec.topic,
                        partition=rec.partition,
                        offset=rec.offset,
                        value=rec.value,
                        headers=tuple((k, v) for k, v in (rec.headers or ())),
                        timestamp_ms=rec.timestamp,
                    )
                )
            if batches[tp]:
                advanced[tp.partition] = batches[tp][-1].offset + 1
        with self._lock:
            self._positions.update(advanced)
        self._refresh_lag()
        return out

    def _refresh_lag(self) -> None:
        lag: dict[int, int] = {}
        for tp in self._consumer.assignment():
            try:
                highwater = self._consumer.highwater(tp)
            except IllegalStateError:  # revoked by a rebalance since assignment() was read
                continue
            if highwater is None:  # no fetch response for this partition yet
                continue
            with self._lock:
                position = self._positions.get(tp.partition)
            if position is None:
                position = self._consumer.position(tp)  # resolved: a fetch has happened
            lag[tp.partition] = max(0, highwater - position)
        self._lag = lag

    def lag(self) -> dict[int, int]:
        """Per assigned partition: highwater - position, as of the last poll.

        Uses the fetch responses' highwater, not ``end_offsets`` (DESIGN §6: this broker's end
        offsets report the last batch's first offset + 1). Partitions not fetched yet are absent.
        """
        return dict(self._lag)

    # -- positions ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            positions = {str(p): off for p, off in sorted(self._positions.items())}
        return {"topic": self.cfg.topic, "positions": positions}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Adopts stored positions; partitions are sought to them now if assigned, else on assignment."""
        positions = _parse_state(state, self.cfg.topic)
        with self._lock:
            self._positions.update(positions)
        assigned = {tp.partition: tp for tp in self._consumer.assignment()}
        for partition, offset in positions.items():
            if partition in assigned:
                self._consumer.seek(assigned[partition], offset)
        log.info("loaded source positions", extra={"topic": self.cfg.topic, "positions": positions})

    def commit(self, state: Mapping[str, Any] | None = None) -> None:
        """Commits positions to Kafka: those of ``state`` (a :meth:`state_dict` that was saved
        durably) or, by default, the current ones. Only partitions assigned to this member are
        committed; the others belong to another member of the group for now."""
        if state is None:
            with self._lock:
                positions = dict(self._positions)
        else:
            positions = _parse_state(state, self.cfg.topic)
        assigned = {tp.partition for tp in self._consumer.assignment()}
        offsets = {
            TopicPartition(self.cfg.topic, p): OffsetAndMetadata(off, "", -1)
            for p, off in positions.items()
            if p in assigned
        }
        if not offsets:
            return
        self._consumer.commit(offsets=offsets)
        log.debug("committed offsets", extra={"topic": self.cfg.topic, "positions": positions})

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        with self._lock:
            seeks = {tp: self._positions[tp.partition] for tp in assigned if tp.partition in self._positions}
        for tp, offset in seeks.items():
            self._consumer.seek(tp, offset)
        log.info(
            "partitions assigned",
            extra={
                "topic": self.cfg.topic,
                "partitions": sorted(tp.partition for tp in assigned),
                "seeks": {tp.partition: off for tp, off in seeks.items()},
            },
        )

    def close(self) -> None:
        self._consumer.close(autocommit=False)

    def __enter__(self) -> KafkaSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SeekOnAssign(ConsumerRebalanceListener):
    """Runs on the client's IO thread: must not block."""

    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        pass  # positions are kept: they describe what this model has consumed

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._source._on_assigned(assigned)


def _parse_state(state: Mapping[str, Any], topic: str) -> dict[int, int]:
    if state.get("topic") != topic:
        raise ValueError(f"source state is for topic {state.get('topic')!r}, this source reads {topic!r}")
    raw = state.get("positions")
    if not isinstance(raw, Mapping):
        raise ValueError("source state has no 'positions' mapping")
    positions: dict[int, int] = {}
    for key, offset in raw.items():
        partition = int(key)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 or partition < 0:
            raise ValueError(f"bad source position {key!r}: {offset!r}")
        positions[partition] = offset
    return positions


class KafkaDeadLetter:
    """Sends unusable messages, original bytes and headers, to ``<topic>.dlq`` with headers
    ``reason``, ``detail``, ``source-topic``, ``source-partition`` and ``source-offset``."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic + DLQ_SUFFIX
        ensure_topics(bootstrap, [self.topic])
        self._producer = make_producer(bootstrap)

    def send(self, msg: Message, reason: str, detail: str) -> None:
        headers = [
            *msg.headers,
            ("reason", reason.encode("utf-8")),
            ("detail", detail[:_MAX_DETAIL_CHARS].encode("utf-8")),
            ("source-topic", msg.topic.encode("utf-8")),
            ("source-partition", str(msg.partition).encode("ascii")),
            ("source-offset", str(msg.offset).encode("ascii")),
        ]
        future = self._producer.send(self.topic, value=msg.value, headers=headers)
        future.add_errback(
            lambda exc: log.error(
                "dead letter send failed",
                extra={"dlq_topic": self.topic, "source_offset": msg.offset, "error": repr(exc)},
            )
        )

    def flush(self) -> None:
        self._producer.flush()

    def close(self) -> None:
        self._producer.close()

    def __enter__(self) -> KafkaDeadLetter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
