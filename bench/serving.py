"""Serving throughput and latency: dynamic batching on versus off, while the daemon trains and grows.

Starts the real daemon (``growclip_daemon.cli start --config configs/demo.yaml``: embedded broker,
growth triggers off) once per arm, with ``growclip-daemon produce`` streaming Fashion-MNIST into it
from its own process at 1,500 records/s (more than the trainer takes, so training never idles; the
producers of a real deployment are not in the daemon's process either). The arms:
``serve.batching=true`` and ``serve.batching=false`` (every request its own forward pass on the
batcher thread). Against each, from a separate client process (asyncio, one
connection per client, closed loop, no think time):

- single-text and single-image ``POST /v1/embeddings`` at 1, 8 and 32 concurrent clients
  (Fashion-MNIST test captions and 28x28 images, the reserved split), each cell ``cell_s`` long:
  answers/s and latency p50/p99;
- a forced growth (``POST /admin/grow``) of the batching arm under 8 clients (text and image
  requests alternating): latency p50/p99 in the ``steady_s`` before the admin call versus from
  the call until the grown model is served;
- (batching arm) 64 clients sending 16 items each, far past capacity, while ``/healthz`` and
  ``/v1/model`` are probed every 50 ms from this process: answers by status, probe latencies.

The two arms run side by side: both daemons train at once, and the cells alternate between them
(the order reversed every pass), so whatever else loads the machine falls on both arms alike.
Cells are short and the machine is shared, so the figures are noisy: medians over ``repeats``
passes are reported. The growth and overload measurements are of the batching arm (the default).
Two model sizes (``MODELS``): the demo's tiny initial model and a larger one whose forward pass
dominates a request.

    .venv/bin/python bench/serving.py           # ~15 min, writes bench/results/serving.json
    .venv/bin/python bench/serving.py --quick   # ~4 min smoke run (large model only), writes nothing
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[1]
DAEMON = [sys.executable, "-m", "growclip_daemon.cli"]
CONFIG = ROOT / "configs" / "demo.yaml"
RESULTS = ROOT / "bench" / "results" / "serving.json"
TOKEN_ENV = "GROWCLIP_ADMIN_TOKEN"
ARMS = {"batching_on": "true", "batching_off": "false"}
# The demo's initial model is tiny (a forward pass of one text takes about a millisecond), so the
# HTTP handling of each request costs more than its model work; "large" is a model whose forward
# pass dominates, where batching is meant to pay. Both start from these architectures and grow.
MODELS: dict[str, dict[str, str]] = {
    "demo": {},
    "large": {
        "model.image": "{width: 128, depth: 3, mlp_hidden: 512, head_dim: 32}",
        "model.text": "{width: 128, depth: 3, mlp_hidden: 512, head_dim: 32}",
        "model.shared": "{width: 128, depth: 0, mlp_hidden: 512, head_dim: 32}",
        "growth.max_params": "50000000",
        "growth.supernet_steps": "10",  # the search trains a supernet several times this size
    },
}
PRODUCER_RATE = 1500
COMMON = {
    "producer.enabled": "false",
    "growth.min_interval_samples": "1000000000000",  # growth only when forced
    "growth.plateau_enabled": "false",
    "growth.supernet_steps": "30",
    "serve.queue_max_items": "256",
    "log_format": "json",
}


@dataclass
class Timing:
    cell_s: float = 5.0
    repeats: int = 2
    steady_s: float = 10.0
    overload_s: float = 15.0
    clients: tuple[int, ...] = (1, 8, 32)


# -- the client process ---------------------------------------------------------------------------


def probe_bodies(n: int = 64) -> tuple[list[bytes], list[bytes]]:
    """Single-text and single-image request bodies from the reserved Fashion-MNIST test split."""
    from growclip_stream.data.datasets import iter_records

    texts, images = [], []
    for record in iter_records("fashion-mnist", split="test", seed=7):
        texts.append(json.dumps({"input": record.caption}).encode())
        images.append(json.dumps({"input": [{"image": base64.b64encode(record.image).decode()}]}).encode())
        if len(texts) >= n:
            break
    return texts, images


async def _clients(
    url: str, clients: int, seconds: float, bodies: list[bytes], stop_file: Path
) -> list[list[float]]:
    """[start (wall), latency s, status] per request; status 0 = transport error. Runs ``seconds``
    or until ``stop_file`` exists.

    aiohttp, not httpx: httpx's async pool cost its process 2.9-4.4 ms of CPU per request at 32
    connections (0.12-0.26 ms with aiohttp, measured against this daemon), so on 2 shared cores an
    httpx load generator measures itself."""
    out: list[list[float]] = []
    deadline = time.monotonic() + seconds
    headers = {"content-type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as client:

        async def one(k: int) -> None:
            i = k
            while time.monotonic() < deadline and not stop_file.exists():
                body = bodies[i % len(bodies)]
                i += clients
                t0, p0 = time.time(), time.perf_counter()
                try:
                    async with client.post("/v1/embeddings", data=body, headers=headers) as resp:
                        await resp.read()
                        status = resp.status
                except (aiohttp.ClientError, TimeoutError):
                    status = 0
                out.append([t0, time.perf_counter() - p0, status])

        await asyncio.gather(*(one(k) for k in range(clients)))
    return out


def client_main(url: str, clients: int, seconds: float, kind: str, out_path: str) -> None:
    texts, images = probe_bodies()
    if kind == "text":
        bodies = texts
    elif kind == "image":
        bodies = images
    elif kind == "mixed":
        bodies = [b for pair in zip(texts, images, strict=True) for b in pair]
    else:  # heavy: 12 texts and 4 images per request
        items: list[Any] = [json.loads(t)["input"] for t in texts[:12]]
        items += [json.loads(b)["input"][0] for b in images[:4]]
        bodies = [json.dumps({"input": items}).encode()]
    records = asyncio.run(_clients(url, clients, seconds, bodies, Path(out_path + ".stop")))
    Path(out_path).write_text(json.dumps(records))


def run_clients(url: str, clients: int, seconds: float, kind: str, tmp: Path) -> list[list[float]]:
    out = tmp / f"clients-{secrets.token_hex(4)}.json"
    subprocess.run(
        [sys.executable, __file__, "--clients-worker", url, str(clients), str(seconds), kind, str(out)],
        check=True,
        timeout=seconds + 120,
    )
    return json.loads(out.read_text())


def start_clients(
    url: str, clients: int, seconds: float, kind: str, tmp: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    out = tmp / f"clients-{secrets.token_hex(4)}.json"
    proc = subprocess.Popen(
        [sys.executable, __file__, "--clients-worker", url, str(clients), str(seconds), kind, str(out)]
    )
    return proc, out


# -- statistics -----------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(value: float | None) -> float | None:
    return None if value is None else round(1000 * value, 1)


def summarise(records: list[list[float]], t0: float | None = None, t1: float | None = None) -> dict[str, Any]:
    """Answers/s (200s only) and latency percentiles of the 200s, within [t0, t1) if given."""
    if t0 is not None or t1 is not None:
        lo, hi = t0 if t0 is not None else -1e18, t1 if t1 is not None else 1e18
        records = [r for r in records if lo <= r[0] < hi]
    ok = [r for r in records if r[2] == 200]
    codes: dict[str, int] = {}
    for r in records:
        codes[str(int(r[2]))] = codes.get(str(int(r[2])), 0) + 1
    span = (max(r[0] + r[1] for r in records) - min(r[0] for r in records)) if records else 0.0
    lat = [r[1] for r in ok]
    return {
        "requests": len(records),
        "codes": codes,
        "answers_per_s": round(len(ok) / span, 1) if span > 0 else None,
        "p50_ms": ms(pct(lat, 0.5)),
        "p99_ms": ms(pct(lat, 0.99)),
    }


def median_cells(cells: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each cell's passes and the medians over them (noisy machine: no single pass is the figure)."""
    return {
        key: {
            "passes": runs,
            "answers_per_s": statistics.median(x["answers_per_s"] or 0 for x in runs),
            "p50_ms": statistics.median(x["p50_ms"] or 0 for x in runs),
            "p99_ms": statistics.median(x["p99_ms"] or 0 for x in runs),
        }
        for key, runs in cells.items()
    }


# -- what merging forward passes can save ---------------------------------------------------------


def forward_costs(model: str, sizes: tuple[int, ...] = (1, 8, 32), seconds: float = 1.0) -> dict[str, Any]:
    """Per-item time of the snapshot's forward pass at each batch size, on one intra-op thread as a
    batcher runs it, in this process before any daemon starts (a quiet machine). ``ceiling`` is the
    batch-1 time over the largest batch's: what batching can gain at most from the forward pass
    itself, before any HTTP or contention effect."""
    import torch
    from threadpoolctl import threadpool_limits

    from growclip_daemon.config import load_config
    from growclip_stream.data.datasets import iter_records
    from growclip_stream.data.records import RecordLimits
    from growclip_stream.model.clip import GrowCLIP
    from growclip_stream.serving import ModelSnapshot

    arch = load_config(CONFIG, [f"{k}={v}" for k, v in MODELS[model].items()]).model
    torch.manual_seed(0)
    snap = ModelSnapshot.capture(GrowCLIP(arch), generation=0, step=0, samples_trained=0, growth_history=[])
    records = []
    for record in iter_records("fashion-mnist", split="test", seed=7):
        records.append(record)
        if len(records) >= max(sizes):
            break
    out: dict[str, Any] = {}
    with threadpool_limits(limits=1, user_api="openmp"):
        for kind in ("text", "image"):
            per_item: dict[str, float] = {}
            for n in sizes:
                if kind == "text":
                    x = snap.tokenize([r.caption for r in records[:n]])
                    run = snap.embed_tokens
                else:
                    x = snap.decode_images([r.image for r in records[:n]], RecordLimits())
                    run = snap.embed_pixels
                run(x)  # warm-up
                calls, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    run(x)
                    calls += 1
                per_item[str(n)] = round(1000 * (time.perf_counter() - t0) / (calls * n), 3)
            out[kind] = {
                "ms_per_item": per_item,
                "ceiling": round(per_item[str(sizes[0])] / per_item[str(sizes[-1])], 2),
            }
    return out


# -- the daemon -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DaemonRun:
    def __init__(self, arm: str, model: str, workdir: Path, extra: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.control_port = free_port()
        self.broker_port = free_port()
        self.topic = f"bench.serving.{arm}.{secrets.token_hex(4)}"
        self.base = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_hex(16)
        self.log_path = workdir / "daemon.log"
        self.overrides = {
            "serve.port": str(self.port),
            "serve.control_port": str(self.control_port),
            "serve.batching": ARMS[arm],
            "pidfile": str(workdir / "daemon.pid"),
            "checkpoint.root": str(workdir / "checkpoints"),
            "kafka.topic": self.topic,
            "kafka.embedded_port": str(self.broker_port),
            **COMMON,
            **MODELS[model],
            **(extra or {}),
        }
        args = ["start", "--config", str(CONFIG)]
        for key, value in self.overrides.items():
            args += ["--set", f"{key}={value}"]
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                DAEMON + args,
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, TOKEN_ENV: self.token},
            )
        self.client = httpx.Client(base_url=self.base, timeout=30)
        self.producer: subprocess.Popen[bytes] | None = None

    def start_producer(self, workdir: Path) -> None:
        args = ["produce", "--bootstrap", f"127.0.0.1:{self.broker_port}", "--topic", self.topic]
        args += ["--dataset", "fashion-mnist", "--repeat", "--rate", str(PRODUCER_RATE)]
        with (workdir / "producer.log").open("w") as log:
            self.producer = subprocess.Popen(DAEMON + args, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)

    def wait_for(self, predicate: Any, timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"daemon exited ({self.proc.returncode}): {self.log_path.read_text()[-2000:]}"
                )
            try:
                value = predicate()
            except httpx.HTTPError:
                value = None
            if value:
                return value
            time.sleep(0.5)
        raise RuntimeError(f"timed out waiting for {what}")

    def model(self) -> dict[str, Any]:
        return self.client.get("/v1/model").json()

    def stop(self) -> int | None:
        self.client.close()
        if self.producer is not None and self.producer.poll() is None:
            self.producer.terminate()
            self.producer.wait(timeout=30)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


def run_model(model: str, timing: Timing, workdir: Path) -> dict[str, Any]:
    """Both arms side by side: two daemons training at once, cells interleaved between them (the
    order alternating by pass), so the machine's other load falls on both arms alike."""
    daemons: dict[str, DaemonRun] = {}
    result: dict[str, Any] = {"model": model, "forward_costs": forward_costs(model), "arms": {}}
    print(f"[{model}] forward pass per item (ms): {result['forward_costs']}", flush=True)
    try:
        for arm in ARMS:
            (workdir / arm).mkdir()
            daemons[arm] = DaemonRun(arm, model, workdir / arm)
            result["arms"][arm] = {"overrides": daemons[arm].overrides}
        for arm, d in daemons.items():
            d.wait_for(lambda d=d: d.client.get("/readyz").status_code == 200, 300, f"{arm} readiness")
            d.start_producer(workdir / arm)
        for arm, d in daemons.items():
            d.wait_for(lambda d=d: d.model()["training"]["samples_trained"] >= 2000, 300, f"{arm} training")
            run_clients(d.base, 8, 3.0, "mixed", workdir)  # warm-up, not reported
        print(f"[{model}] both daemons ready", flush=True)

        cells: dict[str, dict[str, list[dict[str, Any]]]] = {arm: {} for arm in ARMS}
        for rep in range(timing.repeats):
            order = list(ARMS) if rep % 2 == 0 else list(reversed(ARMS))
            for kind in ("text", "image"):
                for clients in timing.clients:
                    key = f"{kind}/{clients}"
                    for arm in order:
                        records = run_clients(daemons[arm].base, clients, timing.cell_s, kind, workdir)
                        cells[arm].setdefault(key, []).append(summarise(records))
                        print(f"[{model}/{arm}] pass {rep + 1} {key}: {cells[arm][key][-1]}", flush=True)
        for arm, d in daemons.items():
            r = result["arms"][arm]
            r["cells"] = median_cells(cells[arm])
            r["batch_size"] = _batch_sizes(d)
            r["parameters"] = d.model()["parameters"]["total"]
        on = daemons["batching_on"]
        result["overload"] = _overload(on, timing, workdir)
        print(f"[{model}] overload: {result['overload']}", flush=True)
        try:
            result["growth"] = _growth(on, timing, workdir)
        except RuntimeError as err:  # reported; the other model still runs
            result["growth"] = {"error": str(err)[:500], "p99_ratio": None}
        print(f"[{model}] growth (batching on): {result['growth']}", flush=True)
    finally:
        for arm, d in daemons.items():
            result["arms"][arm]["exit_code"] = d.stop()
    return result


def _batch_sizes(d: DaemonRun) -> dict[str, float | None]:
    """Mean items per forward pass over the whole run so far, per modality (from /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(d.client.get("/metrics").text):
        if family.name == "growclip_serve_batch_size":
            for s in family.samples:
                if s.name.endswith(("_sum", "_count")):
                    sums.setdefault(s.labels["modality"], {})[s.name.rsplit("_", 1)[1]] = s.value
    return {m: round(v["sum"] / v["count"], 2) if v.get("count") else None for m, v in sums.items()}


def _growth(d: DaemonRun, timing: Timing, workdir: Path) -> dict[str, Any]:
    """Serving latency while a forced growth runs: from the admin call until its event is recorded.
    The search may decline (no candidate beats the base by more than the noise): serving bore the
    search's load either way, and the outcome is reported."""
    events = len(d.model()["growth_history"])
    total_s = timing.steady_s + 900
    proc, out = start_clients(d.base, 8, total_s, "mixed", workdir)
    time.sleep(2 + timing.steady_s)  # 2 s for the clients to connect
    t_grow = time.time()
    resp = d.client.post("/admin/grow", headers={"Authorization": f"Bearer {d.token}"})
    resp.raise_for_status()
    m = d.wait_for(lambda: len((m := d.model())["growth_history"]) > events and m, 900, "the forced growth")
    event = m["growth_history"][-1]
    t_done = float(event["finished_at"])
    time.sleep(3)  # then the clients stop
    Path(str(out) + ".stop").touch()
    proc.wait(timeout=120)
    records = json.loads(out.read_text())
    steady = summarise(records, t_grow - timing.steady_s, t_grow)
    during = summarise(records, t_grow, t_done)
    ratio = during["p99_ms"] / steady["p99_ms"] if steady["p99_ms"] and during["p99_ms"] else None
    return {
        "clients": 8,
        "growth_s": round(t_done - t_grow, 1),
        "outcome": event.get("outcome"),
        "ops": event.get("ops"),
        "steady": steady,
        "during_growth": during,
        "p99_ratio": round(ratio, 2) if ratio else None,
    }


def _overload(d: DaemonRun, timing: Timing, workdir: Path) -> dict[str, Any]:
    proc, out = start_clients(d.base, 64, timing.overload_s, "heavy", workdir)
    time.sleep(3)  # connected, queues full
    # the main port (whose loop parses the flood) and the control listener (its own loop thread)
    probes: dict[str, list[float]] = {
        "/healthz": [], "/v1/model": [], "control /healthz": [], "control /v1/model": []
    }  # fmt: skip
    errors = 0
    with (
        httpx.Client(base_url=d.base, timeout=30) as main,
        httpx.Client(base_url=f"http://127.0.0.1:{d.control_port}", timeout=30) as control,
    ):
        while proc.poll() is None:
            for probe, seen in probes.items():
                c, path = (control, probe.split()[1]) if probe.startswith("control ") else (main, probe)
                p0 = time.perf_counter()
                if c.get(path).status_code != 200:
                    errors += 1
                seen.append(time.perf_counter() - p0)
            time.sleep(0.05)
    records = json.loads(out.read_text())
    return {
        "clients": 64,
        "items_per_request": 16,
        "answers": summarise(records),
        "probe_errors": errors,
        "probes": {
            path: {
                "n": len(seen),
                "p50_ms": ms(pct(seen, 0.5)),
                "p95_ms": ms(pct(seen, 0.95)),
                "p99_ms": ms(pct(seen, 0.99)),
                "max_ms": ms(max(seen)),
                "under_100ms": round(sum(s < 0.1 for s in seen) / len(seen), 3),
            }
            for path, seen in probes.items()
        },
    }


# -- main -----------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--clients-worker":
        _, _, url, clients, seconds, kind, out = sys.argv
        client_main(url, int(clients), float(seconds), kind, out)
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run; writes no results")
    args = parser.parse_args()
    timing = Timing(cell_s=3.0, repeats=1, steady_s=5.0, overload_s=8.0) if args.quick else Timing()
    if args.quick:
        MODELS.pop("demo")
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    info = machine()
    runs: dict[str, dict[str, Any]] = {}
    for model in MODELS:
        with tempfile.TemporaryDirectory(prefix=f"bench-serving-{model}-") as tmp:
            runs[model] = run_model(model, timing, Path(tmp))
        partial = Path(tempfile.gettempdir()) / "bench-serving-partial.json"
        partial.write_text(json.dumps(runs, indent=2))  # a crash later loses nothing measured
    speedup: dict[str, dict[str, float]] = {}
    growth_ratio: dict[str, float | None] = {}
    for model, run in runs.items():
        on, off = run["arms"]["batching_on"]["cells"], run["arms"]["batching_off"]["cells"]
        speedup[model] = {
            key: round(on[key]["answers_per_s"] / off[key]["answers_per_s"], 2)
            for key in on
            if off.get(key, {}).get("answers_per_s")
        }
        growth_ratio[model] = run["growth"]["p99_ratio"]
    result = {
        "started": started,
        "machine": info,
        "timing": timing.__dict__ | {"clients": list(timing.clients)},
        "runs": runs,
        "batching_speedup": speedup,
        "growth_p99_ratio": growth_ratio,
    }
    print(json.dumps({"batching_speedup": speedup, "growth_p99_ratio": growth_ratio}))
    if args.quick:
        print(json.dumps(result, indent=2)[:4000])
        return
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
