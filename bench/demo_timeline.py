"""The demo's timeline: `growclip-daemon start --config configs/demo.yaml`, as `make run` starts it.

Samples `GET /v1/model` every second for `--seconds` (default 600) and records when the daemon
became ready, when each growth finished, the architecture and parameters after each, training
throughput, source lag, the held-out loss, and the README's curl answer at the end (the `model`
it names). Every `--zero-shot-every` seconds, and at the end, it measures what a user would:
zero-shot top-1 on the reserved Fashion-MNIST test images (the producer streams the train split
only), embedding the images and the class prompts through `POST /v1/embeddings` and classifying
each image by its nearest prompt ensemble. At the end it reads the share of wall time and FLOPs the
growth search took from `/metrics`. Usage: ``.venv/bin/python bench/demo_timeline.py [--seconds 600]``.
"""

from __future__ import annotations

import argparse
import base64
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
import numpy as np
import torch

from growclip_stream.data.datasets import fill_template, load_labelled
from growclip_stream.evaluation import PROMPT_TEMPLATES

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _embed(client: httpx.Client, items: list, batch: int = 128) -> np.ndarray:  # type: ignore[type-arg]
    """Embeddings of texts and {"image": base64} items through the API, in batches of `batch`."""
    out = []
    for i in range(0, len(items), batch):
        r = client.post("/v1/embeddings", json={"input": items[i : i + batch]})
        r.raise_for_status()
        out += [d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]
    return np.asarray(out, dtype=np.float64)


def zero_shot_over_http(
    client: httpx.Client, images: list[bytes], labels: np.ndarray, classes: tuple
) -> float:  # type: ignore[type-arg]
    """Top-1 of the nearest class prompt (templates averaged), every embedding from the HTTP API."""
    prompts = [fill_template(t, c) for c in classes for t in PROMPT_TEMPLATES]
    text = _embed(client, prompts).reshape(len(classes), len(PROMPT_TEMPLATES), -1).mean(axis=1)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    img = _embed(client, [{"image": base64.b64encode(b).decode()} for b in images])
    return float(((img @ text.T).argmax(axis=1) == labels).mean())


def _metric(text: str, name: str, labels: str = "") -> float | None:
    for line in text.splitlines():
        if (line.startswith(f"{name}{{") and labels in line) or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--zero-shot-every", type=float, default=120)
    parser.add_argument("--zero-shot-images", type=int, default=2000)
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
    test_images, test_labels, classes = load_labelled("fashion-mnist", "test")
    test_images, labels = (
        test_images[: args.zero_shot_images],
        np.asarray(test_labels[: args.zero_shot_images]),
    )
    zero_shot: list[dict[str, object]] = []
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=tmp, stdout=(tmp / "log").open("w"), stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    ready_s, samples, growths_seen = None, [], 0
    next_zero_shot = args.zero_shot_every
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
            if t >= next_zero_shot:
                next_zero_shot += args.zero_shot_every
                top1 = zero_shot_over_http(client, test_images, labels, classes)
                zero_shot.append({"t": t, "model": m.get("version"), "top1": top1})
                print(json.dumps({"zero_shot": zero_shot[-1]}), flush=True)
        final_model = client.get("/v1/model").json()
        zero_shot.append(
            {"t": round(time.monotonic() - start, 1), "model": final_model.get("version"),
             "top1": zero_shot_over_http(client, test_images, labels, classes)}
        )  # fmt: skip
        metrics = client.get("/metrics").text
        search_share = {
            basis: _metric(metrics, "growclip_growth_search_fraction", f'basis="{basis}"')
            for basis in ("wall", "flops")
        }
        growth_seconds = _metric(metrics, "growclip_growth_search_seconds")  # searches and guards
        run_seconds = time.monotonic() - start
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
        "zero_shot_top1_over_http": zero_shot,
        "zero_shot_images": len(test_images),
        # the budget's own measure: growth work against training steps' work (search_budget_fraction)
        "search_share": search_share,
        # growth's seconds against the whole run (the trainer also waits for data, publishes, ...)
        "growth_seconds": growth_seconds,
        "growth_share_of_run": round(growth_seconds / run_seconds, 4) if growth_seconds is not None else None,
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
