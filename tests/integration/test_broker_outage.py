"""The source, the dead letter and produce() across a broker that goes away and comes back.

The restart test needs data that survives the broker: the embedded broker's ``memory://`` storage
loses everything when it stops, so it runs on ``s3://`` against a local S3-compatible server
(moto's), DESIGN §6.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition

from growclip_daemon.broker import EmbeddedBroker
from growclip_stream.data.datasets import iter_records
from growclip_stream.data.kafka_source import KafkaDeadLetter, KafkaSource, KafkaSourceConfig, Message
from growclip_stream.data.produce import ReliableProducer, ensure_topics, produce
from growclip_stream.data.records import Record, RecordLimits, decode_message
from tests.helpers import Daemon, create_bucket

LIMITS = RecordLimits()
OUTAGE_S = 30.0  # how long the broker stays down in the restart test
TINY_PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x00\x00\x00\x00:~\x9bU"
    b"\x00\x00\x00\nIDATx\x9cc`\x00\x00\x00\x02\x00\x01H\xaf\xa4q\x00\x00\x00\x00IEND\xaeB`\x82"
)


def records(prefix: str, n: int) -> Iterator[Record]:
    for i in range(n):
        yield Record(id=f"{prefix}-{i:05d}", caption=f"caption {i}", image=TINY_PNG)


def source_cfg(bootstrap: str, topic: str, **overrides: Any) -> KafkaSourceConfig:
    base: dict[str, Any] = {
        "group_id": f"g-{topic}",
        "session_timeout_ms": 2000,
        "heartbeat_interval_ms": 500,
        "request_timeout_ms": 3000,
        "reconnect_backoff_max_ms": 1000,
        "probe_interval_s": 0.5,
    }
    return KafkaSourceConfig(bootstrap=bootstrap, topic=topic, **{**base, **overrides})


def message_ids(msgs: list[Message]) -> list[str]:
    return [decode_message(m.value, m.headers, LIMITS).id for m in msgs]


def poll_until(
    src: KafkaSource, want: set[str], timeout_s: float, in_topic: Callable[[], set[str]] | None = None
) -> list[Message]:
    """Polls until every id in ``want`` arrived (fails on timeout, naming the missing ids and,
    with ``in_topic``, whether the topic holds them: the consumer skipped them or the broker lost them)."""
    out: list[Message] = []
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while not want <= seen:
        if time.monotonic() >= deadline:
            missing = sorted(want - seen)
            where = ""
            if in_topic is not None:
                stored = in_topic()
                kept, lost = sorted(set(missing) & stored), sorted(set(missing) - stored)
                where = f"; in the topic: {kept[:10]}, not in it: {lost[:10]}"
            raise AssertionError(f"{len(missing)} of {len(want)} records missing: {missing[:10]}{where}")
        msgs = src.poll(0.5)
        out += msgs
        seen.update(message_ids(msgs))
    return out


def read_topic(bootstrap: str, topic: str, expect: int, timeout_s: float = 15.0) -> list[Any]:
    reader = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(reader.partitions_for_topic(topic))]
        reader.assign(tps)
        reader.seek_to_beginning(*tps)
        got: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while len(got) < expect and time.monotonic() < deadline:
            for batch in reader.poll(timeout_ms=300).values():
                got.extend(batch)
        return got
    finally:
        reader.close()


# -- a broker that stays down (memory storage, no restart): fast --------------------------------


def test_poll_never_raises_while_the_broker_is_down(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    b = EmbeddedBroker(port=0, log_path=tmp_path / "tansu.log")
    b.start()
    topic = f"down-{uuid.uuid4().hex[:8]}"
    src: KafkaSource | None = None
    dlq: KafkaDeadLetter | None = None
    try:
        ensure_topics(b.bootstrap, [topic, f"{topic}.dlq"])
        produce(b.bootstrap, topic, records("r", 20))
        src = KafkaSource(source_cfg(b.bootstrap, topic))
        dlq = KafkaDeadLetter(b.bootstrap, topic)
        got = poll_until(src, {f"r-{i:05d}" for i in range(20)}, timeout_s=20)
        assert src.connected
        b.stop()

        caplog.set_level(logging.WARNING, logger="growclip_stream.data.kafka_source")
        t_end = time.monotonic() + 4.0
        slowest = 0.0
        while time.monotonic() < t_end:
            t0 = time.monotonic()
            assert src.poll(0.2) == []  # never raises
            slowest = max(slowest, time.monotonic() - t0)
        assert slowest < 1.5, slowest  # a check of a dead broker does not wait out the client's timeout
        assert not src.connected
        health = src.health()
        assert health["down_for_s"] > 2 and health["last_error"]
        # logged when the outage starts, then at most once per (growing) backoff period
        warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert 2 <= len(warnings) <= 12, [r.getMessage() for r in warnings]
        for before, after in itertools.pairwise(warnings):
            assert after.created - before.created >= before.__dict__["retry_in_s"] - 0.05

        t0 = time.monotonic()
        dlq.send(got[0], "bad_json", "sent while the broker is down")  # queued, never raises
        assert time.monotonic() - t0 < 2.5
        assert dlq.pending == 1
    finally:
        if src is not None:
            src.close()
        if dlq is not None:
            dlq.close(timeout_s=0.5)  # its message cannot be delivered any more
        b.stop()


def test_producer_is_recreated_after_a_restart_and_loses_nothing(tmp_path: Path) -> None:
    """DESIGN §6: after a broker restart an idempotent kafka-python producer stays broken (here
    the restarted broker is a fresh cluster, which does not know the producer's id)."""
    topic = f"restart-{uuid.uuid4().hex[:8]}"
    first = EmbeddedBroker(port=0, log_path=tmp_path / "tansu-1.log")
    first.start()
    port = first.port
    second: EmbeddedBroker | None = None
    producer = ReliableProducer(first.bootstrap, backoff_max_s=1.0)
    try:
        ensure_topics(first.bootstrap, [topic])
        for rec in records("before", 20):
            producer.send(topic, rec.id.encode())
        assert producer.flush(10) and producer.delivered == 20
        first.stop()
        second = EmbeddedBroker(port=port, log_path=tmp_path / "tansu-2.log")
        second.start()
        ensure_topics(second.bootstrap, [topic])  # memory storage: the topic is gone with the old broker
        for rec in records("after", 30):
            producer.send(topic, rec.id.encode())
        assert producer.flush(30), f"{producer.pending} records pending"
        assert producer.reconnects >= 1 and producer.healthy
        values = sorted(r.value.decode() for r in read_topic(second.bootstrap, topic, expect=30))
        # at-least-once: every record is there; a resend after a lost acknowledgement may repeat one
        assert set(values) == {f"after-{i:05d}" for i in range(30)}
    finally:
        producer.close()
        first.stop()
        if second is not None:
            second.stop()


# -- a broker restart on durable storage --------------------------------------------------------


@pytest.fixture
def s3_storage(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """An empty bucket, and the environment the broker needs to use it."""
    bucket = create_bucket(s3_endpoint, "tansu")
    for key, value in {
        "AWS_ENDPOINT": s3_endpoint,
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    return f"s3://{bucket}/"


@pytest.mark.slow
def test_source_resumes_by_itself_after_a_broker_restart(tmp_path: Path, s3_storage: str) -> None:
    """Produce, consume part, stop the broker for 30 s while polling, start it again on the same
    port and storage, produce more: every record is consumed exactly once, none lost."""
    assert os.environ["AWS_ALLOW_HTTP"] == "true"
    cluster = f"growclip-{uuid.uuid4().hex[:16]}"  # the same id across the restart: tansu keys storage by it
    first = EmbeddedBroker(port=0, storage=s3_storage, log_path=tmp_path / "tansu-1.log", cluster_id=cluster)
    first.start()
    bootstrap, port = first.bootstrap, first.port
    topic = f"outage-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, [topic, f"{topic}.dlq"], partitions=2)
    assert produce(bootstrap, topic, records("pre", 300)) == 300

    src = KafkaSource(source_cfg(bootstrap, topic))
    dlq = KafkaDeadLetter(bootstrap, topic)
    second: EmbeddedBroker | None = None
    live_stop = threading.Event()
    live: dict[str, Any] = {}

    def produce_live() -> None:  # a producer that runs straight through the outage
        try:
            live["sent"] = produce(bootstrap, topic, records("live", 100_000), rate=40, stop=live_stop)
        except BaseException as e:
            live["error"] = e

    live_thread = threading.Thread(target=produce_live, name="live-producer")
    try:
        consumed: list[Message] = []
        while len(consumed) < 150:
            consumed += src.poll(0.5, max_records=150 - len(consumed))
        dlq.send(consumed[0], "bad_json", "before the outage")
        live_thread.start()
        time.sleep(1.0)

        first.stop()
        down_at = time.monotonic()
        dlq.send(consumed[1], "bad_json", "during the outage")  # queued, delivered after the restart
        polls = 0
        while time.monotonic() - down_at < OUTAGE_S:
            consumed += src.poll(0.5)  # never raises; records buffered before the stop may still come
            polls += 1
        assert polls >= 20
        assert not src.connected and src.health()["down_for_s"] > OUTAGE_S / 2

        second = EmbeddedBroker(
            port=port, storage=s3_storage, log_path=tmp_path / "tansu-2.log", cluster_id=cluster
        )
        second.start()
        assert produce(bootstrap, topic, records("post", 200)) == 200
        time.sleep(1.0)
        live_stop.set()
        live_thread.join(60)
        assert not live_thread.is_alive()
        assert "error" not in live, live.get("error")
        assert live["sent"] > 0

        want = {*(f"pre-{i:05d}" for i in range(300)), *(f"post-{i:05d}" for i in range(200))}
        want |= {f"live-{i:05d}" for i in range(live["sent"])}
        consumed += poll_until(
            src, want - set(message_ids(consumed)), timeout_s=60,
            in_topic=lambda: set(message_ids(read_topic(bootstrap, topic, expect=len(want), timeout_s=30))),
        )  # fmt: skip
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            consumed += src.poll(0.2)

        assert src.connected and src.reconnects >= 1
        assert dlq.flush(30)
        assert dlq.pending == 0
    finally:
        live_stop.set()
        if live_thread.is_alive():
            live_thread.join(30)
        src.close()
        dlq.close()
        first.stop()
        if second is not None:
            dlq_records = read_topic(second.bootstrap, f"{topic}.dlq", expect=2)
            second.stop()

    got = message_ids(consumed)
    # exactly once from the source: no offset twice, none skipped
    by_partition: dict[int, list[int]] = {}
    for m in consumed:
        by_partition.setdefault(m.partition, []).append(m.offset)
    for partition, offsets in by_partition.items():
        assert sorted(offsets) == list(range(len(offsets))), f"partition {partition}"
    twice = {i for i, n in Counter(got).items() if n > 1}
    assert all(i.startswith("live-") for i in twice), twice  # only a recreated producer may write one twice
    for prefix, n in (("pre", 300), ("post", 200), ("live", live["sent"])):
        ids = sorted(i for i in got if i.startswith(prefix + "-"))
        assert set(ids) == {f"{prefix}-{i:05d}" for i in range(n)}, prefix
        if prefix != "live":  # produced while the broker was up: exactly once
            assert len(ids) == n, prefix
    assert sorted(int(p) for p in src.state_dict()["positions"]) == [0, 1]
    assert sum(src.state_dict()["positions"].values()) == len(consumed)
    reasons = sorted(dict(r.headers)["detail"] for r in dlq_records)
    assert reasons[:2] == [b"before the outage", b"during the outage"]


@pytest.mark.slow
def test_daemon_serves_through_a_broker_outage_and_resumes_by_itself(tmp_path: Path, s3_storage: str) -> None:
    """The daemon on an external broker that stops for 30 s mid-stream: it never exits, serving
    answers throughout, consumption resumes by itself, and no record from before the outage is lost."""
    cluster = f"growclip-{uuid.uuid4().hex[:16]}"
    first = EmbeddedBroker(port=0, storage=s3_storage, log_path=tmp_path / "tansu-1.log", cluster_id=cluster)
    first.start()
    bootstrap, port = first.bootstrap, first.port
    topic = f"daemon-outage-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, [topic, f"{topic}.dlq"])
    produce(bootstrap, topic, iter_records("fashion-mnist", seed=11), limit=600)
    daemon = Daemon(
        tmp_path,
        f"kafka.bootstrap={bootstrap}",
        f"kafka.topic={topic}",
        "kafka.session_timeout_ms=3000",
        "kafka.heartbeat_interval_ms=500",
        "growth.enabled=false",
        "train.batch_size=32",
    )
    second: EmbeddedBroker | None = None

    def position() -> int:
        status = daemon.get("/v1/model")
        return int(status["source"]["positions"]["positions"].get("0", 0)) if status else -1

    try:
        daemon.wait_for(lambda: position() >= 600, 120, "the first 600 records")
        first.stop()
        answered, deadline = 0, time.monotonic() + OUTAGE_S
        while time.monotonic() < deadline:  # serving answers throughout the outage
            assert daemon.proc.poll() is None, daemon.log_tail()
            resp = daemon.client.post("/v1/embeddings", json={"input": ["a photo of a dress"]})
            assert resp.status_code == 200, resp.text
            answered += 1
            time.sleep(0.25)
        assert answered > 50
        second = EmbeddedBroker(
            port=port, storage=s3_storage, log_path=tmp_path / "tansu-2.log", cluster_id=cluster
        )
        second.start()
        produce(bootstrap, topic, iter_records("fashion-mnist", seed=12), limit=400)
        daemon.wait_for(lambda: position() >= 1000, 120, "consumption to resume by itself")
    finally:
        code = daemon.stop()
        if second is not None:
            second.stop()
        first.stop()
    assert code == 0, daemon.log_tail()
    assert int(daemon.manifest()["source"]["positions"]["0"]) >= 999  # every record settled, none lost
