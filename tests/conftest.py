"""Shared fixtures: one real Tansu broker for the whole test run, and a fresh topic per test."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from growclip_daemon.broker import EmbeddedBroker
from growclip_stream.data.produce import ensure_topics


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
