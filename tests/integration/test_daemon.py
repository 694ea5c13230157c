"""End to end: the real daemon process with its embedded broker and demo producer, real data, real HTTP."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
DAEMON = [sys.executable, "-m", "growclip_daemon.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children_of(pid: int) -> list[int]:
    """Every live descendant of pid, read from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        frontier += kids
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def png_b64(value: int) -> str:
    buf = io.BytesIO()
    Image.new("L", (28, 28), color=value).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def embed(client: httpx.Client, items: list) -> dict:
    resp = client.post("/v1/embeddings", json={"input": items})
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"daemon exited early with {proc.returncode}"
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_daemon_trains_grows_serves_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "daemon.log"
    args = [
        "start",
        "--config", str(ROOT / "configs" / "demo.yaml"),
        "--set", f"serve.port={port}",
        "--set", f"pidfile={tmp_path / 'daemon.pid'}",
        "--set", "kafka.topic=e2e.pairs",
        "--set", "producer.rate=1500",
        "--set", "growth.samples_per_param=0",
        "--set", "growth.min_interval_samples=3000",
        "--set", "growth.supernet_steps=10",
        "--set", "log_format=json",
    ]  # fmt: skip
    with log_path.open("w") as log:
        proc = subprocess.Popen(DAEMON + args, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

        def ready() -> bool:
            try:
                return client.get("/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 120, "readiness", proc)
        texts = ["a photo of a sneaker", "a grey ankle boot on white"]
        before = embed(client, [*texts, {"image": png_b64(200)}])
        dim = client.get("/v1/model").json()["architecture"]["embed_dim"]
        assert [len(d["embedding"]) for d in before["data"]] == [dim, dim, dim]
        assert before["model"].startswith("growclip@0.")

        model = wait_for(
            lambda: (m := client.get("/v1/model").json())["generation"] >= 2 and m, 300, "two growths", proc
        )
        for event in model["growth_history"][:2]:
            assert event["ops"] and event["params_after"] > event["params_before"]
            assert event["policy"] == "search" and event["reason"].startswith("won:")
            scored = [c for c in event["candidates"] if c.get("val_loss") is not None]
            assert len(scored) >= 2 and ",".join(event["ops"]) in {c["name"] for c in scored}

        after = embed(client, [*texts, {"image": f"data:image/png;base64,{png_b64(30)}"}])
        generation = int(after["model"].removeprefix("growclip@").split(".")[0])
        assert generation >= 1
        assert [len(d["embedding"]) for d in after["data"]] == [dim, dim, dim]

        # it trained: the smoothed loss is below the first step's (log(128) ~ 4.85 at chance)
        status = wait_for(
            lambda: (s := client.get("/v1/model").json())["training"]["step"] >= 60 and s,
            120,
            "60 steps",
            proc,
        )
        assert status["training"]["loss_ema"] < status["training"]["loss_first"] - 0.3
        assert status["training"]["samples_trained"] >= 60 * 96  # 128 per batch, a quarter replayed

        # bad requests get a 4xx with a reason, and the daemon keeps serving
        empty = client.post("/v1/embeddings", json={"input": []})
        assert empty.status_code == 400 and "error" in empty.json()
        big = client.post(
            "/v1/embeddings", content=b"x" * (9 * 1024 * 1024), headers={"content-type": "application/json"}
        )
        assert big.status_code == 413
        assert client.get("/healthz").status_code == 200

        metrics = client.get("/metrics").text
        assert "growclip_train_samples_total" in metrics and "growclip_growth_events_total" in metrics

        kids = children_of(proc.pid)
        assert kids, "the embedded broker should run as a child process"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, log_path.read_text()[-3000:]
    time.sleep(0.2)
    assert not [k for k in kids if alive(k)], "a child process outlived the daemon"
    assert not (tmp_path / "daemon.pid").exists()


def test_malformed_config_names_the_key(tmp_path: Path) -> None:
    out = subprocess.run(
        [*DAEMON, "start", "--set", "train.learning_rate=0.1", "--set", f"pidfile={tmp_path / 'p'}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert out.returncode == 2
    assert "train.learning_rate" in out.stderr
