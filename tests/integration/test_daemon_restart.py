"""Across clean restarts on an external broker, no record is lost and none is trained twice."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from growclip_stream.data.kafka_source import KafkaSource, KafkaSourceConfig
from growclip_stream.data.records import RecordLimits, decode_message, is_held_out

DAEMON = [sys.executable, "-m", "growclip_daemon.cli"]
HOLDOUT = 0.05


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_daemon(tmp: Path, broker: str, topic: str, port: int, *extra: str) -> subprocess.Popen:
    args = [
        "start",
        "--set", f"kafka.bootstrap={broker}",
        "--set", f"kafka.topic={topic}",
        "--set", "kafka.session_timeout_ms=3000",
        "--set", "kafka.heartbeat_interval_ms=500",
        "--set", f"serve.port={port}",
        "--set", f"pidfile={tmp / 'pid'}",
        "--set", f"checkpoint.root={tmp / 'ckpt'}",
        "--set", f"loop.holdout_fraction={HOLDOUT}",
        "--set", "train.batch_size=64",
        "--set", "growth.min_interval_samples=1200",
        "--set", "growth.samples_per_param=0",
        "--set", "growth.supernet_steps=5",
        "--set", "loop.eval_batch_size=16",
        *extra,
    ]  # fmt: skip
    log = (tmp / "daemon.log").open("a")
    return subprocess.Popen(DAEMON + args, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen, tmp: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0, (tmp / "daemon.log").read_text()[-3000:]


def position(port: int) -> int:
    try:
        status = httpx.get(f"http://127.0.0.1:{port}/v1/model", timeout=10).json()
        return int(status["source"]["positions"]["positions"].get("0", 0))
    except (httpx.HTTPError, KeyError, ValueError):
        return -1


def wait_position(proc: subprocess.Popen, port: int, target: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while position(port) < target:
        assert proc.poll() is None, "daemon exited early"
        assert time.monotonic() < deadline, f"never consumed up to offset {target}"
        time.sleep(0.5)


def manifest(tmp: Path) -> dict:
    latest = (tmp / "ckpt" / "LATEST").read_text().strip()
    return json.loads((tmp / "ckpt" / latest / "manifest.json").read_text())


def ids_by_offset(broker: str, topic: str, n: int) -> list[str]:
    src = KafkaSource(KafkaSourceConfig(broker, topic, group_id="reader", session_timeout_ms=2000,
                                        heartbeat_interval_ms=500))  # fmt: skip
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
    port = free_port()
    producer = [
        "--set",
        "producer.enabled=true",
        "--set",
        "producer.limit=1500",
        "--set",
        "producer.rate=3000",
    ]
    proc = run_daemon(tmp_path, broker, topic, port, *producer)
    wait_position(proc, port, 1500)
    stop(proc, tmp_path)
    first = manifest(tmp_path)
    p1 = int(first["source"]["positions"]["0"])
    assert 1499 <= p1 <= 1500 and first["growth"]["history"], "trained to the end and grew"

    # Second run: resumes the grown model and its positions; more data arrives while it runs.
    proc = run_daemon(tmp_path, broker, topic, port)
    try:
        deadline = time.monotonic() + 60
        while position(port) < p1:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.5)
        model = httpx.get(f"http://127.0.0.1:{port}/v1/model", timeout=10).json()
        assert model["generation"] == len(first["growth"]["history"])
        assert model["architecture"] == first["architecture"]
        out = subprocess.run(
            [*DAEMON, "produce", "--bootstrap", broker, "--topic", topic, "--dataset", "fashion-mnist",
             "--limit", "700", "--seed", "7"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        wait_position(proc, port, 2199)
    finally:
        stop(proc, tmp_path)
    second = manifest(tmp_path)
    p2 = int(second["source"]["positions"]["0"])
    assert 2199 <= p2 <= 2200

    # Exactly the non-held-out records below the committed position were trained, each once.
    ids = ids_by_offset(broker, topic, 2200)
    assert second["samples"] == sum(not is_held_out(i, HOLDOUT) for i in ids[:p2])
    assert first["samples"] == sum(not is_held_out(i, HOLDOUT) for i in ids[:p1])
