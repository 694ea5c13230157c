"""Small helpers the tests share: free ports, tiny architectures, random batches, daemon processes."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import torch

from growclip_stream.batch import Batch
from growclip_stream.data.kafka_source import KafkaSource, KafkaSourceConfig, Message
from growclip_stream.data.pipeline import Decoder, RawMessage, Sample
from growclip_stream.model import ArchConfig, GrowCLIP, TowerConfig

DAEMON = [sys.executable, "-m", "growclip_daemon.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def broker_advertising(advertised_port: int, log_path: Path) -> Iterator[int]:
    """A Tansu broker (memory storage) on a free port that advertises ``advertised_port``, where a
    relay or proxy of the test listens, so every client connection after bootstrap goes through
    it. Yields the broker's own port; stops it on exit."""
    from growclip_daemon.broker import tansu_binary

    plain = free_port()
    with open(log_path, "wb") as log:
        broker = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", f"tcp://127.0.0.1:{plain}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{advertised_port}",
             "--storage-engine", "memory://tansu/"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "NO_COLOR": "1"},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            assert broker.poll() is None, log_path.read_text()
            try:
                socket.create_connection(("127.0.0.1", plain), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "broker did not listen"
                time.sleep(0.1)
        yield plain
    finally:
        broker.send_signal(signal.SIGINT)  # Tansu stops at once
        try:
            broker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait()


def _parent_pids() -> dict[int, int]:
    """pid -> parent pid of every process, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def child_pids(pid: int) -> list[int]:
    """The live children of pid."""
    return [child for child, parent in _parent_pids().items() if parent == pid]


def descendant_pids(pid: int) -> list[int]:
    """Every live descendant of pid."""
    parents = _parent_pids()
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        frontier += kids
    return found


def process_alive(pid: int) -> bool:
    """Whether pid runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class CrashingDecoder(Decoder):
    """A decoder that dies by SIGSEGV on the message ``b"crash"``, as a C image library might on
    hostile bytes, and never returns on ``b"hang"``; only inside a worker process (never the test
    runner)."""

    def __call__(self, msg: RawMessage) -> Sample:
        if msg.value == b"crash" and multiprocessing.parent_process() is not None:
            os.kill(os.getpid(), signal.SIGSEGV)
        if msg.value == b"hang" and multiprocessing.parent_process() is not None:
            time.sleep(3600)
        return super().__call__(msg)


_slow_start_done = False  # per process: the start-up delay of SlowStartDecoder was paid


class SlowStartDecoder(CrashingDecoder):
    """A :class:`CrashingDecoder` whose first arrival in each worker process takes ``start_s``,
    as importing torch does on a loaded machine: start-up that is not any record's fault."""

    def __init__(self, *args: Any, start_s: float = 3.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start_s = start_s

    def __setstate__(self, state: dict[str, Any]) -> None:
        global _slow_start_done
        self.__dict__.update(state)
        if multiprocessing.parent_process() is not None and not _slow_start_done:
            time.sleep(self.start_s)
            _slow_start_done = True


def create_bucket(s3_endpoint: str, prefix: str) -> str:
    """A new, empty bucket on the test S3 server; returns its name."""
    bucket = f"{prefix}-{uuid.uuid4().hex[:12]}"
    request = urllib.request.Request(f"{s3_endpoint}/{bucket}", method="PUT")
    urllib.request.urlopen(request, timeout=10).close()
    return bucket


def s3_options(s3_endpoint: str) -> dict[str, Any]:
    """fsspec storage options for the test S3 server."""
    return {
        "endpoint_url": s3_endpoint,
        "key": "test",
        "secret": "test",
        "client_kwargs": {"region_name": "us-east-1"},
    }


def tiny_arch(width: int = 16, shared_depth: int = 0) -> ArchConfig:
    """A model small enough for unit tests (a few thousand parameters)."""
    tower = TowerConfig(width=width, depth=1, mlp_hidden=2 * width, head_dim=8)
    shared = TowerConfig(width=width, depth=shared_depth, mlp_hidden=2 * width, head_dim=8)
    return ArchConfig(image=tower, text=tower, shared=shared, embed_dim=16)


def operator_arch(shared_depth: int = 1) -> ArchConfig:
    """8x8 images, towers of different widths and MLP sizes: the growth operators' test model,
    small enough to check function preservation exhaustively."""
    return ArchConfig(
        image=TowerConfig(16, 1, 32, head_dim=8),
        text=TowerConfig(16, 1, 24, head_dim=8),
        shared=TowerConfig(16, shared_depth, 32, head_dim=8),
        embed_dim=8,
        image_size=8,
        patch_size=4,
        context_length=8,
    )


def random_model(arch: ArchConfig, seed: int = 0) -> GrowCLIP:
    """A model with every parameter random (see :func:`randomized`)."""
    torch.manual_seed(seed)
    return randomized(GrowCLIP(arch), seed)


def random_batches(arch: ArchConfig, n: int, size: int = 8, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [
        Batch(
            torch.randn(size, arch.channels, arch.image_size, arch.image_size, generator=g),
            torch.randint(0, 256, (size, arch.context_length), generator=g),
            tuple(f"{seed}-{i}-{j}" for j in range(size)),
        )
        for i in range(n)
    ]


def randomized(model: GrowCLIP, seed: int = 0) -> GrowCLIP:
    """Every parameter random (LayerNorm gains around 1, biases too), so no zero init hides a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name and name.endswith(".weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name != "logit_scale":
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def consume_topic(bootstrap: str, topic: str, n: int, timeout_s: float = 20.0) -> list[Message]:
    """Exactly the first `n` messages of every partition of `topic` (fails on fewer, or more)."""
    src = KafkaSource(KafkaSourceConfig(bootstrap=bootstrap, topic=topic, group_id=topic, partitions="all"))
    try:
        out: list[Message] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < n:
            assert time.monotonic() < deadline, f"got {len(out)} of {n} messages"
            out.extend(src.poll(0.5, max_records=n - len(out)))
        assert src.poll(0.5) == []  # and nothing more
        return out
    finally:
        src.close()


class Daemon:
    """`growclip-daemon start` as a child process, with its log, HTTP client and checkpoints."""

    def __init__(self, tmp: Path, *settings: str, config: Path | None = None, control: bool = False) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.control_port = free_port() if control else None  # serve.control_port: the control listener
        args = ["start", *(["--config", str(config)] if config else [])]
        defaults = [
            f"serve.port={self.port}",
            *([f"serve.control_port={self.control_port}"] if self.control_port else []),
            f"pidfile={tmp / 'daemon.pid'}",
            f"checkpoint.root={tmp / 'ckpt'}",
        ]
        for item in [*defaults, *settings]:
            args += ["--set", item]
        self.log_path = tmp / "daemon.log"
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(DAEMON + args, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text()[-chars:]

    def get(self, path: str) -> Any:
        """JSON of a GET, or None while the server does not answer 200."""
        try:
            resp = self.client.get(path)
        except httpx.HTTPError:
            return None
        return resp.json() if resp.status_code == 200 else None

    def wait_for(self, predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (
                f"daemon exited early with {self.proc.returncode}:\n{self.log_tail()}"
            )
            value = predicate()
            if value:
                return value
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 90) -> int:
        """SIGTERM, then the exit code (killed after the timeout)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def manifest(self) -> dict[str, Any]:
        latest = (self.tmp / "ckpt" / "LATEST").read_text().strip()
        return json.loads((self.tmp / "ckpt" / latest / "manifest.json").read_text())
