"""Topic creation survives a connection dropped mid-request (seen on a loaded machine behind a TLS
proxy: one "socket disconnected" failed the whole start)."""

from __future__ import annotations

import contextlib
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaAdminClient

from growclip_stream.data.produce import ensure_topics
from tests.helpers import broker_advertising, free_port


class DroppingRelay:
    """Relays TCP from ``port`` to ``target``; the connections numbered in ``drop`` (1 = the first
    accepted) are closed as soon as their first request arrives, before it reaches the broker."""

    def __init__(self, port: int, target: int, drop: set[int]) -> None:
        self.target, self.drop = target, drop
        self.accepted = 0
        self.dropped = 0
        self._server = socket.create_server(("127.0.0.1", port))
        self._server.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            threading.Thread(target=self._relay, args=(conn, self.accepted in self.drop), daemon=True).start()

    def _relay(self, conn: socket.socket, drop: bool) -> None:
        if drop:
            conn.recv(65536)
            self.dropped += 1
            conn.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.target))

        def pump(src: socket.socket, dst: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := src.recv(65536):
                    dst.sendall(data)
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pump, args=(upstream, conn), daemon=True).start()
        pump(conn, upstream)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._server.close()


@pytest.fixture
def broker_behind_relay(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """(the broker's own port, the relay port it advertises: every client connection goes through it)."""
    relay_port = free_port()
    with broker_advertising(relay_port, tmp_path / "tansu.log") as plain:
        yield plain, relay_port


def test_topic_creation_retries_a_connection_dropped_mid_request(
    broker_behind_relay: tuple[int, int],
) -> None:
    plain, relay_port = broker_behind_relay
    # the admin client's first connection bootstraps (metadata); its second, to the controller,
    # carries the create-topics request: that one is dropped
    relay = DroppingRelay(relay_port, plain, drop={2})
    topic = f"dropped-{uuid.uuid4().hex[:8]}"
    try:
        ensure_topics(f"127.0.0.1:{relay_port}", [topic])
        assert relay.dropped == 1
        admin = KafkaAdminClient(
            bootstrap_servers=f"127.0.0.1:{relay_port}"
        )  # the broker advertises the relay
        try:
            assert topic in admin.list_topics()
        finally:
            admin.close()
    finally:
        relay.close()
