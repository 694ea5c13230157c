"""1,000 good records and malformed ones of every kind: each good one trained on or held out, each bad
one in the dead letter with its reason, the daemon alive and serving throughout."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from growclip_stream.data.datasets import iter_records
from growclip_stream.data.kafka_source import KafkaSource, KafkaSourceConfig
from growclip_stream.data.produce import make_producer
from growclip_stream.data.records import encode_json
from tests.helpers import Daemon
from tests.unit.data.test_records import BAD_INPUTS

GOOD = 1000
COPIES = 2  # of each kind of bad record


def ingest_counts(daemon: Daemon) -> Counter[str]:
    """Records routed so far, by status, from the daemon's metrics."""
    out: Counter[str] = Counter()
    try:
        text = daemon.client.get("/metrics").text
    except httpx.HTTPError:
        return out
    for family in text_string_to_metric_families(text):
        if family.name == "growclip_ingest_records":
            for s in family.samples:
                if s.name.endswith("_total"):
                    out[s.labels["status"]] += int(s.value)
    return out


@pytest.mark.slow
def test_bad_records_are_dead_lettered_and_good_ones_trained(tmp_path: Path, broker: str, topic: str) -> None:
    producer = make_producer(broker)
    pending = []  # (future, expected reason, original bytes) of each bad record
    good = iter_records("fashion-mnist", seed=3)
    kinds = sorted(BAD_INPUTS)
    assert len(kinds) >= 10
    bad_plan = [k for k in kinds for _ in range(COPIES)]
    every = GOOD // len(bad_plan)
    for i in range(GOOD):
        producer.send(topic, value=encode_json(next(good)))
        if i % every == 0 and bad_plan:
            reason = bad_plan.pop()
            value, headers = BAD_INPUTS[reason]()
            pending.append((producer.send(topic, value=value, headers=headers or []), reason, value))
    producer.flush()
    # offset -> (expected reason, original bytes)
    sent_bad = {future.get(timeout=30).offset: (reason, value) for future, reason, value in pending}
    producer.close()
    total = GOOD + len(sent_bad)
    assert len(sent_bad) == len(kinds) * COPIES

    daemon = Daemon(
        tmp_path,
        f"kafka.bootstrap={broker}",
        f"kafka.topic={topic}",
        "kafka.session_timeout_ms=3000",
        "kafka.heartbeat_interval_ms=500",
        "growth.enabled=false",
        "train.batch_size=64",
        "loop.holdout_fraction=0.05",
    )
    try:
        counts = daemon.wait_for(
            lambda: (c := ingest_counts(daemon)) and sum(c.values()) >= total and c,
            180,
            f"{total} records routed",
        )
        assert sum(counts.values()) == total
        assert counts["trained"] + counts["held_out"] == GOOD
        bad_counts = {r: n for r, n in counts.items() if r not in ("trained", "held_out")}
        assert bad_counts == dict.fromkeys(kinds, COPIES)
        # still alive and serving
        assert daemon.client.get("/healthz").status_code == 200
        assert daemon.client.post("/v1/embeddings", json={"input": ["a photo of a bag"]}).status_code == 200
    finally:
        assert daemon.stop() == 0, daemon.log_tail()

    # every bad record is in the dead letter, with its reason and its original bytes
    dlq_cfg = KafkaSourceConfig(
        broker, f"{topic}.dlq", "dlq-reader", session_timeout_ms=2000, heartbeat_interval_ms=500
    )
    dlq = KafkaSource(dlq_cfg)
    seen: dict[int, tuple[str, bytes]] = {}
    deadline = time.monotonic() + 60
    while len(seen) < len(sent_bad) and time.monotonic() < deadline:
        for m in dlq.poll(1.0):
            headers = dict(m.headers)
            seen[int(headers["source-offset"])] = (headers["reason"].decode(), m.value)
    dlq.close()
    assert seen == sent_bad

    # the final checkpoint holds exactly the trained good records (a lone leftover waits for the next run)
    assert daemon.manifest()["samples"] in (counts["trained"], counts["trained"] - 1)
