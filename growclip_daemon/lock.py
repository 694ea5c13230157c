"""One daemon per checkpoint root: an exclusive ``flock`` held for the daemon's lifetime.

For a local root the lock file is ``<root>/.lock``, so every daemon on this host that points at
the folder (whatever path spells it) sees the same lock. An fsspec root on a remote store
(``s3://``, ...) has no locks; there the lock file lives in the daemon's state folder (beside
the pidfile), named by a hash of the root URL. That only keeps out a second daemon that uses the
same state folder on the same host: two hosts, or two state folders, can still share a remote
root.

The kernel drops an ``flock`` when its holder dies, SIGKILL included, so a crashed daemon never
leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem


class AlreadyRunning(RuntimeError):
    """Another daemon holds the lock on this checkpoint root."""


def lock_path(checkpoint_root: str, state_dir: Path) -> Path:
    """Where the lock on ``checkpoint_root`` lives (see the module docstring)."""
    fs, root = url_to_fs(checkpoint_root)
    if isinstance(fs, LocalFileSystem):
        return Path(root) / ".lock"
    digest = hashlib.sha256(checkpoint_root.encode()).hexdigest()[:16]
    return state_dir / f"checkpoint-root-{digest}.lock"


class RootLock:
    """Holds the lock from :meth:`acquire` until :meth:`release` (or the process ends)."""

    def __init__(self, path: Path, root: str) -> None:
        self.path = path
        self.root = root
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock without waiting; raises :class:`AlreadyRunning` naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(
                f"another daemon (pid {holder}) holds the lock {self.path} on checkpoint root {self.root}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock
