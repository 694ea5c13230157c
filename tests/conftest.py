"""Shared fixtures: one real Tansu broker and one local S3-compatible server (moto's) for the whole
test run, and a fresh topic per test."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from growclip_daemon.broker import EmbeddedBroker
from growclip_stream.data.produce import ensure_topics
from tests.helpers import free_port


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address ("127.0.0.1:PORT") of a real Tansu broker shared by the whole run."""
    log_path: Path = tmp_path_factory.mktemp("broker") / "tansu.log"
    b = EmbeddedBroker(port=0, log_path=log_path)
    b.start(timeout_s=30)
    try:
        yield b.bootstrap
    finally:
        b.stop()


@pytest.fixture
def topic(broker: str, request: pytest.FixtureRequest) -> str:
    """A unique, pre-created topic name for this test; ``<topic>.dlq`` is pre-created too."""
    stem = re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name).strip("-")[:60]
    name = f"t-{stem}-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker, [name, f"{name}.dlq"])
    return name


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local S3-compatible server (moto's) on a free loopback port."""
    pytest.importorskip("moto.server", reason="needs moto[server] (requirements.txt)")
    port = free_port()
    log_file = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "moto server exited"
            try:
                urllib.request.urlopen(url + "/", timeout=1).close()
                break
            except (urllib.error.URLError, OSError):
                assert time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()
