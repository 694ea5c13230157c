"""Per-record cost of each ingest decode stage, old way against new, on one core.

The same records as ``bench/ingest.py`` (``2k``: 72x72 grey PNG; ``20k``: 224x224 RGB JPEG; JSON
wire format), decoded to the demo model's 28x28x1 input. Each stage runs over 500 records, 7
times; the median per-record time is reported:

- envelope: stdlib ``json`` + ``base64`` against ``orjson`` + ``pybase64``;
- image: Pillow (the general decoder, forced) against the OpenCV fast path, both through
  ``ImageTransform.pixels`` (decode, resize, crop);
- whole: ``route()`` as the decode workers run it.

``--compare-rev REV`` also times ``route()`` as it was at git revision REV (checked out in a
temporary worktree, run in a subprocess with that tree first on the path), interleaved with the
current code, ``--rounds`` times each.

Usage: ``.venv/bin/python bench/decode_stages.py [--compare-rev REV]`` (~1-3 min), writes
``results/decode_stages.json``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import orjson
import pybase64
import torch
from ingest import DECODER, HOLDOUT, ROOT, machine, make_records

from growclip_stream.data import images
from growclip_stream.data.kafka_source import Message
from growclip_stream.data.pipeline import route
from growclip_stream.data.records import encode_json

REPEATS = 7
N = 500


def per_record_us(fn: Callable[[Any], object], items: Sequence[Any]) -> float:
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        times.append((time.perf_counter() - t0) / len(items) * 1e6)
    return round(statistics.median(times), 1)


@contextmanager
def general_decoder_only() -> Iterator[None]:
    """The fast path switched off: every image goes through Pillow, as before OpenCV."""
    png, jpeg = images._png_fast_flags, images._jpeg_fast_flags
    images._png_fast_flags = images._jpeg_fast_flags = lambda *a: None  # type: ignore[assignment]
    try:
        yield
    finally:
        images._png_fast_flags, images._jpeg_fast_flags = png, jpeg  # type: ignore[assignment]


def stages(kind: str, only_route: bool = False) -> dict[str, float]:
    records = make_records(kind, N)
    values = [encode_json(r) for r in records]
    if only_route:
        messages = [Message("t", 0, i, v, (), 0) for i, v in enumerate(values)]
        return {"route()": per_record_us(lambda m: route(DECODER, m, HOLDOUT), messages)}
    b64 = [json.loads(v)["image"] for v in values]
    raw = [r.image for r in records]
    messages = [Message("t", 0, i, v, (), 0) for i, v in enumerate(values)]

    def pixels(data: bytes) -> object:
        return DECODER.transform.pixels(data, DECODER.limits)

    with general_decoder_only():
        pillow = per_record_us(pixels, raw)
    return {
        "json.loads": per_record_us(json.loads, values),
        "orjson.loads": per_record_us(orjson.loads, values),
        "base64.b64decode": per_record_us(lambda s: base64.b64decode(s, validate=True), b64),
        "pybase64.b64decode": per_record_us(lambda s: pybase64.b64decode(s, validate=True), b64),
        "pixels, Pillow": pillow,
        "pixels, OpenCV fast path": per_record_us(pixels, raw),
        "route()": per_record_us(lambda m: route(DECODER, m, HOLDOUT), messages),
    }


# Runs in the other revision's tree: only what existed there (route, Decoder, the bench's records).
_ROUTE_AT_REV = """
import json, statistics, sys, time
sys.path.insert(0, "bench")
import torch
from ingest import DECODER, HOLDOUT, make_records
from growclip_stream.data.kafka_source import Message
from growclip_stream.data.pipeline import route
from growclip_stream.data.records import encode_json
torch.set_num_threads(1)
out = {}
for kind in ("2k", "20k"):
    msgs = [Message("t", 0, i, encode_json(r), (), 0) for i, r in enumerate(make_records(kind, N))]
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for m in msgs:
            route(DECODER, m, HOLDOUT)
        times.append((time.perf_counter() - t0) / len(msgs) * 1e6)
    out[kind] = statistics.median(times)
print(json.dumps(out))
"""


def route_at_rev(tree: str) -> dict[str, float]:
    code = f"N = {N}\nREPEATS = {REPEATS}\n" + _ROUTE_AT_REV
    env = {**os.environ, "PYTHONPATH": tree}  # ahead of the editable install of this tree
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, env=env, check=True, capture_output=True, text=True
    )
    return {k: round(v, 1) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def compare(rev: str, rounds: int) -> dict[str, Any]:
    """route() at ``rev`` and now, interleaved ``rounds`` times; medians of the per-round medians."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = os.path.join(tmp, "tree")
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", tree, rev], check=True)
        try:
            then: dict[str, list[float]] = {"2k": [], "20k": []}
            now: dict[str, list[float]] = {"2k": [], "20k": []}
            for _ in range(rounds):
                for kind, us in route_at_rev(tree).items():
                    then[kind].append(us)
                for kind in now:
                    now[kind].append(stages(kind, only_route=True)["route()"])
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", tree], check=True)
    return {
        "rev": rev,
        "rounds": rounds,
        "route_us_at_rev": then,
        "route_us_now": now,
        "median_at_rev": {k: statistics.median(v) for k, v in then.items()},
        "median_now": {k: statistics.median(v) for k, v in now.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--compare-rev", default=None, help="also time route() at this git revision")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    images.cv2.setNumThreads(1)
    summary: dict[str, Any] = {
        "benchmark": "decode_stages",
        "machine": machine(),
        "records": N,
        "repeats": REPEATS,
        "us_per_record_median": {kind: stages(kind) for kind in ("2k", "20k")},
    }
    if args.compare_rev:
        summary["route_compared"] = compare(args.compare_rev, args.rounds)
    out = ROOT / "bench" / "results" / "decode_stages.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print("| µs per record | 2k | 20k |\n| --- | ---: | ---: |")
    res = summary["us_per_record_median"]
    for stage in res["2k"]:
        print(f"| {stage} | {res['2k'][stage]} | {res['20k'][stage]} |")
    if args.compare_rev:
        cmp = summary["route_compared"]
        for kind in ("2k", "20k"):
            then, now = cmp["median_at_rev"][kind], cmp["median_now"][kind]
            print(f"route() {kind}: {then} us at {args.compare_rev}, {now} now")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
