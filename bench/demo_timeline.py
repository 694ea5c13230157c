"""The demo's timeline: `growclip-daemon start --config configs/demo.yaml`, as `make run` starts it.

Samples `GET /v1/model` every second for `--seconds` (default 300) and records when the daemon
became ready, when each growth finished, the architecture and parameters after each, training
throughput, source lag, the held-out loss, and the README's curl answer at the end (the `model`
it names). Usage: ``.venv/bin/python bench/demo_timeline.py [--seconds 300]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "demo_timeline.json")
    args = parser.parse_args()
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="growclip-demo-"))
    cmd = [
        sys.executable,
        "-m",
        "growclip_daemon.cli",
        "start",
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        "--set",
        f"serve.port={port}",
        "--set",
        f"pidfile={tmp / 'pid'}",
        "--set",
        f"checkpoint.root={tmp / 'ckpt'}",
    ]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=tmp, stdout=(tmp / "log").open("w"), stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    ready_s, samples, growths_seen = None, [], 0
    try:
        while time.monotonic() - start < args.seconds:
            time.sleep(1.0)
            try:
                m = client.get("/v1/model").json()
            except (httpx.HTTPError, ValueError):
                continue
            if "training" not in m:
                continue
            t = round(time.monotonic() - start, 1)
            ready_s = ready_s or t
            tr = m["training"]
            samples.append(
                {
                    "t": t,
                    "generation": m["generation"],
                    "params": m["parameters"]["total"],
                    "samples_trained": tr["samples_trained"],
                    "samples_per_s": tr["samples_per_second"],
                    "holdout_loss": tr["holdout_loss"],
                    "lag": sum(m["source"]["lag"].values()),
                }
            )
            growths_seen = m["generation"]
        curl = client.post(
            "/v1/embeddings", json={"input": ["a photo of a sneaker", "a grey ankle boot on white"]}
        )
        model = client.get("/v1/model").json()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    events = [
        {
            "generation": e["generation"],
            "ops": e["ops"],
            "trigger": e["trigger"],
            "params_after": e["params_after"],
            "duration_s": round(e["duration_s"], 1),
            "step": e["step"],
        }
        for e in model["growth_history"]
    ]
    out = {
        "benchmark": "demo_timeline",
        "machine": {
            "cores": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": next(
                (
                    ln.split(":", 1)[1].strip()
                    for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")
                ),
                "",
            ),
        },
        "date": time.strftime("%Y-%m-%d"),
        "seconds": args.seconds,
        "ready_after_s": ready_s,
        "growths": growths_seen,
        "growth_events": events,
        "curl_status": curl.status_code,
        "curl_model": curl.json().get("model"),
        "curl_dims": [len(d["embedding"]) for d in curl.json().get("data", [])],
        "exit_code": code,
        "timeline": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "timeline"}, indent=1))


if __name__ == "__main__":
    main()
