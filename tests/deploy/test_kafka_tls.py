"""kafka.security reaches every client: topic creation, the producer, the consumer and the dead letter
all talk TLS to a real broker that is reachable only through TLS (a TLS terminator in front of a Tansu
broker whose advertised address is the terminator's), with a CA file from the config."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import pytest
import yaml

from growclip_daemon.config import load_config
from growclip_stream.data.datasets import iter_records
from growclip_stream.data.kafka_source import KafkaDeadLetter, KafkaSource, KafkaSourceConfig
from growclip_stream.data.produce import ensure_topics, produce
from tests.helpers import DAEMON, broker_advertising, free_port


class TlsTerminator:
    """Accepts TLS on ``port`` and relays the plaintext to ``target``; counts completed handshakes."""

    def __init__(self, port: int, target: int, cert: Path, key: Path) -> None:
        self.target = target
        self.handshakes = 0
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(cert, key)
        self._server = socket.create_server(("127.0.0.1", port))
        self._server.settimeout(0.2)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, name="tls-terminator", daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._server.accept()
            except TimeoutError:
                continue
            t = threading.Thread(target=self._relay, args=(raw,), daemon=True)
            self._threads.append(t)
            t.start()

    def _relay(self, raw: socket.socket) -> None:
        try:
            raw.settimeout(10)
            tls = self._ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        self.handshakes += 1
        upstream = socket.create_connection(("127.0.0.1", self.target), timeout=10)
        for s in (tls, upstream):
            s.settimeout(0.2)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            while not self._stop.is_set():
                try:
                    data = src.recv(65536)
                except (TimeoutError, ssl.SSLWantReadError):
                    continue
                except OSError:
                    break
                if not data:
                    break
                try:
                    dst.sendall(data)
                except OSError:
                    break
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

        back = threading.Thread(target=pump, args=(upstream, tls), daemon=True)
        back.start()
        pump(tls, upstream)
        back.join(timeout=5)
        for s in (tls, upstream):
            s.close()

    def close(self) -> None:
        self._stop.set()
        self._accept.join(timeout=5)
        self._server.close()
        for t in self._threads:
            t.join(timeout=5)


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[str, Path, TlsTerminator]]:
    """(bootstrap of the TLS endpoint, the CA file that verifies it, the terminator)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    tls_port = free_port()
    with broker_advertising(tls_port, tmp_path / "tansu.log") as plain:
        terminator = TlsTerminator(tls_port, plain, cert, key)
        try:
            yield f"127.0.0.1:{tls_port}", cert, terminator
        finally:
            terminator.close()


@pytest.mark.slow
def test_every_kafka_client_speaks_tls_with_the_configured_ca(tls_broker) -> None:
    bootstrap, ca, terminator = tls_broker
    cfg = load_config(
        None,
        [
            f"kafka.bootstrap={bootstrap}",
            "kafka.security.security_protocol=SSL",
            f"kafka.security.ssl_cafile={ca}",
        ],
    )
    security = cfg.kafka.client_security()
    topic = "tls-pairs"
    ensure_topics(bootstrap, [topic, f"{topic}.dlq"], security=security)
    sent = produce(bootstrap, topic, islice(iter_records("fashion-mnist"), 20), security=security)
    assert sent == 20
    source = KafkaSource(
        KafkaSourceConfig(
            bootstrap=bootstrap, topic=topic, group_id="tls", partitions="all", security=security
        )
    )
    dead = KafkaDeadLetter(bootstrap, topic, security=security)
    try:
        got = []
        deadline = time.monotonic() + 60
        while len(got) < 20:
            assert time.monotonic() < deadline, f"consumed {len(got)} of 20 over TLS"
            got.extend(source.poll(0.5))
        assert len({m.offset for m in got}) == 20
        dead.send(got[0], "bad_image", "a test dead letter")
        assert dead.flush(30)
    finally:
        source.close()
        dead.close()
    dlq = KafkaSource(
        KafkaSourceConfig(
            bootstrap=bootstrap, topic=f"{topic}.dlq", group_id="tls-dlq", partitions="all", security=security
        )
    )
    try:
        deadline = time.monotonic() + 60
        letters: list = []
        while not letters:
            assert time.monotonic() < deadline, "the dead letter did not arrive over TLS"
            letters = dlq.poll(0.5)
        assert dict(letters[0].headers)["reason"] == b"bad_image"
    finally:
        dlq.close()
    assert terminator.handshakes >= 4  # admin, producer, consumer, dead letter: each its own TLS connection


@pytest.mark.slow
def test_produce_cli_connects_with_the_configs_security(tls_broker, tmp_path) -> None:
    bootstrap, ca, _ = tls_broker
    config = tmp_path / "cluster.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "kafka": {
                    "bootstrap": bootstrap,
                    "security": {"security_protocol": "SSL", "ssl_cafile": str(ca)},
                }
            }
        )
    )
    args = [*DAEMON, "produce", "--bootstrap", bootstrap, "--topic", "tls-cli", "--dataset", "fashion-mnist"]
    result = subprocess.run(
        [*args, "--limit", "5", "--config", str(config)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"topic": "tls-cli", "records": 5}
    security = load_config(config).kafka.client_security()
    source = KafkaSource(
        KafkaSourceConfig(
            bootstrap=bootstrap, topic="tls-cli", group_id="cli", partitions="all", security=security
        )
    )
    try:
        got: list = []
        deadline = time.monotonic() + 60
        while len(got) < 5:
            assert time.monotonic() < deadline, f"consumed {len(got)} of 5"
            got.extend(source.poll(0.5))
    finally:
        source.close()
