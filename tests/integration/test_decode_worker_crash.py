"""A decode worker process killed under the running daemon (the OOM killer's way): ingest goes on,
the death is counted, serving answers throughout, and the daemon still stops cleanly."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from tests.helpers import Daemon, child_pids

ROOT = Path(__file__).resolve().parents[2]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.mark.slow
def test_killing_a_decode_worker_does_not_stop_ingest(tmp_path: Path) -> None:
    daemon = Daemon(
        tmp_path,
        "kafka.topic=crash.pairs",
        "producer.rate=800",
        "growth.enabled=false",
        "data.decode_workers=2",
        "data.decode_method=process",
        config=ROOT / "configs" / "demo.yaml",
    )
    try:
        client = daemon.client

        def samples() -> float:
            return metric(client.get("/metrics").text, "growclip_train_samples_total")

        daemon.wait_for(lambda: daemon.get("/readyz") and samples() > 500, 120, "training")
        forkserver = [p for p in child_pids(daemon.proc.pid) if "multiprocessing.forkserver" in cmdline(p)]
        assert len(forkserver) == 1, [cmdline(p) for p in child_pids(daemon.proc.pid)]
        workers = child_pids(forkserver[0])
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)

        deaths = daemon.wait_for(
            lambda: metric(client.get("/metrics").text, "growclip_ingest_decode_worker_deaths_total"),
            60,
            "the worker death in the metrics",
        )
        assert deaths == 1.0
        resp = client.post("/v1/embeddings", json={"input": ["a photo of a bag"]})
        assert resp.status_code == 200
        after = samples()
        daemon.wait_for(lambda: samples() > after + 500, 60, "training after the worker died")
        assert len(child_pids(forkserver[0])) == 2  # the rebuilt pipeline has its two workers
        assert (
            metric(
                client.get("/metrics").text,
                'growclip_ingest_records_total{source="kafka",status="bad_image"}',
            )
            == 0
        )
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log_tail()
