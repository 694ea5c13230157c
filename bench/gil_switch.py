"""Serving against training under the GIL: `serve.gil_switch_interval_ms` at Python's 5 ms and shorter.

The trainer holds the GIL between its kernels; the HTTP event loop and the batchers need it several
times per request. Python hands a waiting thread the GIL only after the holder's switch interval,
so on a busy process every request can wait several intervals. This benchmark runs the daemon
(`configs/demo.yaml`, batching on, training on a stream produced from another process, growth off)
once per arm, all arms side by side and their cells interleaved (the order reversed every pass), and
measures per arm:

- single-text and single-image `POST /v1/embeddings` at 32 concurrent clients: answers/s, p50/p99;
- 64 clients far past capacity while `/healthz` is probed every 50 ms: probe latency p50/p99/max;
- training throughput (samples/s from `/v1/model`) over the whole run.

    .venv/bin/python bench/gil_switch.py            # ~6 min, writes bench/results/gil_switch.json
    .venv/bin/python bench/gil_switch.py --quick    # smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serving import DaemonRun, Timing, _overload, machine, median_cells, run_clients, summarise

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "gil_switch.json"
ARMS = {"python_default_5ms": None, "1ms": "1.0", "0.5ms": "0.5"}


def _samples(d: DaemonRun) -> tuple[float, int]:
    return time.monotonic(), int(d.model()["training"]["samples_trained"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    cell_s, repeats, overload_s = (3.0, 1, 6.0) if args.quick else (6.0, 3, 12.0)
    result: dict[str, Any] = {
        "benchmark": "gil_switch",
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {"cell_s": cell_s, "repeats": repeats, "overload_s": overload_s, "clients": 32},
        "arms": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-gil-") as tmp:
        workdir = Path(tmp)
        daemons: dict[str, DaemonRun] = {}
        try:
            for arm, interval in ARMS.items():
                (workdir / arm).mkdir()
                extra = {} if interval is None else {"serve.gil_switch_interval_ms": interval}
                daemons[arm] = DaemonRun("batching_on", "demo", workdir / arm, extra=extra)
            for arm, d in daemons.items():
                d.wait_for(lambda d=d: d.client.get("/readyz").status_code == 200, 300, f"{arm} readiness")
                d.start_producer(workdir / arm)
            for arm, d in daemons.items():
                trained = lambda d=d: d.model()["training"]["samples_trained"] >= 2000  # noqa: E731
                d.wait_for(trained, 300, f"{arm} training")
            start = {arm: _samples(d) for arm, d in daemons.items()}
            cells: dict[str, dict[str, list[dict[str, Any]]]] = {arm: {} for arm in ARMS}
            for rep in range(repeats):
                order = list(ARMS) if rep % 2 == 0 else list(reversed(ARMS))
                for kind in ("text", "image"):
                    for arm in order:
                        records = run_clients(daemons[arm].base, 32, cell_s, kind, workdir)
                        cells[arm].setdefault(kind, []).append(summarise(records))
                        print(f"[{arm}] pass {rep + 1} {kind}/32: {cells[arm][kind][-1]}", flush=True)
            end = {arm: _samples(d) for arm, d in daemons.items()}
            timing = Timing(overload_s=overload_s)
            for arm, d in daemons.items():
                r: dict[str, Any] = {"overrides": d.overrides}
                r["cells"] = median_cells(cells[arm])
                (t0, s0), (t1, s1) = start[arm], end[arm]
                r["train_samples_per_s"] = round((s1 - s0) / (t1 - t0), 1)
                r["overload"] = _overload(d, timing, workdir)
                print(f"[{arm}] {json.dumps({k: v for k, v in r.items() if k != 'overrides'})}", flush=True)
                result["arms"][arm] = r
        finally:
            for d in daemons.values():
                d.stop()
    base = result["arms"]["python_default_5ms"]

    def ratio(r: dict[str, Any], *path: str) -> float:
        a, b = r, base
        for key in path:
            a, b = a[key], b[key]
        return round(a / b, 2)

    result["ratios_vs_default"] = {
        arm: {
            "text_answers": ratio(r, "cells", "text", "answers_per_s"),
            "image_answers": ratio(r, "cells", "image", "answers_per_s"),
            "train_samples": ratio(r, "train_samples_per_s"),
            "healthz_p99": ratio(r, "overload", "probes", "/healthz", "p99_ms"),
        }
        for arm, r in result["arms"].items()
    }
    print(json.dumps(result["ratios_vs_default"]))
    if args.quick and args.out == RESULTS:
        print("quick run: results not written")
        return
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
