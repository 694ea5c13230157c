"""Chaos: the real daemon SIGKILLed again and again (at random moments, and during a checkpoint
write, a growth search and a dead-letter flush) against the real broker, restarted each time.

At the end every produced record is accounted for exactly once, by its source position and id,
in the audit trail of the final model state: trained, held out, or dead-lettered with its reason;
the final checkpoint has trained exactly the records the trail says; every dead-lettered record
is in the dead-letter topic; no checkpoint that was loaded was corrupt; and no version named two
different sets of weights.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from growclip_daemon.audit import read_audit
from growclip_daemon.faults import ENV as FAULTS_ENV
from growclip_stream.data.datasets import iter_records
from growclip_stream.data.kafka_source import KafkaSource, KafkaSourceConfig
from growclip_stream.data.produce import produce
from growclip_stream.data.records import Record, is_held_out
from tests.helpers import Daemon

SEED = 20261201
GOOD, BAD_EVERY = 560, 20  # a bad record after every 20 good ones
FIRST = 240  # records produced before the first start (enough to grow); the rest come in chunks
HOLDOUT = 0.1
KILLS = 10
TARGETED = ["checkpoint", "checkpoint", "search", "search", "dead_letter", "dead_letter"]


def records() -> list[Record]:
    good = list(itertools.islice(iter_records("fashion-mnist", seed=SEED), GOOD))
    out: list[Record] = []
    for i, rec in enumerate(good):
        out.append(rec)
        if i % BAD_EVERY == BAD_EVERY - 1:
            out.append(Record(id=f"bad-{i}", caption="a picture that is not one", image=b"\x89PNG broken"))
    return out


def topic_ids(broker: str, topic: str, n: int) -> list[str]:
    """The id of the record at each offset of partition 0, read back from the broker."""
    src = KafkaSource(KafkaSourceConfig(broker, topic, "chaos-reader", partitions=[0]))
    ids: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 120
        while len(ids) < n:
            assert time.monotonic() < deadline, f"read {len(ids)} of {n}"
            for m in src.poll(0.5):
                ids[m.offset] = json.loads(m.value)["id"]
    finally:
        src.close()
    return [ids[i] for i in range(n)]


def dead_letter_offsets(broker: str, topic: str) -> Counter[int]:
    src = KafkaSource(KafkaSourceConfig(broker, f"{topic}.dlq", "chaos-dlq-reader", partitions="all"))
    seen: Counter[int] = Counter()
    try:
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 3:
            got = src.poll(0.5)
            if got:
                quiet_since = time.monotonic()
            for m in got:
                seen[int(dict(m.headers)["source-offset"])] += 1
    finally:
        src.close()
    return seen


def complete_checkpoints(root: Path) -> dict[str, dict[str, Any]]:
    """Checkpoints whose manifest exists and whose files match its checksums, by folder."""
    out = {}
    for manifest_path in root.glob("*/manifest.json"):
        try:
            manifest = json.loads(manifest_path.read_text())
            files = {
                name: hashlib.sha256((manifest_path.parent / name).read_bytes()).hexdigest()
                for name in manifest["files"]
            }
        except (OSError, ValueError):
            continue  # removed by retention meanwhile, or being written
        if files == {name: f["sha256"] for name, f in manifest["files"].items()}:
            out[str(manifest_path.parent)] = manifest
    return out


def version(manifest: dict[str, Any]) -> str:
    """The version the served model had at this checkpoint: generation, step and run id."""
    return f"{manifest['generation']}.{manifest['step']}.{manifest['run']['id']}"


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~5 minutes on a loaded 2-core machine; far more when it is overloaded
def test_sigkill_at_any_moment_loses_nothing_and_trains_nothing_twice(
    tmp_path: Path, broker: str, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(SEED)
    produced = records()
    # the first chunk, then one chunk before each restart: every incarnation has fresh records
    # to train, hold out and dead-letter
    cuts = [FIRST + (len(produced) - FIRST) * i // KILLS for i in range(KILLS + 1)]
    assert produce(broker, topic, produced[: cuts[0]]) == cuts[0]
    bad_ids = {r.id for r in produced if r.id.startswith("bad-")}
    audit = tmp_path / "audit.jsonl"
    settings = (
        f"kafka.bootstrap={broker}",
        f"kafka.topic={topic}",
        f"kafka.group_id={topic}",
        "kafka.partitions=[0]",  # no group rebalance waits between incarnations
        "kafka.max_poll_records=64",
        "data.decode_workers=1",
        "data.decode_method=thread",
        "train.batch_size=32",
        f"loop.holdout_fraction={HOLDOUT}",
        "loop.eval_batch_size=8",
        "loop.publish_every_steps=5",
        "growth.samples_per_param=0",
        "growth.min_interval_samples=160",
        "growth.plateau_enabled=false",
        "growth.supernet_steps=8",
        "growth.min_supernet_steps=1",  # search as soon as the little data here pays for one step
        "growth.max_ops_per_step=1",  # few candidates: a search takes seconds, not minutes
        "growth.selection_samples=32",
        "growth.max_growths=1",  # a search killed before its growth is checkpointed comes back
        "growth.search_budget_fraction=0.9",  # searches are what this test kills, not what it saves
        "growth.guard_steps=0",
        "checkpoint.every_s=1",
        "checkpoint.keep=4",
        f"audit_log={audit}",
        "evaluation.enabled=false",
        "serve.drift_probe_size=0",
    )
    # the targeted kills first, while there is still data to dead-letter; the searches before the
    # one growth (growth.max_growths) is checkpointed
    others = [p for p in TARGETED if p != "search"]
    plan = ["search", "search", *rng.sample(others, len(others))] + [""] * (KILLS - len(TARGETED))
    weights: dict[str, str] = {}  # version -> model checksum, over every complete checkpoint seen
    kills: Counter[str] = Counter()

    def record_checkpoints() -> None:
        for manifest in complete_checkpoints(tmp_path / "ckpt").values():
            digest = manifest["files"]["model.safetensors"]["sha256"]
            assert weights.setdefault(version(manifest), digest) == digest, (
                f"version {version(manifest)} named two different sets of weights"
            )

    logs = []
    for i, point in enumerate(plan):
        if i:
            chunk = produced[cuts[i - 1] : cuts[i]]
            assert produce(broker, topic, chunk) == len(chunk)
        run_dir = tmp_path / f"run{i:02d}"
        run_dir.mkdir()
        monkeypatch.setenv(FAULTS_ENV, f"{point}:{rng.randint(1, 2)}" if point else "")
        daemon = Daemon(run_dir, f"checkpoint.root={tmp_path / 'ckpt'}", *settings)
        logs.append(daemon.log_path)
        try:
            if point:  # it kills itself there; a point never reached is replaced by our own kill
                try:
                    daemon.proc.wait(timeout=150)
                except subprocess.TimeoutExpired:
                    point = ""
                    daemon.proc.send_signal(signal.SIGKILL)
            else:
                deadline = time.monotonic() + rng.uniform(1.0, 30.0)
                while time.monotonic() < deadline and daemon.proc.poll() is None:
                    time.sleep(0.05)
                assert daemon.proc.poll() is None, f"daemon exited by itself:\n{daemon.log_tail()}"
                daemon.proc.send_signal(signal.SIGKILL)
            assert daemon.proc.wait(timeout=60) == -signal.SIGKILL, daemon.log_tail()
        finally:
            if daemon.proc.poll() is None:
                daemon.proc.kill()
                daemon.proc.wait()
        kills[point or "random"] += 1
        text = daemon.log_path.read_text()
        if point:
            assert f'"point": "{point}"' in text, f"the kill at {point} is not in the log"
        record_checkpoints()
    assert sum(kills.values()) >= 10 and all(kills[p] for p in set(TARGETED)), kills

    # The last incarnation runs until every record is settled, and stops cleanly.
    rest = produced[cuts[-2] :]
    assert produce(broker, topic, rest) == len(rest)
    monkeypatch.setenv(FAULTS_ENV, "")
    final_dir = tmp_path / "final"
    final_dir.mkdir()
    daemon = Daemon(final_dir, f"checkpoint.root={tmp_path / 'ckpt'}", *settings)
    logs.append(daemon.log_path)
    try:
        daemon.wait_for(
            lambda: (
                (s := daemon.get("/v1/model"))
                and int(s["source"]["positions"]["positions"].get("0", 0)) >= len(produced)
                and s["training"]["step"] > 0
            ),
            900,
            "every record read",
        )
    finally:
        code = daemon.stop(timeout_s=180)
    assert code == 0, daemon.log_tail()
    record_checkpoints()

    for log_path in logs:  # every checkpoint a run loaded passed its checksums
        text = log_path.read_text()
        assert "checksum mismatch" not in text and "CheckpointError" not in text, log_path

    latest = (tmp_path / "ckpt" / "LATEST").read_text().strip()
    manifest = json.loads((tmp_path / "ckpt" / latest / "manifest.json").read_text())
    settled = int(manifest["source"]["positions"]["0"])
    assert settled in (len(produced), len(produced) - 1)  # a single last record may stay unsettled
    entries = read_audit(audit, manifest["run"]["audit"])
    ids = topic_ids(broker, topic, len(produced))

    # Exactly once, by position: every settled record, and nothing else.
    offsets = [int(e["key"].rsplit(":", 1)[1]) for e in entries]
    assert sorted(offsets) == list(range(settled)), Counter(offsets).most_common(3)
    for entry, offset in zip(entries, offsets, strict=True):
        rid = ids[offset]
        if rid in bad_ids:
            assert entry["fate"] == "dead_letter" and entry["reason"] == "not_an_image", entry
        else:
            assert entry["id"] == rid, (entry, rid)
            assert entry["fate"] == ("held_out" if is_held_out(rid, HOLDOUT) else "trained"), entry
    # ... into the same model state: the final weights have trained exactly those records
    assert manifest["samples"] == sum(e["fate"] == "trained" for e in entries)
    # ... and every dead-lettered one reached the dead-letter topic (at least once)
    in_dlq = dead_letter_offsets(broker, topic)
    dead = {o for e, o in zip(entries, offsets, strict=True) if e["fate"] == "dead_letter"}
    assert dead and dead <= set(in_dlq), dead - set(in_dlq)
    assert os.path.getsize(audit) >= manifest["run"]["audit"]
