"""The daemon on fsspec shards: trains them, dead-letters bad rows beside them, resumes at (shard, row)."""

from __future__ import annotations

import itertools
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from growclip_stream.data.datasets import iter_records
from growclip_stream.data.records import Record, is_held_out
from growclip_stream.data.shards import read_dead_letter, write_parquet_shards, write_tar_shards

DAEMON = [sys.executable, "-m", "growclip_daemon.cli"]
HOLDOUT = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(tmp: Path, shards: Path, port: int) -> subprocess.Popen:
    args = [
        "start",
        "--set", "source=shards",
        "--set", f"shards.url={shards}",
        "--set", "shards.watch=true",
        "--set", "shards.poll_interval_s=0.5",
        "--set", f"serve.port={port}",
        "--set", f"pidfile={tmp / 'pid'}",
        "--set", f"checkpoint.root={tmp / 'ckpt'}",
        "--set", "growth.enabled=false",
        "--set", "train.batch_size=32",
        "--set", f"loop.holdout_fraction={HOLDOUT}",
    ]  # fmt: skip
    return subprocess.Popen(DAEMON + args, cwd=tmp, stdout=(tmp / "log").open("a"), stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0


def manifest(tmp: Path) -> dict:
    latest = (tmp / "ckpt" / "LATEST").read_text().strip()
    return json.loads((tmp / "ckpt" / latest / "manifest.json").read_text())


def wait_lag_zero(proc: subprocess.Popen, port: int, completed: int) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None and time.monotonic() < deadline
        try:
            src = httpx.get(f"http://127.0.0.1:{port}/v1/model", timeout=10).json()["source"]
            if len(src["positions"].get("completed", [])) >= completed:
                return
        except (httpx.HTTPError, KeyError):
            pass
        time.sleep(0.5)


@pytest.mark.slow
def test_shards_train_dead_letter_and_resume(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    good = list(itertools.islice(iter_records("fashion-mnist", seed=5), 400))
    bad = [Record(id="bad-image", caption="a broken picture", image=b"not an image at all")]
    write_parquet_shards(good[:200] + bad, str(shards), per_shard=101)  # 2 parquet shards, one bad row
    port = free_port()
    proc = start(tmp_path, shards, port)
    try:
        wait_lag_zero(proc, port, completed=2)
    finally:
        stop(proc)
    first = manifest(tmp_path)
    trained_first = sum(not is_held_out(r.id, HOLDOUT) for r in good[:200])
    assert first["samples"] in (trained_first, trained_first - 1)
    dead = read_dead_letter(str(shards / "_dead_letter.jsonl"))
    assert [(d["key"], d["reason"]) for d in dead] == [("bad-image", "not_an_image")]

    # Restart: nothing is read twice; a new tar shard under the watched prefix is picked up.
    proc = start(tmp_path, shards, port)
    try:
        write_tar_shards(good[200:], str(shards), per_shard=200, first_index=10)
        wait_lag_zero(proc, port, completed=3)
    finally:
        stop(proc)
    second = manifest(tmp_path)
    trained_all = sum(not is_held_out(r.id, HOLDOUT) for r in good)
    assert second["samples"] in (trained_all, trained_all - 1, trained_all - 2)
    assert len(read_dead_letter(str(shards / "_dead_letter.jsonl"))) == 1
