"""KafkaSource, KafkaDeadLetter and produce() against the real embedded broker."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from growclip_daemon.broker import EmbeddedBroker
from growclip_stream.data.decode import DecodePipeline, Routed, SettledStates
from growclip_stream.data.images import ImageTransform
from growclip_stream.data.kafka_source import KafkaDeadLetter, KafkaSource, KafkaSourceConfig, Message
from growclip_stream.data.pipeline import Decoder
from growclip_stream.data.produce import ensure_topics, produce
from growclip_stream.data.records import Record, RecordLimits, decode_message

LIMITS = RecordLimits()
TINY_PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x00\x00\x00\x00:~\x9bU"
    b"\x00\x00\x00\nIDATx\x9cc`\x00\x00\x00\x02\x00\x01H\xaf\xa4q\x00\x00\x00\x00IEND\xaeB`\x82"
)


def records(n: int, start: int = 0) -> Iterator[Record]:
    for i in range(start, start + n):
        yield Record(id=f"rec-{i:05d}", caption=f"caption {i}", image=TINY_PNG)


def source(broker: str, topic: str, group: str, **overrides: Any) -> KafkaSource:
    return KafkaSource(
        KafkaSourceConfig(
            bootstrap=broker,
            topic=topic,
            group_id=group,
            session_timeout_ms=2000,
            heartbeat_interval_ms=500,
            **overrides,
        )
    )


def consume(src: KafkaSource, n: int, timeout_s: float = 20.0, batch: int | None = None) -> list[Message]:
    """Polls until n messages arrived (fails on timeout); never asks for more than n."""
    out: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n:
        assert time.monotonic() < deadline, f"got {len(out)} of {n} messages"
        want = n - len(out) if batch is None else min(batch, n - len(out))
        out.extend(src.poll(0.5, max_records=want))
    return out


def assert_quiet(src: KafkaSource, seconds: float = 1.0) -> None:
    """No further message arrives."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        extra = src.poll(0.2)
        assert not extra, f"unexpected messages at offsets {[(m.partition, m.offset) for m in extra]}"


def ids(msgs: list[Message]) -> list[str]:
    return [decode_message(m.value, m.headers, LIMITS).id for m in msgs]


@pytest.mark.parametrize("fmt", ["json", "binary"])
def test_consumes_everything_exactly_once(broker: str, topic: str, fmt: str) -> None:
    assert produce(broker, topic, records(150), fmt=fmt) == 150  # type: ignore[arg-type]
    with source(broker, topic, f"g-{topic}") as src:
        msgs = consume(src, 150)
        assert_quiet(src)
        assert [m.offset for m in msgs] == list(range(150))
        assert sorted(ids(msgs)) == [f"rec-{i:05d}" for i in range(150)]
        first = decode_message(msgs[0].value, msgs[0].headers, LIMITS)
        assert first.caption == "caption 0" and first.image == TINY_PNG
        assert all(m.topic == topic and m.timestamp_ms > 0 for m in msgs)
        if fmt == "binary":
            assert dict(msgs[0].headers)["content-type"] == b"image/png"
        assert src.state_dict() == {"topic": topic, "cluster_id": src.cluster_id, "positions": {"0": 150}}
        assert src.cluster_id, "the broker's metadata names its cluster"


def test_state_dict_resumes_without_duplicates_or_gaps(broker: str, topic: str) -> None:
    ensure_topics(broker, [topic + "-p3"], partitions=3)
    topic = topic + "-p3"
    produce(broker, topic, records(300))
    group = f"g-{topic}"
    with source(broker, topic, group) as first:
        part1 = consume(first, 120, batch=40)
        state = json.loads(json.dumps(first.state_dict()))  # JSON-safe, as in a checkpoint manifest
    assert state["topic"] == topic
    assert sum(state["positions"].values()) == 120  # offsets start at 0 in every partition
    by_partition = {
        p: max(m.offset for m in part1 if m.partition == p) + 1 for p in {m.partition for m in part1}
    }
    assert state["positions"] == {str(p): off for p, off in sorted(by_partition.items())}

    # Same group, nothing committed: without the state it would start again at offset 0.
    with source(broker, topic, group) as second:
        second.load_state_dict(state)
        part2 = consume(second, 180)
        assert_quiet(second)
        assert second.state_dict()["positions"] == {
            str(p): n for p, n in sorted(_counts(part1 + part2).items())
        }
    got = ids(part1) + ids(part2)
    assert len(got) == len(set(got)) == 300
    for p in range(3):  # contiguous offsets per partition: no gap, no repeat
        offs = sorted(m.offset for m in part1 + part2 if m.partition == p)
        assert offs == list(range(len(offs)))


def _counts(msgs: list[Message]) -> dict[int, int]:
    out: dict[int, int] = {}
    for m in msgs:
        out[m.partition] = max(out.get(m.partition, 0), m.offset + 1)
    return out


def test_load_state_dict_after_assignment_seeks_at_once(broker: str, topic: str) -> None:
    produce(broker, topic, records(50))
    with source(broker, topic, f"g-{topic}") as src:
        consume(src, 10)
        src.load_state_dict({"topic": topic, "positions": {"0": 40}})
        rest = consume(src, 10)
        assert [m.offset for m in rest] == list(range(40, 50))
        assert_quiet(src, 0.5)
        assert src.load_state_dict({"topic": "other", "positions": {"0": 1}}) is False  # refused
        assert src.state_dict()["positions"] == {"0": 50}
        with pytest.raises(ValueError, match="position"):
            src.load_state_dict({"topic": topic, "positions": {"0": -1}})


def test_positions_from_another_cluster_are_refused_not_applied(
    broker: str, topic: str, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint written against one cluster (e.g. the embedded demo broker) names offsets that
    mean nothing on another one with the same topic: applying them would skip its first records."""
    other = EmbeddedBroker(log_path=tmp_path / "other.log")
    other.start()
    try:
        ensure_topics(other.bootstrap, [topic])
        produce(other.bootstrap, topic, records(40))
        with source(other.bootstrap, topic, "g-demo") as demo:
            consume(demo, 30)
            saved = json.loads(json.dumps(demo.state_dict()))
        assert saved["cluster_id"] == other.cluster_id and saved["positions"] == {"0": 30}
    finally:
        other.stop()

    produce(broker, topic, records(40, start=100))
    with source(broker, topic, f"g-{topic}") as src, caplog.at_level(logging.ERROR):
        assert src.cluster_id != saved["cluster_id"]
        assert src.load_state_dict(saved) is False
        msgs = consume(src, 40)  # from the start of this cluster's topic: nothing skipped
    assert [m.offset for m in msgs] == list(range(40))
    assert ids(msgs)[0] == "rec-00100"
    refusal = [r for r in caplog.records if "another Kafka cluster" in r.getMessage()]
    assert refusal and refusal[0].saved_cluster_id == saved["cluster_id"]  # type: ignore[attr-defined]

    # positions from this cluster still apply
    with source(broker, topic, f"g2-{topic}") as again:
        assert again.load_state_dict({**saved, "cluster_id": again.cluster_id}) is True
        assert [m.offset for m in consume(again, 10)] == list(range(30, 40))


def test_commit_moves_the_group_forward(broker: str, topic: str) -> None:
    produce(broker, topic, records(100))
    group = f"g-{topic}"
    with source(broker, topic, group) as first:
        consume(first, 30)
        saved = first.state_dict()  # what a durable checkpoint would hold
        consume(first, 40)
        first.commit(saved)  # only what the checkpoint holds
    with source(broker, topic, group) as second:
        msgs = consume(second, 20)
        assert msgs[0].offset == 30
        second.commit()  # the tracked positions
    with source(broker, topic, group) as third:
        msgs = consume(third, 50)
        assert [m.offset for m in msgs] == list(range(50, 100))
        assert_quiet(third, 0.5)


def test_lag_decreases_to_zero(broker: str, topic: str) -> None:
    produce(broker, topic, records(200))
    with source(broker, topic, f"g-{topic}") as src:
        assert src.lag() == {}  # nothing fetched yet
        seen: list[int] = []
        consumed = 0
        while consumed < 200:
            consumed += len(src.poll(0.5, max_records=50))
            if 0 in src.lag():
                seen.append(src.lag()[0])
                assert seen[-1] == 200 - consumed
        assert src.poll(0.3) == []
        assert src.lag() == {0: 0}
    assert seen == sorted(seen, reverse=True) and seen[0] > 0 and seen[-1] == 0
    # more data arrives: lag rises again
    produce(broker, topic, records(7, start=200))
    with source(broker, topic, f"g2-{topic}") as src:
        src.load_state_dict({"topic": topic, "positions": {"0": 200}})
        first = consume(src, 1)
        assert first[0].offset == 200
        assert src.lag() == {0: 6}
        consume(src, 6)
        assert src.lag() == {0: 0}


def test_dead_letter_keeps_original_bytes_and_says_why(broker: str, topic: str) -> None:
    garbage = b"\x00\xffnot json at all"
    produce(broker, topic, records(1))
    p = KafkaProducer(bootstrap_servers=broker)
    p.send(topic, value=garbage, headers=[("trace", b"t-1")])
    p.flush()
    p.close()
    with source(broker, topic, f"g-{topic}") as src, KafkaDeadLetter(broker, topic) as dlq:
        msgs = consume(src, 2)
        bad = msgs[1]
        dlq.send(bad, "bad_utf8", "value is not UTF-8 at byte 0" + " and more" * 200)
        dlq.flush()
    reader = KafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False)
    tp = TopicPartition(f"{topic}.dlq", 0)
    reader.assign([tp])
    reader.seek_to_beginning(tp)
    got: list[Any] = []
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        for batch in reader.poll(timeout_ms=500).values():
            got.extend(batch)
    reader.close()
    assert len(got) == 1
    rec = got[0]
    headers = dict(rec.headers)
    assert rec.value == garbage
    assert headers["reason"] == b"bad_utf8"
    assert headers["detail"].startswith(b"value is not UTF-8") and len(headers["detail"]) <= 1000
    assert headers["source-topic"] == topic.encode()
    assert headers["source-partition"] == b"0"
    assert headers["source-offset"] == b"1"
    assert headers["trace"] == b"t-1"  # the original headers travel too


def test_large_records_pass_through(broker: str, topic: str) -> None:
    """Records above the client's 1 MB defaults (including ones our limits reject) still flow,
    so an oversized record reaches the dead letter instead of stalling the partition."""
    big = Record(id="big", caption="big", image=TINY_PNG + b"\x00" * 3_000_000)
    produce(broker, topic, [big, *records(3)], fmt="binary")
    with source(broker, topic, f"g-{topic}") as src:
        msgs = consume(src, 4)
    assert len(msgs[0].value) == len(big.image)
    assert ids(msgs[1:]) == ["rec-00000", "rec-00001", "rec-00002"]


def test_produce_rate_limit_and_stop(broker: str, topic: str) -> None:
    t0 = time.monotonic()
    assert produce(broker, topic, records(1000), rate=200, limit=60) == 60
    elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed <= 1.5, elapsed  # ~0.3 s of pacing at 200/s, plus the client

    stop = threading.Event()
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    try:
        t0 = time.monotonic()
        sent = produce(broker, topic, records(10_000), rate=50, stop=stop)
        assert time.monotonic() - t0 < 2.0
        assert 5 <= sent <= 30, sent
    finally:
        timer.cancel()
    with source(broker, topic, f"g-{topic}") as src:
        consume(src, 60 + sent)
        assert_quiet(src, 0.5)


def test_ensure_topics_is_idempotent(broker: str, topic: str) -> None:
    ensure_topics(broker, [topic, topic, f"{topic}.dlq"])
    ensure_topics(broker, [topic + "-new"], partitions=2)
    ensure_topics(broker, [topic + "-new"], partitions=2)
    c = KafkaConsumer(bootstrap_servers=broker)
    try:
        assert c.partitions_for_topic(topic + "-new") == {0, 1}
    finally:
        c.close()


def offsets_by_partition(msgs: list[Message]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for m in msgs:
        out.setdefault(m.partition, []).append(m.offset)
    return {p: sorted(offs) for p, offs in sorted(out.items())}


def assert_contiguous(msgs: list[Message]) -> None:
    """Every partition read from offset 0 without a gap or a repeat."""
    for partition, offs in offsets_by_partition(msgs).items():
        assert offs == list(range(len(offs))), f"partition {partition}: {offs}"


class Member:
    """A group member polling in its own thread, as each daemon does in its loop; it commits after
    every poll that returned records (as if each were a durable checkpoint), and on request."""

    def __init__(self, src: KafkaSource) -> None:
        self.src = src
        self.got: list[Message] = []
        self.assigned: list[int] = []
        self.states: list[tuple[list[int], dict[str, Any]]] = []  # (assignment, state_dict()) per poll
        self.commit_requested = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                msgs = self.src.poll(0.2)
                self.got += msgs
                if msgs or self.commit_requested.is_set():
                    self.commit_requested.clear()
                    self.src.commit()
                assigned = self.src.assignment()
                self.states.append((assigned, self.src.state_dict()))
                self.assigned = assigned
            self.src.commit()  # the final checkpoint before leaving
        except BaseException as e:
            self.error = e
        finally:
            self.src.close()

    def leave(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive() and self.error is None, self.error


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_group_members_split_partitions_and_hand_over_without_duplicates(broker: str, topic: str) -> None:
    """Two members of one group: every record is consumed by exactly one of them, also when one
    leaves and the other takes its partitions over from the committed offsets."""
    topic = topic + "-p4"
    ensure_topics(broker, [topic], partitions=4)
    group = f"g-{topic}"
    produce(broker, topic, records(100))
    first = source(broker, topic, group)
    before = consume(first, 100)
    assert first.commit()  # as after a durable checkpoint
    assert first.assignment() == [0, 1, 2, 3]

    a = Member(first)
    b = Member(source(broker, topic, group))
    try:
        # settled when both own partitions and none is owned twice
        wait_for(
            lambda: bool(a.assigned and b.assigned) and sorted(a.assigned + b.assigned) == [0, 1, 2, 3],
            "the group did not settle",
        )
        # a's revoked partitions stayed in its state until a state holding them was reported
        # durable (nothing new arrived, so a has not committed since the rebalance)
        assigned, state = a.states[-1]
        assert len(assigned) == 2 and len(state["positions"]) == 4
        a.commit_requested.set()
        wait_for(
            lambda: not a.commit_requested.is_set() and len(a.states[-1][1]["positions"]) == 2,
            "a's revoked positions were not dropped after the commit",
        )
        assert sorted(int(p) for p in a.states[-1][1]["positions"]) == a.assigned

        produce(broker, topic, records(400, start=100))
        wait_for(lambda: len(before) + len(a.got) + len(b.got) >= 500, "records 100-499 did not all arrive")
        assert b.got and a.got
        assert {m.partition for m in b.got} == set(b.assigned)

        b.leave()
        produce(broker, topic, records(100, start=500))
        wait_for(lambda: len(before) + len(a.got) + len(b.got) >= 600, "records 500-599 did not all arrive")
        wait_for(lambda: a.assigned == [0, 1, 2, 3], "a did not take b's partitions over")
        time.sleep(1.0)  # nothing more may arrive
    finally:
        a.leave()
        if b.thread.is_alive():
            b.leave()
    everything = before + a.got + b.got
    assert sorted(ids(everything)) == [f"rec-{i:05d}" for i in range(600)]  # each exactly once
    assert_contiguous(everything)


def test_static_assignment_reads_exactly_the_given_partitions(broker: str, topic: str) -> None:
    topic = topic + "-p3"
    ensure_topics(broker, [topic], partitions=3)
    produce(broker, topic, records(150))
    with source(broker, topic, f"g-all-{topic}", partitions="all") as every:
        assert every.assignment() == [0, 1, 2]
        msgs = consume(every, 150)
        assert_quiet(every, 0.5)
    assert_contiguous(msgs)
    in_p1 = sorted(m.offset for m in msgs if m.partition == 1)
    assert 0 < len(in_p1) < 150

    group = f"g-one-{topic}"
    with source(broker, topic, group, partitions=[1]) as one:
        assert one.assignment() == [1]
        got = consume(one, len(in_p1))
        assert_quiet(one, 0.5)
        assert [m.offset for m in got] == in_p1 and {m.partition for m in got} == {1}
        assert one.state_dict()["positions"] == {"1": len(in_p1)}
        assert one.commit()
    # the commit made without group membership is the group's offset: a member starts after it
    with source(broker, topic, group) as member:
        rest = consume(member, 150 - len(in_p1))
        assert_quiet(member, 0.5)
        assert 1 not in {m.partition for m in rest}

    with pytest.raises(ValueError, match="partitions"):
        KafkaSourceConfig(bootstrap=broker, topic=topic, partitions=[])
    with pytest.raises(ValueError, match="no partition"):
        source(broker, topic, group, partitions=[1, 7])


def test_pause_stops_delivery_and_resume_continues_without_loss(broker: str, topic: str) -> None:
    produce(broker, topic, records(100))
    with source(broker, topic, f"g-{topic}") as src:
        first = consume(src, 30, batch=10)
        src.pause()
        assert src.paused and src.health()["paused"]
        t0 = time.monotonic()
        polls = 0
        while time.monotonic() - t0 < 1.5:  # the caller keeps polling: membership stays alive
            assert src.poll(0.1) == []
            polls += 1
        assert polls >= 5
        produce(broker, topic, records(50, start=100))
        assert src.poll(0.5) == []
        assert src.state_dict()["positions"] == {"0": 30}
        src.resume()
        assert not src.paused
        rest = consume(src, 120)
        assert_quiet(src)
    assert [m.offset for m in first + rest] == list(range(150))
    assert ids(first + rest) == [f"rec-{i:05d}" for i in range(150)]


def test_reconnect_rebuilds_the_client_at_the_tracked_positions(broker: str, topic: str) -> None:
    produce(broker, topic, records(100))
    with source(broker, topic, f"g-{topic}") as src:
        part1 = consume(src, 40)
        src.pause()
        src.reconnect()  # what the source does by itself when its client stays broken
        assert src.health()["client_restarts"] == 1
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.0:
            assert src.poll(0.2) == []  # the new client is paused too
        src.resume()
        part2 = consume(src, 60)
        assert_quiet(src, 0.5)
        assert src.lag() == {0: 0}
    assert [m.offset for m in part1 + part2] == list(range(100))


def test_a_stalled_client_is_rebuilt(broker: str, topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    produce(broker, topic, records(50))
    with source(broker, topic, f"g-{topic}", stall_timeout_s=1.0, probe_interval_s=0.2) as src:
        part1 = consume(src, 10)
        # the client silently stops delivering, although records wait: the source must notice
        monkeypatch.setattr(src._consumer, "poll", lambda *args, **kwargs: {})
        part2 = consume(src, 40, timeout_s=30)
        assert src.health()["client_restarts"] == 1
        assert src.connected
    assert [m.offset for m in part1 + part2] == list(range(50))


def test_source_feeds_the_decode_pipeline_with_backpressure(broker: str, topic: str) -> None:
    """The online loop's ingest: poll at most what the pipeline has room for, pause the source
    while it has none; every record comes out once, in order, and the settled state follows."""
    produce(broker, topic, records(300))
    decoder = Decoder(ImageTransform(size=8, channels=1), LIMITS)
    routed: list[Routed[Message]] = []
    paused_polls = 0
    with (
        source(broker, topic, f"g-{topic}") as src,
        DecodePipeline[Message](decoder, 0.1, num_workers=2, max_in_flight=32) as pipe,
    ):
        ledger = SettledStates(src.state_dict())
        deadline = time.monotonic() + 30
        while len(routed) < 300:
            assert time.monotonic() < deadline, f"routed {len(routed)} of 300"
            room = pipe.room()
            if room == 0 and not src.paused:
                src.pause()
            elif room > 0 and src.paused:
                src.resume()
            msgs = src.poll(0.05, max_records=max(1, min(room, 50)))
            if src.paused:
                assert msgs == []
                paused_polls += 1
            pipe.submit(msgs)
            ledger.submitted(len(msgs), src.state_dict())
            out = pipe.take(max_items=10, timeout_s=0.01)  # a consumer slower than the source
            ledger.taken(len(out))
            routed += out
            assert pipe.in_flight() <= 32
        assert_quiet(src, 0.5)
        assert paused_polls > 0
        assert ledger.settled() == src.state_dict()
        assert src.state_dict() == {"topic": topic, "cluster_id": src.cluster_id, "positions": {"0": 300}}
    assert [r.message.offset for r in routed] == list(range(300))
    assert {r.status for r in routed} <= {"trained", "held_out"}
    assert ids([r.message for r in routed]) == [f"rec-{i:05d}" for i in range(300)]
