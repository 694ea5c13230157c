"""The daemon's lifecycle: a long growth search neither blocks checkpoints nor loses the consumer
group and is cancelled at stop; one daemon per checkpoint root; a dead child stops the daemon
non-zero; a dead letter that cannot be written holds checkpoints back and fails the stop."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from kafka import KafkaAdminClient

from growclip_stream.data.datasets import iter_records
from growclip_stream.data.records import Record, is_held_out
from growclip_stream.data.shards import read_dead_letter, write_parquet_shards
from tests.helpers import Daemon, child_pids

TOKEN = "lifecycle-test-token"
QUIET = ("evaluation.enabled=false", "serve.drift_probe_size=0")  # no extra threads competing for CPU


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def metrics(daemon: Daemon) -> str:
    try:
        return daemon.client.get("/metrics").text
    except Exception:
        return ""


def admin(daemon: Daemon, route: str, timeout_s: float = 150) -> tuple[int, dict]:
    resp = daemon.client.post(
        f"/admin/{route}", headers={"authorization": f"Bearer {TOKEN}"}, timeout=timeout_s
    )
    return resp.status_code, resp.json()


def committed_offset(broker: str, group: str, topic: str) -> int | None:
    client = KafkaAdminClient(bootstrap_servers=broker)
    try:
        offsets = client.list_group_offsets({group: None}).get(group, {})
    finally:
        client.close()
    for tp, meta in offsets.items():
        if tp.topic == topic and tp.partition == 0:
            return int(meta.offset)
    return None


@pytest.mark.slow
def test_a_long_growth_search_keeps_checkpointing_keeps_the_group_and_is_cancelled_at_stop(
    tmp_path: Path, broker: str, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GROWCLIP_ADMIN_TOKEN", TOKEN)
    poll_interval_ms = 20_000  # above one supernet step even on a loaded machine
    daemon = Daemon(
        tmp_path,
        f"kafka.bootstrap={broker}",
        f"kafka.topic={topic}",
        f"kafka.group_id={topic}",
        "kafka.session_timeout_ms=10000",  # a heartbeat thread starved by a loaded machine stays in
        "kafka.heartbeat_interval_ms=2000",
        f"kafka.max_poll_interval_ms={poll_interval_ms}",
        "producer.enabled=true",
        "producer.limit=3000",
        "producer.rate=1000",
        "train.batch_size=32",
        "loop.holdout_fraction=0.2",
        "loop.eval_batch_size=8",
        "growth.min_interval_samples=1000000000",
        "growth.plateau_enabled=false",
        "growth.supernet_steps=100000000",  # a search that never ends by itself
        *QUIET,
    )
    try:
        daemon.wait_for(
            lambda: (m := daemon.get("/v1/model")) and m["training"]["samples_trained"] >= 200,
            300,
            "training",
        )
        assert admin(daemon, "grow")[0] == 200
        phase = 'growclip_growth_phase{growclip_growth_phase="training_supernet"}'
        daemon.wait_for(lambda: metric(metrics(daemon), phase) == 1.0, 120, "the supernet search")
        searching_since = time.monotonic()
        # longer than max_poll_interval_ms, twice over: a consumer that is not polled is evicted
        daemon.wait_for(
            lambda: time.monotonic() - searching_since > 2.5 * poll_interval_ms / 1000, 90, "time to pass"
        )

        code, answer = admin(daemon, "checkpoint")  # handled between supernet steps
        assert code == 200, answer
        manifest = daemon.manifest()
        position = int(manifest["source"]["positions"]["0"])
        assert position > 0 and manifest["growth"]["history"] == []
        # committed by a member still in its group (an evicted one's commit is refused)
        commits = [
            line[-300:]
            for line in daemon.log_tail(200_000).splitlines()
            if "commit" in line or "partitions" in line
        ]
        deadline = time.monotonic() + 60
        while committed_offset(broker, topic, topic) != position and time.monotonic() < deadline:
            time.sleep(1)  # the group coordinator may answer with the previous commit for a moment
        assert committed_offset(broker, topic, topic) == position, commits
        assert metric(metrics(daemon), phase) == 1.0, "the search is still running"
        revoked = [line for line in daemon.log_tail(200_000).splitlines() if "partitions revoked" in line]
        assert len(revoked) <= 1, revoked  # the one at the first join, none during the search

        # a second daemon on the same checkpoint root is refused, and says why
        (tmp_path / "second").mkdir()
        other = Daemon(tmp_path / "second", f"checkpoint.root={tmp_path / 'ckpt'}", *QUIET)
        assert other.proc.wait(timeout=120) == 4, other.log_tail()
        assert "holds the lock" in other.log_tail() and str(daemon.proc.pid) in other.log_tail()
    finally:
        code = daemon.stop(timeout_s=180)
    assert code == 0, daemon.log_tail()
    assert "growth search cancelled" in daemon.log_tail(200_000)
    final = daemon.manifest()
    assert final["step"] >= manifest["step"] and final["growth"]["history"] == []
    assert committed_offset(broker, topic, topic) == int(final["source"]["positions"]["0"])


@pytest.mark.slow
def test_a_dead_broker_child_stops_the_daemon_with_a_non_zero_exit(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, "kafka.embedded=true", "kafka.topic=dead.pairs", "growth.enabled=false", *QUIET)
    try:
        daemon.wait_for(lambda: daemon.get("/readyz"), 180, "readiness")
        tansu = [
            p for p in child_pids(daemon.proc.pid) if Path(f"/proc/{p}/comm").read_text().strip() == "tansu"
        ]
        assert len(tansu) == 1
        os.kill(tansu[0], signal.SIGKILL)
        code = daemon.proc.wait(timeout=180)
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
    assert code == 1, daemon.log_tail()
    assert "broker process exited" in daemon.log_tail()


BAD_ROW = 100  # the first bad row of the shard


def assert_held_back(root: Path) -> None:
    """Checkpoints taken before the first bad row are fine; none may cover it (or anything past it)."""
    for manifest_path in root.glob("*/manifest.json"):
        source = json.loads(manifest_path.read_text())["source"]
        assert not source["completed"] and source["row"] <= BAD_ROW, (manifest_path, source)


@pytest.mark.slow
def test_a_dead_letter_that_cannot_be_written_holds_checkpoints_back(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    good = list(itertools.islice(iter_records("fashion-mnist", seed=3), 300))
    bad = [Record(id=f"bad-{i}", caption="a broken picture", image=b"not an image") for i in range(3)]
    write_parquet_shards(
        good[:100] + bad[:1] + good[100:200] + bad[1:] + good[200:], str(shards), per_shard=400
    )
    dead_letter = tmp_path / "dlq.jsonl"
    dead_letter.mkdir()  # a folder where the file should be: every write fails, even as root
    holdout = 0.05
    settings = (
        "source=shards",
        f"shards.url={shards}",
        f"shards.dead_letter={dead_letter}",
        "growth.enabled=false",
        "train.batch_size=32",
        f"loop.holdout_fraction={holdout}",
        "checkpoint.every_s=1",
        *QUIET,
    )
    failures = 'growclip_dead_letter_write_failures_total{source="shards"}'
    daemon = Daemon(tmp_path, *settings)
    try:
        daemon.wait_for(lambda: metric(metrics(daemon), failures) >= 3, 300, "failed dead-letter writes")
        status = daemon.get("/v1/model")
        assert status["training"]["samples_trained"] > 0
        assert_held_back(tmp_path / "ckpt")
    finally:
        code = daemon.stop(timeout_s=180)
    assert code == 3, daemon.log_tail()
    assert "final checkpoint" in daemon.log_tail() and "dead letter" in daemon.log_tail()
    assert_held_back(tmp_path / "ckpt")

    dead_letter.rmdir()  # storage is back: the next run starts over, and accounts for everything
    daemon = Daemon(tmp_path, *settings)
    try:
        daemon.wait_for(
            lambda: (s := daemon.get("/v1/model")) and s["source"]["positions"].get("completed"),
            300,
            "the shard",
        )
    finally:
        code = daemon.stop(timeout_s=180)
    assert code == 0, daemon.log_tail()
    assert sorted(e["key"] for e in read_dead_letter(str(dead_letter))) == ["bad-0", "bad-1", "bad-2"]
    trained = sum(not is_held_out(r.id, holdout) for r in good)
    assert daemon.manifest()["samples"] in (trained, trained - 1)
