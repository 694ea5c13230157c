"""Across clean restarts on an external broker, no record is lost and none is trained twice."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from growclip_stream.data.kafka_source import KafkaSource, KafkaSourceConfig
from growclip_stream.data.records import RecordLimits, decode_message, is_held_out
from tests.helpers import DAEMON, Daemon

HOLDOUT = 0.05


def start(tmp: Path, broker: str, topic: str, *extra: str) -> Daemon:
    return Daemon(
        tmp,
        f"kafka.bootstrap={broker}",
        f"kafka.topic={topic}",
        "kafka.session_timeout_ms=3000",
        "kafka.heartbeat_interval_ms=500",
        f"loop.holdout_fraction={HOLDOUT}",
        "loop.eval_batch_size=16",
        "train.batch_size=64",
        "growth.min_interval_samples=1200",
        "growth.samples_per_param=0",
        "growth.supernet_steps=5",
        "growth.decline_z=0",
        "growth.min_gain=0",
        # a small search the first 1,500 records pay for before the trigger fires (the search waits
        # for its budget: the default space, scored on 256 samples, would need ~150 steps at 0.5)
        "growth.max_ops_per_step=1",
        "growth.selection_samples=32",
        "growth.search_budget_fraction=0.8",
        "growth.guard_steps=0",
        *extra,
    )


def position(daemon: Daemon) -> int:
    status = daemon.get("/v1/model")
    return int(status["source"]["positions"]["positions"].get("0", 0)) if status else -1


def ids_by_offset(broker: str, topic: str, n: int) -> list[str]:
    src = KafkaSource(
        KafkaSourceConfig(broker, topic, "reader", session_timeout_ms=2000, heartbeat_interval_ms=500)
    )
    out: dict[int, str] = {}
    deadline = time.monotonic() + 60
    while len(out) < n and time.monotonic() < deadline:
        for m in src.poll(1.0):
            out[m.offset] = decode_message(m.value, m.headers, RecordLimits()).id
    src.close()
    assert len(out) == n
    return [out[i] for i in range(n)]


@pytest.mark.slow
def test_restart_resumes_without_loss_or_double_training(tmp_path: Path, broker: str, topic: str) -> None:
    daemon = start(
        tmp_path, broker, topic, "producer.enabled=true", "producer.limit=1500", "producer.rate=3000"
    )
    try:
        daemon.wait_for(lambda: position(daemon) >= 1500, 120, "offset 1500")
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
    first = daemon.manifest()
    p1 = int(first["source"]["positions"]["0"])
    assert 1499 <= p1 <= 1500 and first["growth"]["history"], "trained to the end and grew"

    # Second run: resumes the grown model and its positions; more data arrives while it runs.
    daemon = start(tmp_path, broker, topic)
    try:
        daemon.wait_for(lambda: position(daemon) >= p1, 60, "the resumed position")
        model = daemon.get("/v1/model")
        assert model["generation"] == sum(e["outcome"] != "declined" for e in first["growth"]["history"])
        assert model["architecture"] == first["architecture"]
        out = subprocess.run(
            [*DAEMON, "produce", "--bootstrap", broker, "--topic", topic, "--dataset", "fashion-mnist",
             "--limit", "700", "--seed", "7"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        daemon.wait_for(lambda: position(daemon) >= 2199, 120, "offset 2199")
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
    second = daemon.manifest()
    p2 = int(second["source"]["positions"]["0"])
    assert 2199 <= p2 <= 2200

    # Exactly the non-held-out records below the committed position were trained, each once.
    ids = ids_by_offset(broker, topic, 2200)
    assert second["samples"] == sum(not is_held_out(i, HOLDOUT) for i in ids[:p2])
    assert first["samples"] == sum(not is_held_out(i, HOLDOUT) for i in ids[:p1])
