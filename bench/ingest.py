"""Ingest benchmark: records/s through consume + decode + validate, against raw kafka-python consumption.

One run on one machine, one embedded broker (Tansu, memory storage), the same records for every
variant. Two record sizes, made from real Fashion-MNIST train images (Debian
``dataset-fashion-mnist``):

- ``2k``: the 28x28 image upscaled (bicubic) to 72x72, 8-bit grayscale PNG: ~2.0 KB;
- ``20k``: upscaled to 224x224, tinted to RGB, with Gaussian noise texture (sigma 13) added so the
  JPEG (quality 90) weighs ~20 KB, as a photo of that size would.

Records go in the JSON wire format (base64 image, so messages are ~1.35x the image size) or, with
``--format binary``, as the image bytes with id, caption and content type in Kafka headers; one
partition per topic. The decode target is the demo model's input (28x28, 1 channel).

Variants, each timed from the first poll to the last record out:

- ``raw``: a plain ``KafkaConsumer`` (same fetch settings as the source) polling every record;
- ``sequential``: ``KafkaSource.poll`` then ``route()`` per message in the same thread;
- ``thread-N`` / ``process-N``: ``KafkaSource`` feeding ``DecodePipeline`` (N workers) the way the
  online loop does: poll at most ``room()`` records without waiting while some are in flight, and
  with no room wait for decoded items instead of polling;
- ``decode-only``: the same decode paths over messages already in memory (no Kafka), showing the
  decode's own parallelism.

Repetitions are interleaved (every variant once per round) so that other load on the machine
hits all variants alike; medians are reported, with the 1-minute load average sampled per
round. Usage: ``.venv/bin/python bench/ingest.py [--rounds 5] [--quick] [--format binary]``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import kafka
import numpy as np
import torch
import torchdata
from kafka import KafkaConsumer, TopicPartition
from PIL import Image

from growclip_daemon.broker import EmbeddedBroker
from growclip_stream.data.datasets import iter_records
from growclip_stream.data.decode import DecodePipeline, Method
from growclip_stream.data.images import ImageTransform
from growclip_stream.data.kafka_source import KafkaSource, KafkaSourceConfig, Message
from growclip_stream.data.pipeline import Decoder, route
from growclip_stream.data.produce import MAX_REQUEST_BYTES, ensure_topics, produce
from growclip_stream.data.records import Record, RecordLimits

ROOT = Path(__file__).resolve().parents[1]
HOLDOUT = 0.02
DECODER = Decoder(ImageTransform(size=28, channels=1), RecordLimits())
WireFormat = Literal["json", "binary"]
PIPELINES: tuple[tuple[Method, int], ...] = (("thread", 1), ("thread", 2), ("process", 1), ("process", 2))


# -- records --------------------------------------------------------------------------------------


def _encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def image_2k(img: Image.Image, _rng: np.random.Generator) -> bytes:
    return _encode(img.resize((72, 72), Image.Resampling.BICUBIC), "PNG")


def image_20k(img: Image.Image, rng: np.random.Generator) -> bytes:
    gray = np.asarray(img.resize((224, 224), Image.Resampling.BICUBIC), dtype=np.float32)
    rgb = np.stack([gray, gray * 0.8 + 20, gray * 0.6 + 40], axis=-1)
    rgb += rng.normal(0.0, 13.0, size=rgb.shape)
    return _encode(Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB"), "JPEG", quality=90)


SIZES: dict[str, Callable[[Image.Image, np.random.Generator], bytes]] = {"2k": image_2k, "20k": image_20k}


def make_records(kind: str, n: int, distinct: int = 2000) -> list[Record]:
    """``n`` records cycling over ``distinct`` Fashion-MNIST images, with unique ids."""
    rng = np.random.default_rng(0)
    base = []
    for rec in iter_records("fashion-mnist", split="train", seed=0):
        base.append(Record(rec.id, rec.caption, SIZES[kind](Image.open(io.BytesIO(rec.image)), rng)))
        if len(base) >= min(n, distinct):
            break
    return [
        Record(f"{base[i % len(base)].id}#r{i}", base[i % len(base)].caption, base[i % len(base)].image)
        for i in range(n)
    ]


# -- variants -----------------------------------------------------------------------------------


def raw_consume(bootstrap: str, topic: str, n: int) -> float:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        max_partition_fetch_bytes=MAX_REQUEST_BYTES,
        max_poll_records=500,
    )
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        got = 0
        t0 = time.perf_counter()
        while got < n:
            for batch in consumer.poll(timeout_ms=500).values():
                got += len(batch)
        return n / (time.perf_counter() - t0)
    finally:
        consumer.close()


def _source(bootstrap: str, topic: str) -> KafkaSource:
    return KafkaSource(
        KafkaSourceConfig(
            bootstrap=bootstrap, topic=topic, group_id=f"bench-{uuid.uuid4().hex[:8]}", partitions="all"
        )
    )


def sequential(bootstrap: str, topic: str, n: int) -> float:
    with _source(bootstrap, topic) as src:
        done = errors = 0
        t0 = time.perf_counter()
        while done < n:
            for msg in src.poll(0.5):
                status, _ = route(DECODER, msg, HOLDOUT)
                errors += status not in ("trained", "held_out")
                done += 1
        rate = n / (time.perf_counter() - t0)
    _check(errors)
    return rate


def pipelined(pipe: DecodePipeline[Message], bootstrap: str, topic: str, n: int) -> float:
    """The online loop's ingest (``OnlineLoop.run_once``): poll at most ``room()`` records, without
    waiting while some are being decoded; with no room, wait for decoded items instead of polling."""
    with _source(bootstrap, topic) as src:
        done = errors = 0
        t0 = time.perf_counter()
        while done < n:
            room = pipe.room()
            msgs: list[Message] = []
            if room > 0:
                msgs = src.poll(0.0 if pipe.in_flight() else 0.5, max_records=min(room, 500))
                pipe.submit(msgs)
            for item in pipe.take(timeout_s=0.0 if msgs else 0.05):
                errors += item.error is not None
                done += 1
        rate = n / (time.perf_counter() - t0)
    _check(errors)
    return rate


def decode_only_sequential(messages: Sequence[Message]) -> float:
    t0 = time.perf_counter()
    for msg in messages:
        route(DECODER, msg, HOLDOUT)
    return len(messages) / (time.perf_counter() - t0)


def decode_only(pipe: DecodePipeline[Message], messages: Sequence[Message]) -> float:
    t0 = time.perf_counter()
    n = sum(1 for _ in pipe.map(messages))
    return n / (time.perf_counter() - t0)


def _check(errors: int) -> None:
    if errors:
        raise RuntimeError(f"{errors} records failed to decode: the benchmark's records are broken")


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Case:
    kind: str
    topic: str
    n: int
    messages: list[Message]  # the same records, in memory, for the decode-only variants


def machine() -> dict[str, Any]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchdata": torchdata.__version__,
        "kafka_python": kafka.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def prepare(bootstrap: str, kind: str, n: int, wire_format: WireFormat) -> Case:
    records = make_records(kind, n)
    topic = f"ingest-{kind}-{uuid.uuid4().hex[:6]}"
    ensure_topics(bootstrap, [topic])
    produce(bootstrap, topic, records, fmt=wire_format)
    with _source(bootstrap, topic) as src:  # read back once: the messages for decode-only, and a warm broker
        messages: list[Message] = []
        while len(messages) < n:
            messages += src.poll(0.5)
    image_bytes = statistics.median(len(r.image) for r in records[:500])
    message_bytes = statistics.median(len(m.value) for m in messages[:500])
    print(
        f"{kind}: {n} records, image {image_bytes:.0f} B, message {message_bytes:.0f} B (median)", flush=True
    )
    return Case(kind, topic, n, messages)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads), from ``/proc``; 0 once gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, stack = [], list(children.get(pid, []))
    while stack:
        child = stack.pop()
        out.append(child)
        stack.extend(children.get(child, []))
    return out


class CpuMeter:
    """CPU seconds spent during a measurement by this process (the consumer, the pipeline's
    threads), the broker, and every other descendant (decode worker processes)."""

    def __init__(self, broker_pid: int) -> None:
        self.broker_pid = broker_pid

    def sample(self) -> dict[str, float]:
        others = [p for p in _descendants(os.getpid()) if p != self.broker_pid]
        return {
            "consumer process": _cpu_seconds(os.getpid()),
            "broker": _cpu_seconds(self.broker_pid),
            "decode workers": sum(_cpu_seconds(p) for p in others),
        }

    def measure(self, fn: Callable[[], float], n: int) -> tuple[float, dict[str, float]]:
        """(records/s, CPU microseconds per record by part) of one timed run of ``fn``."""
        before = self.sample()
        rate = fn()
        after = self.sample()
        return rate, {k: round((after[k] - before[k]) / n * 1e6, 1) for k in before}


def wait_for_quiet(max_load: float | None, wait_s: float) -> float:
    """Waits (at most ``wait_s``) until the 1-minute load average is under ``max_load``; returns it.

    The machine may be shared: a round measured while other processes hold the cores says little
    about decode parallelism. The load is recorded either way."""
    deadline = time.monotonic() + wait_s
    while max_load is not None and os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def run(
    rounds: int,
    counts: dict[str, int],
    wire_format: WireFormat = "json",
    max_load: float | None = None,
    wait_s: float = 0.0,
) -> dict[str, Any]:
    host = machine()  # before any pipeline runs
    broker = EmbeddedBroker(port=0)
    broker.start()
    assert broker.pid is not None
    meter = CpuMeter(broker.pid)
    pipes = {
        (method, workers): DecodePipeline[Message](DECODER, HOLDOUT, num_workers=workers, method=method)
        for method, workers in PIPELINES
    }
    try:
        cases = [prepare(broker.bootstrap, kind, n, wire_format) for kind, n in counts.items()]
        for pipe in pipes.values():  # start the workers (process workers import torch) before timing
            list(pipe.map(cases[0].messages[:64]))
        rates: dict[str, dict[str, list[float]]] = {c.kind: {} for c in cases}
        cpu: dict[str, dict[str, list[dict[str, float]]]] = {c.kind: {} for c in cases}
        load: list[float] = []
        for r in range(rounds):
            load.append(wait_for_quiet(max_load, wait_s))
            for case in cases:
                bootstrap = broker.bootstrap
                measure: dict[str, Callable[[], float]] = {
                    "raw": partial(raw_consume, bootstrap, case.topic, case.n),
                    "sequential": partial(sequential, bootstrap, case.topic, case.n),
                    "decode-only sequential": partial(decode_only_sequential, case.messages),
                }
                for (method, workers), pipe in pipes.items():
                    measure[f"{method}-{workers}"] = partial(pipelined, pipe, bootstrap, case.topic, case.n)
                    measure[f"decode-only {method}-{workers}"] = partial(decode_only, pipe, case.messages)
                for name, fn in measure.items():
                    rate, cpu_us = meter.measure(fn, case.n)
                    rates[case.kind].setdefault(name, []).append(rate)
                    cpu[case.kind].setdefault(name, []).append(cpu_us)
                print(
                    f"round {r + 1}/{rounds} {case.kind}: "
                    + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates[case.kind].items()),
                    flush=True,
                )
        load.append(os.getloadavg()[0])
    finally:
        for pipe in pipes.values():
            pipe.close()
        broker.stop()
    return summarise(host, rates, cpu, counts, rounds, load, wire_format)


def summarise(
    host: dict[str, Any],
    rates: dict[str, dict[str, list[float]]],
    cpu: dict[str, dict[str, list[dict[str, float]]]],
    counts: dict[str, int],
    rounds: int,
    load: list[float],
    wire_format: WireFormat,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for kind, by_variant in rates.items():
        medians = {name: statistics.median(v) for name, v in by_variant.items()}
        cpu_medians = {
            name: {part: statistics.median(r[part] for r in runs) for part in runs[0]}
            for name, runs in cpu[kind].items()
        }
        raw = medians["raw"]
        full = {
            name: m for name, m in medians.items() if name != "raw" and not name.startswith("decode-only")
        }
        best = max(full, key=lambda k: full[k])
        results[kind] = {
            "records": counts[kind],
            "records_per_s": {name: [round(x, 1) for x in v] for name, v in by_variant.items()},
            "median_records_per_s": {name: round(m, 1) for name, m in medians.items()},
            "ratio_to_raw": {name: round(m / raw, 3) for name, m in full.items()},
            "best_full_path": best,
            "best_ratio_to_raw": round(full[best] / raw, 3),
            # CPU microseconds per record, median over rounds, by part: what bounds the rate on
            # this many cores
            "median_cpu_us_per_record": cpu_medians,
            "target_ratio": 0.8,
            "meets_target": full[best] / raw >= 0.8,
        }
    return {
        "benchmark": "ingest",
        "machine": host,
        "rounds": rounds,
        "loadavg_1min_per_round": [round(x, 2) for x in load],
        "decode": {"image_size": 28, "channels": 1, "holdout_fraction": HOLDOUT, "wire_format": wire_format},
        "results": results,
    }


def table(summary: dict[str, Any]) -> str:
    lines = ["| records | variant | median records/s | ratio to raw |", "| --- | --- | ---: | ---: |"]
    for kind, res in summary["results"].items():
        for name, median in res["median_records_per_s"].items():
            ratio = res["ratio_to_raw"].get(name)
            lines.append(f"| {kind} | {name} | {median:,.0f} | {'' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--records-2k", type=int, default=12_000)
    parser.add_argument("--records-20k", type=int, default=5_000)
    parser.add_argument("--quick", action="store_true", help="2 rounds of few records (a smoke run)")
    parser.add_argument(
        "--max-load", type=float, default=None, help="wait for a lower load average per round"
    )
    parser.add_argument("--wait-s", type=float, default=600.0, help="longest wait for --max-load, per round")
    parser.add_argument(
        "--format", choices=("json", "binary"), default="json", help="the wire format of the records"
    )
    parser.add_argument(
        "--out", type=Path, default=None,
        help="default: results/ingest[_binary].json; with --quick, a file in the temp directory",
    )  # fmt: skip
    args = parser.parse_args(argv)
    suffix = "" if args.format == "json" else "_binary"
    # a smoke run never overwrites committed results
    default = Path(tempfile.gettempdir()) if args.quick else ROOT / "bench" / "results"
    out: Path = args.out or default / f"ingest{suffix}{'_quick' if args.quick else ''}.json"
    counts = {"2k": args.records_2k, "20k": args.records_20k}
    rounds = args.rounds
    if args.quick:
        counts, rounds = {"2k": 1500, "20k": 600}, 2
    summary = run(rounds, counts, args.format, args.max_load, args.wait_s)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(table(summary))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
