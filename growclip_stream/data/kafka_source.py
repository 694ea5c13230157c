"""Kafka as a record source with positions kept in the checkpoint, plus the dead-letter topic.

Delivery contract (DESIGN §2): the source tracks, per partition, the offset of the next record it
has *returned* to the caller. :meth:`KafkaSource.state_dict` goes into the checkpoint;
:meth:`KafkaSource.load_state_dict` seeks back to it on restart; :meth:`KafkaSource.commit` writes
positions to Kafka only after the checkpoint holding them is durable. Kafka's committed offsets
are therefore a fallback for a start without a checkpoint, never ahead of what a checkpoint holds.

Identity: positions are offsets into one topic of one Kafka cluster, so
:meth:`KafkaSource.state_dict` carries the topic and the cluster id the broker reports in its
metadata, and :meth:`KafkaSource.load_state_dict` refuses positions read from another topic or
another cluster (an embedded demo broker's, a re-created test cluster's): it logs why and leaves
each partition to start from the group's committed offset, else ``auto_offset_reset``. Applied
to another cluster they would silently skip (or re-read) records. Positions that carry no
cluster id (written by older versions) are applied with a warning.

Assignment: by default the source joins the consumer group and the group assigns partitions
(``subscribe``); with ``partitions`` set it reads exactly those (``assign``, no group membership).

Rebalances: whenever partitions are (re)assigned, the source seeks each one it has a position for
to that position, so a rebalance neither skips nor repeats records for this model. A revoked
partition's position stays in :meth:`~KafkaSource.state_dict` until a state holding it has been
reported durable (passed to :meth:`~KafkaSource.commit`): the checkpoint then records how far this
model read it, and the source forgets it. If it is assigned back before that, the source resumes
from its own position; afterwards, from the group's committed offset (the new owner's progress).

Backpressure: :meth:`~KafkaSource.pause` stops delivery from every assigned partition (and from
partitions assigned later) while the caller keeps calling :meth:`~KafkaSource.poll`, which keeps
the group membership alive (``max_poll_interval_ms``) and returns nothing. Memory stays bounded:
``poll`` returns at most ``max_poll_records`` records, and the client parks at most one fetch
response per paused partition.

Broker outages: ``poll`` never raises on connection errors; it returns ``[]``. While the broker
is unreachable the source checks it again with an exponential, capped backoff, and logs at most
once per backoff period. When the client stays broken after the broker is back (DESIGN §6), or
raises, or stalls (records wait past our position and none arrive for ``stall_timeout_s``), the
source closes it, builds a new one and seeks to its own tracked positions: no record is skipped
or repeated. :attr:`~KafkaSource.connected`, :attr:`~KafkaSource.reconnects` and
:meth:`~KafkaSource.health` report it. Lag keeps the last known highwater per partition, so it
stays right across reconnects.

Threading: one thread drives ``poll``/``pause``/``resume``/``commit``/``load_state_dict``;
``lag()``, ``state_dict()`` and ``health()`` may be read from another thread (metrics,
checkpointer).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import IllegalStateError, KafkaError
from kafka.structs import OffsetAndMetadata

from growclip_stream.data.produce import (
    MAX_REQUEST_BYTES,
    Backoff,
    RecordRejectedError,
    ReliableProducer,
    broker_reachable,
    ensure_topics,
)

log = logging.getLogger(__name__)

DLQ_SUFFIX = ".dlq"
_MAX_DETAIL_CHARS = 1000
_PROBE_TIMEOUT_MS = 1000  # one ListOffsets round trip; a live local broker answers in milliseconds


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
    """The Kafka source's settings; the daemon's ``kafka`` config section is this class (plus the
    few keys only the daemon uses), so each default lives here once."""

    __pydantic_config__ = {"extra": "forbid"}  # noqa: RUF012 - read by the daemon's config validation

    bootstrap: str = "127.0.0.1:9092"  # "host:port[,host:port...]"
    topic: str = "growclip.pairs"
    group_id: str = "growclip"  # group membership (subscribe) and offset commits (both modes)
    auto_offset_reset: str = "earliest"  # where a partition starts with neither checkpoint nor commit
    # DESIGN §6: the broker holds a JoinGroup for session_timeout_ms / 2, so keep this small
    # (6000/1000 joins in ~3 s; tests use 2000/500 for ~1 s).
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1000
    max_poll_records: int = 500
    # a member that does not poll for this long leaves the group (kafka-python's default); the
    # online loop keeps polling a paused source through growth searches, checkpoints and pauses
    max_poll_interval_ms: int = 300_000
    request_timeout_ms: int = 10000
    # None: join the consumer group, which assigns partitions (subscribe). A list of partition
    # numbers, or "all" (every partition the topic has at start): read exactly those (assign), no
    # group membership and no rebalances.
    partitions: list[int] | Literal["all"] | None = None
    # Reconnect backoff, doubling from the first value up to the cap: the client's own reconnects
    # and this source's broker checks and client re-creation. kafka-python's default cap, 30 s,
    # would add up to 30 s to the recovery after an outage.
    reconnect_backoff_ms: int = 100
    reconnect_backoff_max_ms: int = 5000
    # While no records arrive, check this often that the broker still answers (one ListOffsets).
    probe_interval_s: float = 2.0
    # The broker answers and holds records past our position on an assigned, unpaused partition,
    # yet none arrived for this long: the client is stuck, so it is rebuilt.
    stall_timeout_s: float = 15.0
    # kafka-python's TLS/SASL keyword arguments for a secured cluster (kafka_security.client_options)
    security: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.auto_offset_reset not in ("earliest", "latest"):
            raise ValueError(
                f"auto_offset_reset must be 'earliest' or 'latest', got {self.auto_offset_reset!r}"
            )
        if self.partitions is not None and self.partitions != "all":
            parts = self.partitions
            if (
                not isinstance(parts, list | tuple)
                or not parts
                or any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in parts)
                or len(set(parts)) != len(parts)
            ):
                raise ValueError(
                    "partitions must be None, 'all' or a non-empty list of distinct partition numbers, "
                    f"got {parts!r}"
                )
        if not 0 < self.reconnect_backoff_ms <= self.reconnect_backoff_max_ms:
            raise ValueError("need 0 < reconnect_backoff_ms <= reconnect_backoff_max_ms")
        if self.probe_interval_s <= 0 or self.stall_timeout_s <= 0:
            raise ValueError("probe_interval_s and stall_timeout_s must be positive")


@dataclass
class _Health:
    connected: bool = True
    down_since: float | None = None  # monotonic time of the first failure of the current outage
    last_ok: float = field(default_factory=time.monotonic)  # last proof the broker answers us
    last_error: str = ""
    reconnects: int = 0  # outages recovered from
    client_restarts: int = 0  # consumers rebuilt (after a failure, a stall, or reconnect())


class KafkaSource:
    def __init__(self, cfg: KafkaSourceConfig) -> None:
        cfg.__post_init__()  # also when the dataclass was mutated after construction
        self.cfg = cfg
        self._lock = threading.Lock()
        self._positions: dict[int, int] = {}  # partition -> next offset to return (assigned, or loaded)
        self._revoked: dict[int, int] = {}  # revoked partitions whose position is not reported yet
        self._highwater: dict[int, int] = {}  # last highwater seen per partition (kept across clients)
        self._lag: dict[int, int] = {}  # snapshot after the last poll
        self._paused = False
        self._health = _Health()
        backoff_s = (cfg.reconnect_backoff_ms / 1000, cfg.reconnect_backoff_max_ms / 1000)
        self._probe_backoff = Backoff(*backoff_s)
        self._rebuild_backoff = Backoff(*backoff_s)
        self._stall_since: float | None = None
        self._stall_positions: dict[int, int] = {}
        self._awaiting_assignment = False  # a new client has not been assigned partitions yet
        self._cluster_id: str | None = None  # from the broker's metadata, once a client has it
        self._consumer: KafkaConsumer | None = self._create_consumer(cfg.request_timeout_ms * 3)

    # -- the client -------------------------------------------------------------------------------

    def _create_consumer(self, bootstrap_timeout_ms: int) -> KafkaConsumer:
        cfg = self.cfg
        consumer = KafkaConsumer(
            bootstrap_servers=cfg.bootstrap,
            group_id=cfg.group_id,
            client_id=f"growclip-source-{cfg.group_id}",
            enable_auto_commit=False,
            auto_offset_reset=cfg.auto_offset_reset,
            session_timeout_ms=cfg.session_timeout_ms,
            heartbeat_interval_ms=cfg.heartbeat_interval_ms,
            max_poll_records=cfg.max_poll_records,
            max_poll_interval_ms=cfg.max_poll_interval_ms,
            request_timeout_ms=cfg.request_timeout_ms,
            reconnect_backoff_ms=cfg.reconnect_backoff_ms,
            reconnect_backoff_max_ms=cfg.reconnect_backoff_max_ms,
            bootstrap_timeout_ms=bootstrap_timeout_ms,
            # large enough for any record the broker accepted, so an oversized one cannot stall a partition
            max_partition_fetch_bytes=MAX_REQUEST_BYTES,
            **cfg.security,
        )
        try:
            if cfg.partitions is None:
                consumer.subscribe(topics=[cfg.topic], listener=_SeekOnAssign(self, consumer))
                self._awaiting_assignment = True
            else:
                tps = self._static_partitions(consumer)
                consumer.assign(tps)
                self._on_assigned(consumer, set(tps))
        except BaseException:
            consumer.close(autocommit=False, timeout_ms=0)
            raise
        self._note_cluster_id(consumer)
        return consumer

    def _note_cluster_id(self, consumer: KafkaConsumer) -> None:
        """Remember the cluster id from the client's metadata (fetched while bootstrapping)."""
        cluster_id = getattr(getattr(getattr(consumer, "_client", None), "cluster", None), "cluster_id", None)
        if not isinstance(cluster_id, str) or not cluster_id:
            return
        if self._cluster_id is not None and cluster_id != self._cluster_id:
            log.error(
                "the bootstrap servers now answer for another Kafka cluster",
                extra={"topic": self.cfg.topic, "was": self._cluster_id, "now": cluster_id},
            )
        self._cluster_id = cluster_id

    @property
    def cluster_id(self) -> str | None:
        """The Kafka cluster this source reads (None until a client has fetched metadata)."""
        return self._cluster_id

    def _static_partitions(self, consumer: KafkaConsumer) -> list[TopicPartition]:
        wanted = self.cfg.partitions
        existing = consumer.partitions_for_topic(self.cfg.topic)
        if not existing:
            raise KafkaError(f"topic {self.cfg.topic!r} does not exist or has no partitions")
        if wanted == "all":
            chosen = sorted(existing)
        else:
            assert wanted is not None
            missing = sorted(set(wanted) - set(existing))
            if missing:
                raise ValueError(f"topic {self.cfg.topic!r} has no partition(s) {missing}")
            chosen = sorted(wanted)
        return [TopicPartition(self.cfg.topic, p) for p in chosen]

    def _drop_client(self, reason: str) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        try:
            consumer.close(autocommit=False, timeout_ms=0)
        except Exception as e:  # a broken client may fail in any way while closing
            log.debug("closing the old consumer failed", extra={"error": repr(e)})
        log.info(
            "consumer dropped; a new one will be built", extra={"topic": self.cfg.topic, "reason": reason}
        )

    def _try_rebuild(self) -> None:
        """Builds a new client when the backoff allows and the broker accepts connections."""
        if self._consumer is not None or not self._rebuild_backoff.ready():
            return
        try:
            if not broker_reachable(self.cfg.bootstrap):
                raise KafkaError("no bootstrap server accepts connections")
            consumer = self._create_consumer(self.cfg.request_timeout_ms)
        except (KafkaError, OSError) as e:
            delay = self._rebuild_backoff.fail()
            self._mark_down(e, retry_in_s=delay)
            return
        self._consumer = consumer  # the rebuild backoff resets once this client is heard from
        self._health.client_restarts += 1
        self._stall_since = None
        with self._lock:
            positions = dict(self._positions)
        log.info(
            "consumer rebuilt",
            extra={
                "topic": self.cfg.topic,
                "client_restarts": self._health.client_restarts,
                "positions": positions,
            },
        )

    def reconnect(self) -> None:
        """Drops the client and builds a new one now (positions, pause state and lag are kept)."""
        self._drop_client("requested")
        self._rebuild_backoff.reset()
        self._try_rebuild()

    # -- health -----------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the broker answered this source at the last check (poll with records, or probe)."""
        return self._health.connected and self._consumer is not None

    @property
    def reconnects(self) -> int:
        """How many outages this source has recovered from."""
        return self._health.reconnects

    def health(self) -> dict[str, Any]:
        h = self._health
        return {
            "connected": self.connected,
            "paused": self._paused,
            "reconnects": h.reconnects,
            "client_restarts": h.client_restarts,
            "down_for_s": None if h.down_since is None else round(time.monotonic() - h.down_since, 3),
            "last_error": h.last_error,
        }

    def _mark_ok(self) -> None:
        h = self._health
        h.last_ok = time.monotonic()
        self._probe_backoff.reset()
        self._rebuild_backoff.reset()
        if h.down_since is not None:
            h.reconnects += 1
            log.info(
                "broker reachable again",
                extra={
                    "topic": self.cfg.topic,
                    "outage_s": round(h.last_ok - h.down_since, 3),
                    "reconnects": h.reconnects,
                },
            )
            h.down_since = None
        h.connected = True

    def _mark_down(self, err: BaseException, retry_in_s: float) -> None:
        """Records a failure; logs when the outage starts and at most once per backoff period after."""
        h = self._health
        h.connected = False
        h.last_error = repr(err)
        now = time.monotonic()
        first = h.down_since is None
        if first:
            h.down_since = now
        log.warning(
            "broker unreachable" if first else "broker still unreachable",
            extra={
                "topic": self.cfg.topic,
                "error": repr(err),
                "down_for_s": round(now - (h.down_since or now), 3),
                "retry_in_s": round(retry_in_s, 3),
            },
        )

    # -- consuming --------------------------------------------------------------------------------

    def poll(self, timeout_s: float, max_records: int | None = None) -> list[Message]:
        """Up to ``max_records`` (default: config's max_poll_records) messages, ordered by partition
        then offset; waits at most about ``timeout_s`` when none are ready. Advances the tracked
        positions. Returns ``[]`` while paused and while the broker is unreachable; never raises
        on connection errors."""
        if max_records is not None and max_records <= 0:
            raise ValueError(f"max_records must be positive, got {max_records}")
        deadline = time.monotonic() + max(0.0, timeout_s)
        if self._consumer is None:
            self._try_rebuild()
        consumer = self._consumer
        if consumer is None:
            time.sleep(max(0.0, min(deadline - time.monotonic(), self._rebuild_backoff.remaining_s())))
            return []
        try:
            batches = consumer.poll(timeout_ms=max(0, int(timeout_s * 1000)), max_records=max_records)
        except (KafkaError, OSError) as e:
            delay = self._rebuild_backoff.fail()
            self._mark_down(e, retry_in_s=delay)
            self._drop_client(f"poll failed: {e!r}")
            return []
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
            for partition, offset in advanced.items():
                if partition in self._revoked:  # revoked by a rebalance since these were fetched
                    self._revoked[partition] = offset
                else:
                    self._positions[partition] = offset
        if out:
            self._mark_ok()
        else:
            self._maybe_probe(consumer)
        self._refresh_lag(consumer)
        return out

    def _maybe_probe(self, consumer: KafkaConsumer) -> None:
        """While nothing arrives: checks that the broker answers (every probe_interval_s when
        connected, with backoff when not), and that the client is not stuck."""
        now = time.monotonic()
        if self._health.connected:
            if now - self._health.last_ok < self.cfg.probe_interval_s:
                return
        elif not self._probe_backoff.ready():
            return
        try:
            if not broker_reachable(self.cfg.bootstrap):
                raise KafkaError("no bootstrap server accepts connections")
            tps = sorted(consumer.assignment()) or [TopicPartition(self.cfg.topic, 0)]
            ends = consumer.end_offsets(tps, timeout_ms=min(_PROBE_TIMEOUT_MS, self.cfg.request_timeout_ms))
        except (KafkaError, OSError) as e:
            delay = self._probe_backoff.fail()
            self._mark_down(e, retry_in_s=delay)
            down_since = self._health.down_since
            if (
                down_since is not None
                and now - down_since >= self.cfg.stall_timeout_s
                and broker_reachable(self.cfg.bootstrap)
            ):
                self._drop_client("the broker accepts connections but the client gets no answers")
            return
        self._mark_ok()
        self._check_stall(consumer, ends, now)

    def _check_stall(self, consumer: KafkaConsumer, ends: Mapping[TopicPartition, int], now: float) -> None:
        """Rebuilds the client when records wait past our position on an unpaused partition and
        none arrive. Records wait when the last highwater seen, or the broker's end offset, is past
        the position; this broker's end offset is only a lower bound of the highwater (the last
        batch's first offset + 1, DESIGN §6), but it does move past the position when new records
        arrive after a client stopped fetching."""
        if self._paused:
            self._stall_since = None
            return
        with self._lock:
            positions = dict(self._positions)
            highwater = dict(self._highwater)
        waiting: dict[int, int] = {}
        for tp in consumer.assignment():
            end = max(ends.get(tp) or 0, highwater.get(tp.partition, 0))
            position = positions.get(tp.partition)
            if position is None:
                position = self._client_position(consumer, tp)
            if position is not None and end > position:
                waiting[tp.partition] = position
        if not waiting:
            self._stall_since = None
            return
        if self._stall_since is None or waiting != self._stall_positions:
            self._stall_since, self._stall_positions = now, waiting
            return
        if now - self._stall_since >= self.cfg.stall_timeout_s:
            log.warning(
                "consumer stalled: records wait but none arrive",
                extra={
                    "topic": self.cfg.topic,
                    "positions": waiting,
                    "stalled_s": round(now - self._stall_since, 3),
                },
            )
            self._stall_since = None
            self._drop_client("stalled")
            self._try_rebuild()

    @staticmethod
    def _client_position(consumer: KafkaConsumer, tp: TopicPartition) -> int | None:
        try:
            position = consumer.position(tp, timeout_ms=0)
        except (KafkaError, OSError):
            return None
        return position if isinstance(position, int) else None

    # -- backpressure ---------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        """Stops delivery from every assigned partition, and from partitions assigned later, until
        :meth:`resume`. Keep calling :meth:`poll` meanwhile: it keeps the group membership alive and
        returns ``[]``. Positions do not move, so nothing is skipped."""
        self._paused = True
        consumer = self._consumer
        if consumer is not None:
            consumer.pause(*consumer.assignment())
        self._stall_since = None

    def resume(self) -> None:
        """Delivery continues where it stopped."""
        self._paused = False
        consumer = self._consumer
        if consumer is not None:
            consumer.resume(*consumer.paused())
        self._stall_since = None

    # -- lag --------------------------------------------------------------------------------------

    def _refresh_lag(self, consumer: KafkaConsumer) -> None:
        assigned = consumer.assignment()
        if not assigned and self._awaiting_assignment:
            return  # a new client is joining: keep the last lag rather than report none
        lag: dict[int, int] = {}
        for tp in assigned:
            try:
                highwater = consumer.highwater(tp)
            except IllegalStateError:  # revoked by a rebalance since assignment() was read
                continue
            with self._lock:
                if highwater is not None:
                    self._highwater[tp.partition] = highwater
                highwater = self._highwater.get(tp.partition)
                position = self._positions.get(tp.partition)
            if highwater is None:  # no fetch response for this partition yet
                continue
            if position is None:
                position = self._client_position(consumer, tp)
            if position is None:
                continue
            lag[tp.partition] = max(0, highwater - position)
        self._lag = lag

    def lag(self) -> dict[int, int]:
        """Per assigned partition: highwater - position, as of the last poll.

        Uses the fetch responses' highwater, not ``end_offsets`` (DESIGN §6: this broker's end
        offsets report the last batch's first offset + 1). Partitions not fetched yet are absent.
        The last known highwater is kept across client rebuilds, and our own positions are used.
        """
        return dict(self._lag)

    def assignment(self) -> list[int]:
        """The partitions this source reads now (empty while a group join is in progress)."""
        consumer = self._consumer
        if consumer is None:
            return []
        return sorted(tp.partition for tp in consumer.assignment())

    # -- positions --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Positions of the partitions read now, and of revoked ones not reported durable yet, with
        the topic and cluster id they belong to."""
        with self._lock:
            merged = {**self._revoked, **self._positions}
        positions = {str(p): off for p, off in sorted(merged.items())}
        state: dict[str, Any] = {"topic": self.cfg.topic}
        if self._cluster_id is not None:
            state["cluster_id"] = self._cluster_id
        state["positions"] = positions
        return state

    def state_after(self, state: Mapping[str, Any], messages: Sequence[Message]) -> dict[str, Any]:
        """``state`` advanced past ``messages`` (returned by :meth:`poll` in this order): the state a
        checkpoint records when it stops at a record in the middle of a poll."""
        positions = {int(p): off for p, off in state.get("positions", {}).items()}
        for msg in messages:
            positions[msg.partition] = msg.offset + 1
        return {**state, "positions": {str(p): off for p, off in sorted(positions.items())}}

    def load_state_dict(self, state: Mapping[str, Any]) -> bool:
        """Adopts stored positions; partitions are sought to them now if assigned, else on assignment.

        Returns False, and logs an error, when the positions belong to another topic or another
        cluster: then nothing is applied and partitions start from the group's committed offsets
        (else ``auto_offset_reset``). Raises ValueError on a malformed state.
        """
        if not self._same_stream(state):
            return False
        positions = _parse_state(state, self.cfg.topic)
        with self._lock:
            self._positions.update(positions)
            for partition in positions:
                self._revoked.pop(partition, None)
        consumer = self._consumer
        if consumer is not None:
            assigned = {tp.partition: tp for tp in consumer.assignment()}
            for partition, offset in positions.items():
                if partition in assigned:
                    consumer.seek(assigned[partition], offset)
        log.info(
            "loaded source positions",
            extra={"topic": self.cfg.topic, "cluster_id": self._cluster_id, "positions": positions},
        )
        return True

    def _same_stream(self, state: Mapping[str, Any]) -> bool:
        saved_topic, saved_cluster = state.get("topic"), state.get("cluster_id")
        fallback = f"the group's committed offsets, else auto_offset_reset={self.cfg.auto_offset_reset}"
        if saved_topic != self.cfg.topic:
            log.error(
                "source positions belong to another topic; not applied",
                extra={"saved_topic": saved_topic, "topic": self.cfg.topic, "starting_from": fallback},
            )
            return False
        if saved_cluster is None:
            log.warning(
                "source positions carry no cluster id (saved by an older version); applied to this cluster",
                extra={"topic": self.cfg.topic, "cluster_id": self._cluster_id},
            )
            return True
        if saved_cluster != self._cluster_id:
            log.error(
                "source positions were read from another Kafka cluster; not applied",
                extra={
                    "topic": self.cfg.topic,
                    "saved_cluster_id": saved_cluster,
                    "cluster_id": self._cluster_id,
                    "positions": state.get("positions"),
                    "starting_from": fallback,
                },
            )
            return False
        return True

    def commit(self, state: Mapping[str, Any] | None = None) -> bool:
        """Reports ``state`` (a :meth:`state_dict` that was saved durably; by default the current
        positions) as durable, and commits its positions to Kafka.

        Only partitions assigned to this source are committed to Kafka; the others belong to
        another member of the group for now. Revoked partitions whose reported position is their
        final one are forgotten (see the module docstring). Returns False, and logs, when Kafka
        did not take the commit (broker unreachable, rebalance in progress): the checkpoint still
        holds the positions, and Kafka's committed offsets only lag behind it.
        """
        if state is None:
            with self._lock:
                positions = {**self._revoked, **self._positions}
        else:
            positions = _parse_state(state, self.cfg.topic)
        with self._lock:
            for partition, offset in positions.items():
                if self._revoked.get(partition) == offset:
                    del self._revoked[partition]
        consumer = self._consumer
        if consumer is None:
            log.warning("offsets not committed: no connection", extra={"topic": self.cfg.topic})
            return False
        assigned = {tp.partition for tp in consumer.assignment()}
        offsets = {
            TopicPartition(self.cfg.topic, p): OffsetAndMetadata(off, "", -1)
            for p, off in positions.items()
            if p in assigned
        }
        if not offsets:
            return True
        try:
            consumer.commit(offsets=offsets, timeout_ms=self.cfg.request_timeout_ms)
        except (KafkaError, OSError) as e:
            log.warning(
                "offsets not committed",
                extra={"topic": self.cfg.topic, "positions": positions, "error": repr(e)},
            )
            return False
        log.debug("committed offsets", extra={"topic": self.cfg.topic, "positions": positions})
        return True

    # -- rebalance callbacks (client IO thread: must not block) -----------------------------------

    def _on_assigned(self, consumer: KafkaConsumer, assigned: set[TopicPartition]) -> None:
        with self._lock:
            for tp in assigned:
                if tp.partition in self._revoked:
                    self._positions[tp.partition] = self._revoked.pop(tp.partition)
            seeks = {tp: self._positions[tp.partition] for tp in assigned if tp.partition in self._positions}
        for tp, offset in seeks.items():
            consumer.seek(tp, offset)
        if self._paused and assigned:
            consumer.pause(*assigned)
        self._awaiting_assignment = False
        log.info(
            "partitions assigned",
            extra={
                "topic": self.cfg.topic,
                "partitions": sorted(tp.partition for tp in assigned),
                "seeks": {tp.partition: off for tp, off in seeks.items()},
                "paused": self._paused,
            },
        )

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        with self._lock:
            for tp in revoked:
                if tp.partition in self._positions:
                    self._revoked[tp.partition] = self._positions.pop(tp.partition)
                self._lag.pop(tp.partition, None)
        log.info(
            "partitions revoked",
            extra={"topic": self.cfg.topic, "partitions": sorted(tp.partition for tp in revoked)},
        )

    def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.close(autocommit=False)

    def __enter__(self) -> KafkaSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SeekOnAssign(ConsumerRebalanceListener):
    """Runs on the client's IO thread: must not block."""

    def __init__(self, source: KafkaSource, consumer: KafkaConsumer) -> None:
        self._source = source
        self._consumer = consumer

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._source._on_revoked(revoked)

    def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self._source._on_revoked(lost)  # evicted: our positions still describe what this model read

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._source._on_assigned(self._consumer, assigned)


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
    ``reason``, ``detail``, ``source-topic``, ``source-partition`` and ``source-offset``.

    Survives broker outages and restarts like :class:`ReliableProducer`, which it uses: a message
    is kept until the broker acknowledges it, and sent again by a recreated producer after a
    failure (at-least-once). ``send`` never blocks for more than ``max_block_ms`` and never raises
    on connection errors. A message too large for a request goes without its value, with header
    ``value-dropped`` giving the original size. Call :meth:`flush` before reporting a checkpoint
    durable, so that the dead letter holds every record the checkpoint's positions skip.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        max_block_ms: int = 1000,
        security: Mapping[str, Any] | None = None,
    ) -> None:
        self.topic = topic + DLQ_SUFFIX
        ensure_topics(bootstrap, [self.topic], security=security)
        self._producer = ReliableProducer(
            bootstrap, client_id="growclip-dead-letter", max_block_ms=max_block_ms, security=security
        )
        self.failures = 0  # flushes that did not get every message acknowledged

    def send(self, msg: Message, reason: str, detail: str) -> None:
        headers = [
            *msg.headers,
            ("reason", reason.encode("utf-8")),
            ("detail", detail[:_MAX_DETAIL_CHARS].encode("utf-8")),
            ("source-topic", msg.topic.encode("utf-8")),
            ("source-partition", str(msg.partition).encode("ascii")),
            ("source-offset", str(msg.offset).encode("ascii")),
        ]
        try:
            self._producer.send(self.topic, msg.value, headers=headers)
        except RecordRejectedError as e:
            size = len(msg.value or b"")
            log.warning(
                "dead letter value dropped: record refused",
                extra={"dlq_topic": self.topic, "source_offset": msg.offset, "bytes": size, "error": repr(e)},
            )
            self._producer.send(
                self.topic, b"", headers=[*headers, ("value-dropped", str(size).encode("ascii"))]
            )

    @property
    def pending(self) -> int:
        """Messages not acknowledged by the broker yet."""
        return self._producer.pending

    @property
    def connected(self) -> bool:
        return self._producer.healthy

    @property
    def reconnects(self) -> int:
        """Producers recreated after a failure."""
        return self._producer.reconnects

    def maintain(self) -> None:
        """Recreates a failed producer and resends, when due; ``send`` and ``flush`` do it too.
        Call it now and then (every loop iteration is fine: it is cheap) so that messages sent
        before an outage do not wait for the next bad record to be retried."""
        self._producer.maintain()

    def flush(self, timeout_s: float | None = 30.0) -> bool:
        """Waits until every message is acknowledged (True) or ``timeout_s`` passed (False).
        Unacknowledged messages stay queued and are sent again; :attr:`failures` counts the
        flushes that returned False."""
        if self._producer.flush(timeout_s):
            return True
        self.failures += 1
        log.error(
            "dead letter not acknowledged in time; messages kept for the next flush",
            extra={"dlq_topic": self.topic, "pending": self.pending, "timeout_s": timeout_s},
        )
        return False

    def close(self, timeout_s: float = 5.0) -> None:
        """Flushes for at most ``timeout_s``, then closes; what is still unacknowledged then is
        logged as an error (call :meth:`flush` first to wait for it)."""
        self._producer.close(timeout_s)

    def __enter__(self) -> KafkaDeadLetter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
