"""Checkpoint benchmark: size, save time and training stall for three model sizes, local disk and S3.

For each model size (~0.1M, ~1M, ~5M parameters, AdamW state populated by two training steps)
the daemon's full training state is checkpointed: weights, optimizer, and the loop's reservoirs at
their default capacities filled with real decoded Fashion-MNIST records (10,000 replayed, 512
held out, uint8 28x28 pixels with their captions). Each save goes through the same code the daemon
uses (`capture` on the training thread, `CheckpointStore.write` in the background) to

- a local folder (files and folder fsynced, renamed into place, LATEST replaced), and
- a local S3-compatible server (moto's, started by this script on a free loopback port).

Reported per size and store, medians over the repetitions (interleaved: size x store in turn):
bytes written (and per file), **stall** (what the training thread waits: `capture`, the copy to
CPU), **write** (serialise + hash + write + fsync + LATEST + prune, off the training thread),
**load** (read + verify checksums + rebuild, what a start pays), and the training steps'
slowdown while a background write runs (median step time during the write over the median without,
the same steps interleaved). Usage: ``.venv/bin/python bench/checkpoint.py [--reps 5] [--quick]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from growclip_stream.batch import Batch
from growclip_stream.checkpoint import CheckpointManager, CheckpointPolicy, CheckpointStore, capture
from growclip_stream.data.datasets import iter_records
from growclip_stream.data.images import ImageTransform
from growclip_stream.data.pipeline import Decoder, Sample, collate
from growclip_stream.data.records import RecordLimits, encode_binary
from growclip_stream.data.reservoir import Reservoir
from growclip_stream.model import ArchConfig, GrowCLIP, TowerConfig
from growclip_stream.model.tokenizer import ByteTokenizer
from growclip_stream.train.config import TrainConfig
from growclip_stream.train.trainer import OnlineTrainer

ROOT = Path(__file__).resolve().parents[1]

# (width, depth per tower, shared depth): about 0.1M, 1M and 5M parameters
SIZES = {"0.1M": (48, 2, 0), "1M": (128, 3, 1), "5M": (224, 5, 2)}


class _Msg:
    def __init__(self, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        self.value, self.headers = value, tuple(headers)


def machine() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    load = Path("/proc/loadavg").read_text().split()[:3]
    return {
        "cpu": cpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_at_start": load,
    }


def arch_of(width: int, depth: int, shared: int) -> ArchConfig:
    tower = TowerConfig(width, depth, 2 * width)
    return ArchConfig(image=tower, text=tower, shared=TowerConfig(width, shared, 2 * width))


def real_samples(n: int) -> list[Sample]:
    decoder = Decoder(ImageTransform(28, 1), RecordLimits())
    records = itertools.islice(iter_records("fashion-mnist", split="train", seed=0, repeat=True), n)
    return [decoder(_Msg(*encode_binary(r, "image/png"))) for r in records]  # type: ignore[arg-type]


@contextmanager
def moto_server() -> Iterator[str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=1).close()
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def s3_store(endpoint: str) -> CheckpointStore:
    bucket = f"ckpt-{uuid.uuid4().hex[:10]}"
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"), timeout=10).close()
    options = {"endpoint_url": endpoint, "key": "bench", "secret": "bench",
               "client_kwargs": {"region_name": "us-east-1"}}  # fmt: skip
    return CheckpointStore(f"s3://{bucket}/growclip", keep=2, storage_options=options)


class Subject:
    """One model size with its optimizer state and full reservoirs, as the daemon would hold them."""

    def __init__(self, name: str, samples: list[Sample], replay: int, holdout: int) -> None:
        torch.manual_seed(0)
        self.name = name
        self.arch = arch_of(*SIZES[name])
        self.trainer = OnlineTrainer(GrowCLIP(self.arch), TrainConfig(batch_size=32))
        self.tokenizer = ByteTokenizer(self.arch.context_length)
        self.batches = [collate(samples[i : i + 32], self.tokenizer) for i in range(0, 32 * 8, 32)]
        for b in self.batches[:2]:
            self.step(b)
        self.replay, self.holdout = Reservoir(replay, seed=1), Reservoir(holdout, seed=2)
        for s in samples[:replay]:
            self.replay.add(s)
        for s in samples[replay : replay + holdout]:
            self.holdout.add(s)

    def step(self, b: Batch) -> float:
        start = time.perf_counter()
        self.trainer.train_step(b)
        return time.perf_counter() - start

    def capture(self) -> Any:
        t = self.trainer
        return capture(
            t.model, t.optimizer, step=t.step, samples=t.samples,
            source={"topic": "growclip.pairs", "cluster_id": "bench", "positions": {"0": t.samples}},
            loop={"replay": self.replay.state_dict(), "holdout": self.holdout.state_dict()},
        )  # fmt: skip


def measure(subject: Subject, store: CheckpointStore) -> dict[str, Any]:
    start = time.perf_counter()
    state = subject.capture()
    stall = time.perf_counter() - start
    saved = store.write(state)
    start = time.perf_counter()
    store.load()
    load = time.perf_counter() - start
    files = {
        name: meta["bytes"]
        for name, meta in json.loads(store.fs.cat_file(f"{saved.path}/manifest.json"))["files"].items()
    }
    # training steps with a background write running, against the same steps without one
    manager = CheckpointManager(store, CheckpointPolicy(every_s=0, every_steps=1))
    during: list[float] = []
    manager.maybe_save(subject.trainer.step + 1, subject.capture)
    for b in itertools.cycle(subject.batches):
        if not manager.writing:
            break
        during.append(subject.step(b))
    manager.close()
    alone = [subject.step(b) for b, _ in zip(itertools.cycle(subject.batches), range(max(3, len(during))))]
    return {
        "bytes": saved.nbytes, "files": files, "stall_s": stall, "write_s": saved.seconds, "load_s": load,
        "steps_during_write": len(during),
        "step_s_during_write": statistics.median(during) if during else None,
        "step_s_alone": statistics.median(alone),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--quick", action="store_true", help="one small run to check the script; writes no file"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "checkpoint.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes, reps, replay, holdout = (
        (["0.1M"], 1, 500, 64) if args.quick else (list(SIZES), args.reps, 10_000, 512)
    )
    samples = real_samples(replay + holdout)
    subjects = {name: Subject(name, samples, replay, holdout) for name in sizes}
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp, moto_server() as endpoint:
        stores = {
            name: {"local": CheckpointStore(f"{tmp}/{name}", keep=2), "s3": s3_store(endpoint)}
            for name in sizes
        }
        for rep in range(reps):  # interleaved: every size and store once per repetition
            for name in sizes:
                for kind, store in stores[name].items():
                    result = measure(subjects[name], store)
                    runs.setdefault(f"{name}/{kind}", []).append(result)
                    print(f"rep {rep} {name:>4} {kind:5} {result['bytes'] / 1e6:7.2f} MB  stall "
                          f"{result['stall_s'] * 1e3:6.1f} ms  write {result['write_s']:6.3f} s  "
                          f"load {result['load_s']:6.3f} s", flush=True)  # fmt: skip
    summary = {}
    for key, results in runs.items():
        name, kind = key.split("/")
        slow = [r["step_s_during_write"] / r["step_s_alone"] for r in results if r["step_s_during_write"]]
        summary[key] = {
            "params": subjects[name].arch.num_params(),
            "store": kind,
            "bytes": results[-1]["bytes"],
            "files": results[-1]["files"],
            "stall_ms_median": round(1e3 * statistics.median(r["stall_s"] for r in results), 2),
            "write_s_median": round(statistics.median(r["write_s"] for r in results), 4),
            "load_s_median": round(statistics.median(r["load_s"] for r in results), 4),
            "step_slowdown_during_write_median": round(statistics.median(slow), 3) if slow else None,
        }
        print(key, json.dumps(summary[key]))
    out = {
        "benchmark": "checkpoint",
        "machine": machine(),
        "reps": reps,
        "replay_samples": replay,
        "holdout_samples": holdout,
        "torch_threads": 1,
        "summary": summary,
        "runs": runs,
    }
    if args.quick:
        print("--quick: results not written")
        return
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
