"""End to end: the real daemon process with its embedded broker and demo producer, real data, real HTTP."""

from __future__ import annotations

import base64
import io
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.helpers import DAEMON, Daemon, descendant_pids, process_alive

ROOT = Path(__file__).resolve().parents[2]


def png_b64(value: int) -> str:
    buf = io.BytesIO()
    Image.new("L", (28, 28), color=value).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def embed(client: httpx.Client, items: list) -> dict:
    resp = client.post("/v1/embeddings", json={"input": items})
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.mark.slow
def test_daemon_trains_grows_serves_and_stops_cleanly(tmp_path: Path) -> None:
    daemon = Daemon(
        tmp_path,
        "kafka.topic=e2e.pairs",
        "producer.rate=1500",
        "growth.samples_per_param=0",
        "growth.min_interval_samples=3000",
        "growth.supernet_steps=10",
        # growth here is about the mechanics: any gain grows, the search may take half the work, no guard
        "growth.decline_z=0",
        "growth.min_gain=0",
        "growth.search_budget_fraction=0.5",
        "growth.guard_steps=0",
        "log_format=json",
        config=ROOT / "configs" / "demo.yaml",
    )
    try:
        client = daemon.client
        daemon.wait_for(lambda: daemon.get("/readyz"), 120, "readiness")
        texts = ["a photo of a sneaker", "a grey ankle boot on white"]
        before = embed(client, [*texts, {"image": png_b64(200)}])
        dim = daemon.get("/v1/model")["architecture"]["embed_dim"]
        assert [len(d["embedding"]) for d in before["data"]] == [dim, dim, dim]
        assert before["model"].startswith("growclip@0.")

        model = daemon.wait_for(
            lambda: (m := daemon.get("/v1/model")) and m["generation"] >= 2 and m, 300, "two growths"
        )
        for event in [e for e in model["growth_history"] if e["outcome"] == "grown"][:2]:
            assert event["ops"] and event["params_after"] > event["params_before"]
            assert event["policy"] == "search" and event["reason"].startswith("won:")
            scored = [c for c in event["candidates"] if c.get("val_loss") is not None]
            assert len(scored) >= 2 and ",".join(event["ops"]) in {c["name"] for c in scored}

        after = embed(client, [*texts, {"image": f"data:image/png;base64,{png_b64(30)}"}])
        generation = int(after["model"].removeprefix("growclip@").split(".")[0])
        assert generation >= 2
        assert [len(d["embedding"]) for d in after["data"]] == [dim, dim, dim]

        # it trained: the smoothed loss is below the first step's (log(128) ~ 4.85 at chance)
        status = daemon.wait_for(
            lambda: (s := daemon.get("/v1/model")) and s["training"]["step"] >= 60 and s, 120, "60 steps"
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

        # the evaluator evaluated a grown model, off the training thread: /v1/model and the metrics
        evaluation = daemon.wait_for(
            lambda: (
                (m := daemon.get("/v1/model"))
                and any(g != "0" for g in m["evaluation"]["by_generation"])
                and m["evaluation"]
            ),
            120,
            "an evaluation of a grown model",
        )
        assert set(evaluation["suites"]) == {"fashion-mnist", "tuxpaint", "emoji"}, evaluation["errors"]
        metrics = client.get("/metrics").text
        assert 'growclip_eval_zeroshot_top1_ratio{suite="fashion-mnist"}' in metrics
        assert (
            'growclip_eval_retrieval_recall_ratio{direction="image_to_text",k="10",suite="emoji"}' in metrics
        )

        kids = descendant_pids(daemon.proc.pid)
        assert kids, "the embedded broker should run as a child process"
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log_tail()
    time.sleep(0.2)
    assert not [k for k in kids if process_alive(k)], "a child process outlived the daemon"
    assert not (tmp_path / "daemon.pid").exists()
    assert daemon.manifest()["growth"]["history"], "the final checkpoint holds the grown model"


def test_malformed_config_names_the_key(tmp_path: Path) -> None:
    out = subprocess.run(
        [*DAEMON, "start", "--set", "train.learning_rate=0.1", "--set", f"pidfile={tmp_path / 'p'}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "train.learning_rate" in out.stderr
