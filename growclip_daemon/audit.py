"""An optional per-record audit trail: which record went where, durable exactly with the checkpoint.

Each line is JSON: ``key`` (``<topic or shard>:<partition>:<offset>``), ``id`` (null when the
record could not be decoded), ``fate`` (``trained``, ``held_out`` or ``dead_letter``), ``reason``
(the dead letter's) and ``step`` (the checkpoint that made it durable). Lines are appended and
fsynced just before a checkpoint is written, and the checkpoint records the file's length (its
``mark``); a daemon resuming from a checkpoint cuts the file back to that mark. So the file
always names exactly the records the resumed model state accounts for: a record trained before a
crash and trained again after it appears once, and a count of ``trained`` lines that differs
from the checkpoint's ``samples`` means a record was trained twice into one model state.

For tests and investigations (it grows by ~100 bytes per record); a local file only.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def resume(self, mark: int | None) -> None:
        """Cut the file back to ``mark`` (the resumed checkpoint's; None: no checkpoint, empty)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        size = self.path.stat().st_size if self.path.exists() else 0
        keep = mark or 0
        if size < keep:
            raise RuntimeError(
                f"audit log {self.path} is shorter ({size} B) than the checkpoint's mark ({keep} B)"
            )
        with open(self.path, "ab") as f:
            f.truncate(keep)
            os.fsync(f.fileno())
        if size > keep:
            log.info(
                "audit log cut back to the checkpoint",
                extra={"path": str(self.path), "bytes_dropped": size - keep},
            )

    def append(self, fates: Iterable[tuple[str, str | None, str, str]], *, step: int) -> int:
        """Append the fates, fsync, and return the new length: the mark the checkpoint records."""
        data = b"".join(
            json.dumps({"key": key, "id": rid, "fate": fate, "reason": reason, "step": step}).encode() + b"\n"
            for key, rid, fate, reason in fates
        )
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            return f.tell()


def read_audit(path: Path, mark: int | None = None) -> list[dict]:
    """The audit entries up to ``mark`` bytes (all by default)."""
    raw = path.read_bytes() if path.exists() else b""
    if mark is not None:
        raw = raw[:mark]
    return [json.loads(line) for line in raw.splitlines() if line.strip()]
