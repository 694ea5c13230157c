"""1,000 good records and malformed ones of every kind: each good one trained on or held out, each bad
one in the dead letter with its reason, the daemon alive and serving throughout."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
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
from tests.unit.data.test_records import BAD_INPUTS

DAEMON = [sys.executable, "-m", "growclip_daemon.cli"]
GOOD = 1000
COPIES = 2  # of each kind of bad record


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ingest_counts(client: httpx.Client) -> Counter[str]:
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(client.get("/metrics").text):
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

    port = free_port()
    args = [
        "start",
        "--set", f"kafka.bootstrap={broker}",
        "--set", f"kafka.topic={topic}",
        "--set", "kafka.session_timeout_ms=3000",
        "--set", "kafka.heartbeat_interval_ms=500",
        "--set", f"serve.port={port}",
        "--set", f"pidfile={tmp_path / 'pid'}",
        "--set", f"checkpoint.root={tmp_path / 'ckpt'}",
        "--set", "growth.enabled=false",
        "--set", "train.batch_size=64",
        "--set", "loop.holdout_fraction=0.05",
    ]  # fmt: skip
    log = (tmp_path / "daemon.log").open("w")
    proc = subprocess.Popen(DAEMON + args, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        deadline = time.monotonic() + 180
        counts: Counter[str] = Counter()
        while sum(counts.values()) < total:
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (
                f"only {sum(counts.values())} of {total} records routed: {counts}"
            )
            time.sleep(1)
            try:
                counts = ingest_counts(client)
            except httpx.HTTPError:
                continue
        assert counts["trained"] + counts["held_out"] == GOOD
        assert {r: n for r, n in counts.items() if r not in ("trained", "held_out")} == dict.fromkeys(
            kinds, COPIES
        )
        # still alive and serving
        assert client.get("/healthz").status_code == 200
        assert client.post("/v1/embeddings", json={"input": ["a photo of a bag"]}).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=90)
    assert code == 0

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
    latest = (tmp_path / "ckpt" / "LATEST").read_text().strip()
    manifest = json.loads((tmp_path / "ckpt" / latest / "manifest.json").read_text())
    assert manifest["samples"] in (counts["trained"], counts["trained"] - 1)
