"""Image-text shards through fsspec as a record source, with positions kept in the checkpoint.

Two shard formats (DESIGN §4), from any URL fsspec opens (a local path, ``memory://``, ``s3://``):

- img2dataset-style parquet: columns ``key``, ``caption`` and one image column named by its
  format (``jpg``, ``png`` or ``webp``; with several, the first non-null one of a row is used).
  Read with pyarrow in batches of rows within row groups, so memory is bounded by a row group.
- webdataset tar: members ``KEY.jpg|jpeg|png|webp`` and ``KEY.txt`` (the caption), one sample per
  run of consecutive members sharing a key (the path up to the first dot of the file name, as
  webdataset groups them). Other members (``KEY.json``, ``KEY.cls``, ...) are ignored. Read as a
  stream, so memory is bounded by a sample.

:class:`ShardSource` has the interface of :class:`~growclip_stream.data.kafka_source.KafkaSource`
(``poll``, ``state_dict``, ``load_state_dict``, ``commit``, ``lag``, ``close``) and yields the same
:class:`~growclip_stream.data.kafka_source.Message`: each row is encoded in the binary record
format (value = the image bytes, headers ``id``, ``caption`` and ``content-type``), so the decode
pipeline treats both sources identically. ``topic`` is the shard's URL, ``partition`` is 0 and
``offset`` is the row (sample) index within the shard.

Nothing is dropped silently: a row with a missing key or caption, or unusable image bytes, still
comes out as a message (without the missing header, or with the bytes as they are) so that the
pipeline dead-letters it with its reason. A shard without a JPEG/PNG/WebP member for a key gives a
message with an empty value and content type ``application/octet-stream`` (reason
``bad_content_type``); a null image cell of a parquet shard gives an empty value (``not_an_image``).
A shard that cannot be read (not parquet, truncated, corrupt) is marked failed in the source state
and logged as an error, after retries on later polls for I/O errors; the rows before the damage
come out once.

Listing: a URL naming a shard file reads that shard; a directory (or prefix) reads every
``*.parquet`` and ``*.tar`` below it, recursively, in sorted order of their path relative to it; a
glob (``s3://b/shards/*.tar``) reads its matches. Names starting with ``.`` or ``_`` are skipped
(temporary files, ``_SUCCESS`` markers, the dead letter file). Producers must publish shards
atomically: write under such a temporary name, then rename (object stores make every upload
atomic already). With ``watch=True`` the listing is refreshed every ``poll_interval_s`` and new
shards are read in sorted order as they appear.

Positions: :meth:`ShardSource.state_dict` names the completed shards and the row of the current
shard that comes next, relative to the source URL (so a checkpoint stays valid when the shards
move, e.g. from a local copy to a bucket). Rows count as consumed once :meth:`poll` returned them,
so a resumed source yields each row exactly once across the restart.

Threading: one thread drives ``poll``/``load_state_dict``; ``lag()`` and ``state_dict()`` may be
read from another thread (metrics, checkpointer).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import posixpath
import tarfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from growclip_stream.data.kafka_source import Message
from growclip_stream.data.records import Record, RecordError, RecordLimits, decode_message, sniff_content_type

log = logging.getLogger(__name__)

PARQUET_SUFFIX = ".parquet"
TAR_SUFFIX = ".tar"
SHARD_SUFFIXES = (PARQUET_SUFFIX, TAR_SUFFIX)
DEAD_LETTER_NAME = "_dead_letter.jsonl"

# image column (parquet) or member extension (tar) -> content type
IMAGE_FORMATS: dict[str, str] = {
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
}
_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}
MISSING_IMAGE_CONTENT_TYPE = "application/octet-stream"
# A tar member larger than this is read only up to it (bounded memory); such a record is far over
# any message limit, so the pipeline dead-letters it as too_large either way.
MAX_MEMBER_BYTES = 32 * 1024 * 1024
_NO_TIMESTAMP = -1
_MAX_DETAIL_CHARS = 1000


class ShardFormatError(ValueError):
    """A shard that is not an image-text shard at all (no key, caption or image column)."""


# Errors that reading the shard again cannot cure (not parquet, a truncated tar): the shard is
# marked failed at once. Others (I/O errors of a remote store) are retried first.
_NOT_TRANSIENT = (ShardFormatError, pa.ArrowInvalid, tarfile.ReadError)


# ---------------------------------------------------------------------------------------------
# listing


def _is_shard_name(path: str) -> bool:
    base = posixpath.basename(path)
    return not base.startswith((".", "_")) and base.endswith(SHARD_SUFFIXES)


class _Listing:
    """Where a source URL's shards are: a filesystem, a root, and names relative to that root."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None) -> None:
        self.url = url
        self.fs, path = url_to_fs(url, **dict(storage_options or {}))
        self.path = path.rstrip("/") or "/"
        self.is_glob = fsspec.core.has_magic(self.path)
        if self.is_glob:
            head = self.path
            while fsspec.core.has_magic(head):
                head = posixpath.dirname(head)
            self.root = head
        elif _is_shard_name(self.path) and self.fs.isfile(self.path):
            self.root = posixpath.dirname(self.path)
        else:
            self.root = self.path

    def names(self) -> list[str]:
        """Shard names relative to the root, sorted; refreshed from the store (no listing cache)."""
        self.fs.invalidate_cache()
        if self.is_glob:
            found = [p for p in self.fs.glob(self.path) if _is_shard_name(p)]
        elif self.root != self.path:  # a single shard file
            found = [self.path] if self.fs.exists(self.path) else []
        elif self.fs.isdir(self.path):
            found = [p for p in self.fs.find(self.path) if _is_shard_name(p)]
        else:
            found = []
        return sorted(self._relative(p) for p in found)

    def _relative(self, path: str) -> str:
        path = path.rstrip("/")
        root = self.root.rstrip("/")
        if not root:
            return path.lstrip("/")
        if path.startswith(root + "/"):
            return path[len(root) + 1 :]
        return path

    def full_path(self, name: str) -> str:
        return posixpath.join(self.root, name) if self.root else name

    def shard_url(self, name: str) -> str:
        return str(self.fs.unstrip_protocol(self.full_path(name)))


# ---------------------------------------------------------------------------------------------
# readers: one per open shard, yielding (row, value, headers) from a start row


_Row = tuple[int, bytes, tuple[tuple[str, bytes], ...]]


class _ParquetReader:
    def __init__(self, f: IO[bytes], start_row: int, batch_rows: int) -> None:
        self._file = f
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        self._image_cols = [c for c in IMAGE_FORMATS if c in names]
        cols = [c for c in ("key", "caption") if c in names] + self._image_cols
        if not self._image_cols and not ({"key", "caption"} & names):
            raise ShardFormatError(
                f"parquet shard has none of the columns key, caption, {', '.join(IMAGE_FORMATS)}: "
                f"{sorted(names)[:20]}"
            )
        md = pf.metadata
        self.num_rows = md.num_rows
        first_group, group_start = md.num_row_groups, md.num_rows
        seen = 0
        for g in range(md.num_row_groups):
            rows = md.row_group(g).num_rows
            if seen + rows > start_row:
                first_group, group_start = g, seen
                break
            seen += rows
        self._row = group_start  # row index of the next row the batches give
        self._skip_to = start_row
        # one row group at a time, so that no batch spans two groups: a corrupt group then costs
        # only its own rows, and every row before it comes out
        self._batches: Iterator[pa.RecordBatch] = (
            batch
            for g in range(first_group, md.num_row_groups)
            for batch in pf.iter_batches(
                batch_size=batch_rows, row_groups=[g], columns=cols, use_threads=False
            )
        )
        self._buf: deque[_Row] = deque()
        self._error: Exception | None = None

    def read(self, n: int) -> list[_Row]:
        """Up to ``n`` rows; [] at the end. A read error surfaces once the rows before it are out."""
        while len(self._buf) < n and self._error is None:
            try:
                batch = next(self._batches, None)
            except Exception as err:  # the batch iterator is over after raising: keep the error
                self._error = err
                break
            if batch is None:
                break
            self._buf.extend(self._rows(batch))
        if not self._buf and self._error is not None:
            raise self._error
        return [self._buf.popleft() for _ in range(min(n, len(self._buf)))]

    def _rows(self, batch: pa.RecordBatch) -> Iterator[_Row]:
        columns = {name: batch.column(name).to_pylist() for name in batch.schema.names}
        keys = columns.get("key")
        captions = columns.get("caption")
        for i in range(batch.num_rows):
            row = self._row
            self._row += 1
            if row < self._skip_to:
                continue
            headers: list[tuple[str, bytes]] = []
            if keys is not None and keys[i] is not None:
                headers.append(("id", _as_bytes(keys[i])))
            if captions is not None and captions[i] is not None:
                headers.append(("caption", _as_bytes(captions[i])))
            value, ctype = b"", IMAGE_FORMATS[self._image_cols[0]] if self._image_cols else ""
            for col in self._image_cols:
                cell = columns[col][i]
                if cell is not None:
                    value, ctype = _as_bytes(cell), IMAGE_FORMATS[col]
                    break
            headers.append(("content-type", (ctype or MISSING_IMAGE_CONTENT_TYPE).encode("ascii")))
            yield row, value, tuple(headers)

    def close(self) -> None:
        self._file.close()


class _TarReader:
    def __init__(self, f: IO[bytes], start_row: int, size: int) -> None:
        self._file = f
        # a stream (no seeks: works on any file object); closed in close()
        self._tar = tarfile.open(fileobj=f, mode="r|")  # noqa: SIM115
        self._samples = _tar_samples(self._tar, skip=start_row, size=size)
        self._row = start_row
        self._error: Exception | None = None
        self.num_rows: int | None = None

    def read(self, n: int) -> list[_Row]:
        """Up to ``n`` rows; [] at the end. A read error surfaces once the rows before it are out."""
        if self._error is not None:
            raise self._error
        out: list[_Row] = []
        try:
            for key, files in self._samples:
                out.append((self._row, *_tar_message(key, files)))
                self._row += 1
                if len(out) >= n:
                    break
        except Exception as err:
            if not out:
                raise
            self._error = err
        return out

    def close(self) -> None:
        self._tar.close()
        self._file.close()


def _split_key(member_name: str) -> tuple[str, str]:
    """webdataset's grouping: ``dir/KEY.ext.more`` -> (``dir/KEY``, ``ext.more``)."""
    head, base = posixpath.split(member_name)
    stem, _, ext = base.partition(".")
    return posixpath.join(head, stem) if head else stem, ext.lower()


def _tar_samples(tar: tarfile.TarFile, skip: int, size: int) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, after the first ``skip`` samples (whose data is not read).

    Only image and caption members are read; of several members with the same extension, the
    first. ``size`` is the shard's size in bytes: Python's tarfile ends a truncated stream quietly,
    so a shard cut off inside a member, or without its end-of-archive block, raises
    ``tarfile.ReadError`` here instead of yielding its last, possibly incomplete, sample.
    """
    key: str | None = None
    files: dict[str, bytes] = {}
    index = -1
    for member in tar:
        # a stream keeps every header it has seen: forget them, so memory stays bounded
        tar.members = []  # type: ignore[attr-defined]
        if member.offset_data + member.size > size:
            raise tarfile.ReadError(f"tar shard is truncated: member {member.name!r} ends past {size} bytes")
        if not member.isfile():
            continue
        k, ext = _split_key(member.name)
        if k != key:
            if key is not None and index >= skip:
                yield key, files
            key, files, index = k, {}, index + 1
        if index >= skip and (ext in IMAGE_FORMATS or ext == "txt") and ext not in files:
            data = tar.extractfile(member)
            files[ext] = data.read(MAX_MEMBER_BYTES) if data is not None else b""
    # The iteration stopped at tar.offset: a complete shard has an end-of-archive block there.
    if size - tar.offset < tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"tar shard is truncated: no end-of-archive block after byte {tar.offset}")
    if key is not None and index >= skip:
        yield key, files


def _tar_message(key: str, files: Mapping[str, bytes]) -> tuple[bytes, tuple[tuple[str, bytes], ...]]:
    headers: list[tuple[str, bytes]] = [("id", key.encode("utf-8"))]
    if "txt" in files:
        headers.append(("caption", files["txt"].strip()))
    value, ctype = b"", MISSING_IMAGE_CONTENT_TYPE
    for ext, data in files.items():
        if ext in IMAGE_FORMATS:
            value, ctype = data, IMAGE_FORMATS[ext]
            break
    headers.append(("content-type", ctype.encode("ascii")))
    return value, tuple(headers)


def _count_tar_samples(f: IO[bytes]) -> int:
    """Samples in a tar shard from its member headers (seeks over the data of an uncompressed tar)."""
    count = 0
    key = None
    with tarfile.open(fileobj=f, mode="r:*") as tar:
        for member in tar:
            if member.isfile():
                k, _ = _split_key(member.name)
                if k != key:
                    key, count = k, count + 1
    return count


def _as_bytes(cell: Any) -> bytes:
    if isinstance(cell, bytes | bytearray | memoryview):
        return bytes(cell)
    return str(cell).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# the source


class ShardSource:
    """Rows of image-text shards under a URL as messages; see the module docstring.

    ``url``: a shard, a directory/prefix of shards, or a glob. ``watch``: keep listing for new
    shards every ``poll_interval_s`` (otherwise :attr:`finished` turns true after the last row).
    ``max_poll_records``: default batch of :meth:`poll`. ``batch_rows``: parquet rows decoded at a
    time. ``max_read_attempts``: reads of a broken shard before it is marked failed.
    ``count_rows``: find the row count of every listed shard for :meth:`lag` (parquet: its footer;
    tar: its member headers, which on an object store means reading the shard once more).
    """

    def __init__(
        self,
        url: str,
        watch: bool = False,
        poll_interval_s: float = 10.0,
        *,
        max_poll_records: int = 500,
        batch_rows: int = 256,
        max_read_attempts: int = 3,
        count_rows: bool = True,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if poll_interval_s <= 0 or max_poll_records < 1 or batch_rows < 1 or max_read_attempts < 1:
            raise ValueError(
                "poll_interval_s must be positive; max_poll_records, batch_rows and max_read_attempts >= 1"
            )
        self.url = url
        self.watch = watch
        self.poll_interval_s = poll_interval_s
        self.max_poll_records = max_poll_records
        self.batch_rows = batch_rows
        self.max_read_attempts = max_read_attempts
        self.count_rows = count_rows
        self._listing = _Listing(url, storage_options)
        self._paused = False
        self._lock = threading.Lock()  # guards the position fields below, read by other threads
        self._completed: set[str] = set()
        self._failed: dict[str, str] = {}
        self._current: str | None = None
        self._row = 0  # next row of the current shard to return
        self._row_counts: dict[str, int | None] = {}  # every listed shard; None until known
        self._names: dict[str, str] = {}  # shard URL (a message's topic) -> shard name
        self._reader: _ParquetReader | _TarReader | None = None
        self._attempts = 0  # failed reads of the current shard
        self._retry_at = 0.0  # monotonic time before which a failed shard is not reopened
        self._last_scan = float("-inf")
        self._closed = threading.Event()
        self._rescan()
        if not self._row_counts and not watch:
            raise FileNotFoundError(f"no {' or '.join(SHARD_SUFFIXES)} shards found at {url}")

    # -- consuming ------------------------------------------------------------------------------

    def pause(self) -> None:
        """Stop handing out rows (backpressure, an admin pause) until :meth:`resume`."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    @property
    def paused(self) -> bool:
        return self._paused

    def poll(self, timeout_s: float, max_records: int | None = None) -> list[Message]:
        """Up to ``max_records`` (default ``max_poll_records``) messages in shard then row order.

        Waits at most ``timeout_s`` when nothing is ready (also when every shard is read, so a
        caller's loop does not spin); with ``watch`` the listing is refreshed while waiting.
        Returns nothing, after the wait, while paused.
        """
        if self._paused:
            self._closed.wait(max(0.0, timeout_s))
            return []
        limit = max_records or self.max_poll_records
        deadline = time.monotonic() + max(0.0, timeout_s)
        while not self._closed.is_set():
            out = self._read(limit)
            if out:
                return out
            now = time.monotonic()
            if self.watch and now - self._last_scan >= self.poll_interval_s:
                if self._rescan():
                    continue
                now = time.monotonic()
            wait = deadline - now
            if wait <= 0:
                break
            if self.watch:
                wait = min(wait, max(0.0, self._last_scan + self.poll_interval_s - now))
            self._closed.wait(wait)
        return []

    @property
    def finished(self) -> bool:
        """True when not watching and every listed shard is completed or failed."""
        with self._lock:
            return not self.watch and self._current is None and not self._pending_locked()

    def _read(self, limit: int) -> list[Message]:
        out: list[Message] = []
        while len(out) < limit:
            reader = self._reader or self._open_next()
            if reader is None:
                if self._current is None and self._has_pending():
                    continue  # the shard failed for good: go on with the next one
                break  # nothing to read, or a shard to retry at the next poll
            shard = self._current
            try:
                rows = reader.read(limit - len(out))
            except Exception as err:  # a broken shard must not stop the daemon
                self._on_read_error(err)
                continue
            if rows:
                topic = self._listing.shard_url(str(shard))
                with self._lock:
                    self._names[topic] = str(shard)
                out.extend(
                    Message(topic, 0, row, value, headers, _NO_TIMESTAMP) for row, value, headers in rows
                )
                with self._lock:
                    self._row = rows[-1][0] + 1
                    self._attempts = 0
            if not rows or (reader.num_rows is not None and self._row >= reader.num_rows):
                self._complete_current(self._row)
        return out

    def _has_pending(self) -> bool:
        with self._lock:
            return bool(self._pending_locked())

    def _open_next(self) -> _ParquetReader | _TarReader | None:
        """Opens the current shard at its row, or else the first pending shard; None when there is
        none, or when opening failed (then the shard is retried at a later poll, or marked failed)."""
        with self._lock:
            if self._current is None:
                pending = self._pending_locked()
                if not pending:
                    return None
                self._current, self._row = pending[0], 0
            shard, row = self._current, self._row
            if time.monotonic() < self._retry_at:
                return None
        path = self._listing.full_path(shard)
        try:
            f = self._listing.fs.open(path, "rb")
            try:
                reader: _ParquetReader | _TarReader
                if shard.endswith(PARQUET_SUFFIX):
                    reader = _ParquetReader(f, row, self.batch_rows)
                    with self._lock:
                        self._row_counts[shard] = reader.num_rows
                else:
                    reader = _TarReader(f, row, size=int(self._listing.fs.size(path)))
            except BaseException:
                f.close()
                raise
        except Exception as err:
            self._on_read_error(err)
            return None
        self._reader = reader
        log.info("reading shard", extra={"shard": self._listing.shard_url(shard), "row": row})
        return reader

    def _on_read_error(self, err: Exception) -> None:
        self._close_reader()
        with self._lock:
            shard = self._current
            self._attempts += 1
            attempts = self._attempts
        if shard is None:
            return
        detail = f"{type(err).__name__}: {err}"[:_MAX_DETAIL_CHARS]
        if attempts < self.max_read_attempts and not isinstance(err, _NOT_TRANSIENT):
            self._retry_at = time.monotonic() + min(self.poll_interval_s, 2.0 ** (attempts - 1))
            log.warning(
                "shard read failed; retrying at the next poll",
                extra={"shard": self._listing.shard_url(shard), "row": self._row, "error": detail},
            )
            return
        log.error(
            "shard read failed; skipping the rest of it",
            extra={"shard": self._listing.shard_url(shard), "row": self._row, "error": detail},
        )
        with self._lock:
            self._failed[shard] = detail
            self._current, self._row, self._attempts, self._retry_at = None, 0, 0, 0.0

    def _complete_current(self, rows: int) -> None:
        self._close_reader()
        with self._lock:
            shard = self._current
            if shard is None:
                return
            self._completed.add(shard)
            self._row_counts[shard] = rows
            self._current, self._row, self._attempts, self._retry_at = None, 0, 0, 0.0
        log.info("shard completed", extra={"shard": self._listing.shard_url(shard), "rows": rows})

    def _close_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            try:
                reader.close()
            except Exception as err:
                log.warning("closing a shard failed", extra={"error": repr(err)})

    def _pending_locked(self) -> list[str]:
        done = self._completed | self._failed.keys() | {self._current}
        return sorted(name for name in self._row_counts if name not in done)

    def _rescan(self) -> bool:
        """Refreshes the listing; True when it found shards not known before."""
        self._last_scan = time.monotonic()
        try:
            names = self._listing.names()
        except Exception as err:  # an unreachable store: keep reading what is known
            if not self._row_counts and not self.watch:
                raise
            log.warning("listing shards failed", extra={"url": self.url, "error": repr(err)})
            return False
        with self._lock:
            new = [n for n in names if n not in self._row_counts]
            for name in new:
                self._row_counts[name] = None
        if new:
            log.info("found shards", extra={"url": self.url, "shards": len(new), "first": new[0]})
        if self.count_rows:
            for name in new:
                self._count(name)
        return bool(new)

    def _count(self, name: str) -> None:
        if name in self._completed or name in self._failed:
            return
        path = self._listing.full_path(name)
        try:
            with self._listing.fs.open(path, "rb") as f:
                if name.endswith(PARQUET_SUFFIX):
                    count = pq.ParquetFile(f).metadata.num_rows
                else:
                    count = _count_tar_samples(f)
        except Exception as err:  # reading the shard will report it properly
            log.debug("counting shard rows failed", extra={"shard": name, "error": repr(err)})
            return
        with self._lock:
            if self._row_counts.get(name) is None:
                self._row_counts[name] = count

    def lag(self) -> dict[int, int]:
        """``{0: rows left}`` in the listed shards whose row count is known (see ``count_rows``)."""
        with self._lock:
            left = 0
            for name, count in self._row_counts.items():
                if count is None or name in self._completed or name in self._failed:
                    continue
                left += max(0, count - self._row) if name == self._current else count
        return {0: left}

    # -- positions ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"url", "completed": [names], "failed": {name: error}, "shard": name | None, "row"}``:
        shard names relative to the URL, ``row`` the next row of ``shard`` to return."""
        with self._lock:
            return {
                "url": self.url,
                "completed": sorted(self._completed),
                "failed": dict(sorted(self._failed.items())),
                "shard": self._current,
                "row": self._row if self._current is not None else 0,
            }

    def state_after(self, state: Mapping[str, Any], messages: Sequence[Message]) -> dict[str, Any]:
        """``state`` advanced past ``messages`` (returned by :meth:`poll` in this order): the state a
        checkpoint records when it stops at a row in the middle of a poll. A shard left behind is
        completed; an empty or failed shard passed meanwhile is not recorded, so a resume lists
        it again (it yields no rows, or fails again)."""
        completed, failed, shard, row = _parse_state(state)
        done = set(completed)
        for msg in messages:
            with self._lock:
                name = self._names.get(msg.topic)
            if name is None:
                raise ValueError(f"message from {msg.topic!r}, which this source did not read")
            if name != shard:
                if shard is not None:
                    done.add(shard)
                shard = name
            row = msg.offset + 1
        return {**state, "completed": sorted(done), "failed": failed, "shard": shard, "row": row}

    def load_state_dict(self, state: Mapping[str, Any]) -> bool:
        """Resumes at a :meth:`state_dict`: the next poll returns the row after the last one returned.

        Positions name shards relative to the URL they were read from, so a state saved for
        another URL is refused (logged, returns False): the source starts from the first shard
        rather than skip shards of the same name elsewhere. Raises ValueError on a malformed state.
        """
        completed, failed, shard, row = _parse_state(state)
        if state.get("url") != self.url:
            log.error(
                "shard positions were saved for another URL; not applied, starting from the first shard",
                extra={"saved_url": state.get("url"), "url": self.url},
            )
            return False
        self._close_reader()
        self._rescan()
        with self._lock:
            self._completed = set(completed)
            self._failed = dict(failed)
            self._current, self._row, self._attempts = shard, row, 0
            if shard is not None and shard not in self._row_counts:
                self._failed[shard] = f"shard is gone: not found at {self.url} on resume"
                self._current, self._row = None, 0
                log.error("shard of the saved state is gone", extra={"shard": shard, "url": self.url})
        log.info("loaded shard positions", extra={"url": self.url, "shard": shard, "row": row})
        return True

    def commit(self, state: Mapping[str, Any] | None = None) -> None:
        """No-op: shards have no broker to commit to; positions live only in the checkpoint.

        Kept so that the daemon drives a shard source and a Kafka source alike.
        """

    def close(self) -> None:
        self._closed.set()
        self._close_reader()

    def __enter__(self) -> ShardSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_state(state: Mapping[str, Any]) -> tuple[list[str], dict[str, str], str | None, int]:
    completed = state.get("completed", [])
    failed = state.get("failed", {})
    shard = state.get("shard")
    row = state.get("row", 0)
    if not isinstance(completed, list) or not all(isinstance(n, str) for n in completed):
        raise ValueError("shard state: 'completed' must be a list of shard names")
    if not isinstance(failed, Mapping) or not all(isinstance(n, str) for n in failed):
        raise ValueError("shard state: 'failed' must map shard names to errors")
    if shard is not None and not isinstance(shard, str):
        raise ValueError(f"shard state: 'shard' must be a name or null, got {shard!r}")
    if isinstance(row, bool) or not isinstance(row, int) or row < 0:
        raise ValueError(f"shard state: 'row' must be a non-negative integer, got {row!r}")
    return completed, {str(k): str(v) for k, v in failed.items()}, shard, row


# ---------------------------------------------------------------------------------------------
# dead letter


def dead_letter_url(shards_url: str) -> str:
    """The default dead-letter file next to the shards: ``<dir>/_dead_letter.jsonl`` (skipped by listing)."""
    listing_root = _Listing(shards_url, None)
    return str(listing_root.fs.unstrip_protocol(posixpath.join(listing_root.root, DEAD_LETTER_NAME)))


class ShardDeadLetter:
    """Appends unusable messages as JSON lines to a file (any fsspec URL that can append).

    One line per message: ``key`` (the ``id`` header, or null), ``reason``, ``detail``, ``shard``
    (the message's topic: the shard URL), ``row`` (its offset), ``caption`` (the ``caption``
    header as text, or null), ``content_type``, ``value_base64`` (the original value bytes) and
    ``time`` (seconds since the epoch). Lines are buffered and appended on :meth:`flush`, which
    :meth:`send` also calls once ``flush_every`` lines or ``flush_interval_s`` seconds accumulate.

    Durability: :meth:`flush` returns True only once every line sent so far is written (and, on a
    local filesystem, fsynced). A write that fails keeps the lines buffered for the next flush and
    is counted in :attr:`failures`; on a local file a partly written append is cut back first, so a
    retry never leaves a torn line. On object stores an append that failed half-way may have
    landed anyway, so a retried line can appear twice (at least once; ``shard`` and ``row``
    identify it).
    """

    def __init__(
        self,
        url: str,
        *,
        flush_every: int = 100,
        flush_interval_s: float = 1.0,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.url = url
        self.flush_every = flush_every
        self.flush_interval_s = flush_interval_s
        self._fs, self._path = url_to_fs(url, **dict(storage_options or {}))
        parent = posixpath.dirname(self._path)
        if parent:
            self._fs.makedirs(parent, exist_ok=True)
        self._lock = threading.Lock()
        self._lines: list[bytes] = []
        self._last_flush = time.monotonic()
        self.sent = 0
        self.failures = 0  # flushes that could not write their lines (kept for the next one)

    def send(self, msg: Any, reason: str, detail: str) -> None:
        headers = dict(reversed(tuple(msg.headers or ())))  # first occurrence wins, as in decoding
        line = {
            "key": _text(headers.get("id")),
            "reason": reason,
            "detail": detail[:_MAX_DETAIL_CHARS],
            "shard": msg.topic,
            "row": msg.offset,
            "caption": _text(headers.get("caption")),
            "content_type": _text(headers.get("content-type")),
            "value_base64": base64.b64encode(msg.value or b"").decode("ascii"),
            "time": round(time.time(), 3),
        }
        data = json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n"
        with self._lock:
            self._lines.append(data)
            self.sent += 1
            due = (
                len(self._lines) >= self.flush_every
                or time.monotonic() - self._last_flush >= self.flush_interval_s
            )
        if due:
            self.flush()  # a failure keeps the lines; the checkpoint's flush reports it

    @property
    def pending(self) -> int:
        """Lines not written yet."""
        with self._lock:
            return len(self._lines)

    def flush(self) -> bool:
        """Writes every buffered line; True when they are all durable, False (lines kept) when not."""
        with self._lock:
            self._last_flush = time.monotonic()
            if not self._lines:
                return True
            data = b"".join(self._lines)
            try:
                self._append(data)
            except Exception as err:
                self.failures += 1
                log.error(
                    "dead letter write failed; lines kept for the next flush",
                    extra={"url": self.url, "lines": len(self._lines), "error": repr(err)},
                )
                return False
            self._lines = []
            return True

    def _append(self, data: bytes) -> None:
        if isinstance(self._fs, LocalFileSystem):
            with open(self._path, "ab") as f:
                size = f.tell()
                try:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                except BaseException:
                    f.truncate(size)  # no torn line: the retry appends it whole
                    raise
            return
        with self._fs.open(self._path, "ab") as f:
            f.write(data)

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> ShardDeadLetter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_dead_letter(url: str, storage_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The entries of a dead-letter file (empty when it does not exist)."""
    fs, path = url_to_fs(url, **dict(storage_options or {}))
    if not fs.exists(path):
        return []
    with fs.open(path, "rb") as f:
        return [json.loads(line) for line in f.read().splitlines() if line.strip()]


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else bytes(raw).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# writing shards (tests, benchmarks, exports)


def write_parquet_shards(
    records: Iterable[Record],
    url: str,
    per_shard: int,
    *,
    row_group_rows: int = 1000,
    first_index: int = 0,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Writes img2dataset-style parquet shards ``<url>/<index:05d>.parquet``; returns their URLs.

    Columns ``key`` and ``caption`` (strings) and one binary column per image format present in
    the shard (``jpg``, ``png``, ``webp``; null in rows of another format). Bytes that are not an
    image go to ``jpg``. Each shard is written under a temporary name and then renamed.
    """
    encode = _parquet_encoder(row_group_rows)
    return _write_shards(records, url, per_shard, PARQUET_SUFFIX, encode, first_index, storage_options)


def write_tar_shards(
    records: Iterable[Record],
    url: str,
    per_shard: int,
    *,
    first_index: int = 0,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Writes webdataset tar shards ``<url>/<index:05d>.tar`` (``KEY.jpg|png|webp`` + ``KEY.txt``);
    returns their URLs. Keys are the record ids, which must not contain ``.`` (webdataset splits
    the key from the extension at the first dot). Each shard is written under a temporary name
    and then renamed."""
    return _write_shards(records, url, per_shard, TAR_SUFFIX, _tar_bytes, first_index, storage_options)


def _write_shards(
    records: Iterable[Record],
    url: str,
    per_shard: int,
    suffix: str,
    encode: Callable[[Sequence[Record]], bytes],
    first_index: int,
    storage_options: Mapping[str, Any] | None,
) -> list[str]:
    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    fs, root = url_to_fs(url, **dict(storage_options or {}))
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    written: list[str] = []
    chunk: list[Record] = []
    index = first_index

    def flush() -> None:
        nonlocal index
        final = posixpath.join(root, f"{index:05d}{suffix}")
        temp = posixpath.join(root, f".{index:05d}{suffix}.tmp")
        with fs.open(temp, "wb") as f:
            f.write(encode(chunk))
        fs.mv(temp, final)
        written.append(str(fs.unstrip_protocol(final)))
        chunk.clear()
        index += 1

    for rec in records:
        chunk.append(rec)
        if len(chunk) >= per_shard:
            flush()
    if chunk:
        flush()
    return written


def _image_column(image: bytes) -> str:
    try:
        return _EXTENSIONS[sniff_content_type(image)]
    except ValueError:  # not an image at all (tests of bad rows): where a JPEG would be
        return "jpg"


def _parquet_encoder(row_group_rows: int) -> Callable[[Sequence[Record]], bytes]:
    def encode(chunk: Sequence[Record]) -> bytes:
        image_cols = [_image_column(r.image) for r in chunk]
        columns: dict[str, pa.Array] = {
            "key": pa.array([r.id for r in chunk], pa.string()),
            "caption": pa.array([r.caption for r in chunk], pa.string()),
        }
        for col in ("jpg", "png", "webp"):
            if col in image_cols:
                cells = [r.image if c == col else None for r, c in zip(chunk, image_cols, strict=True)]
                columns[col] = pa.array(cells, pa.binary())
        buf = io.BytesIO()
        pq.write_table(pa.table(columns), buf, row_group_size=row_group_rows)
        return buf.getvalue()

    return encode


def _tar_bytes(chunk: Sequence[Record]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rec in chunk:
            if "." in posixpath.basename(rec.id):
                raise ValueError(f"record id {rec.id!r} contains '.', which would split the webdataset key")
            for name, data in (
                (f"{rec.id}.{_image_column(rec.image)}", rec.image),
                (f"{rec.id}.txt", rec.caption.encode("utf-8")),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


__all__ = [
    "DEAD_LETTER_NAME",
    "IMAGE_FORMATS",
    "SHARD_SUFFIXES",
    "ShardDeadLetter",
    "ShardFormatError",
    "ShardSource",
    "dead_letter_url",
    "iter_shard_records",
    "read_dead_letter",
    "write_parquet_shards",
    "write_tar_shards",
]


def iter_shard_records(
    source: ShardSource, skipped: Counter[str] | None = None, limits: RecordLimits | None = None
) -> Iterator[Record]:
    """The records of a (not watching) shard source, for republishing them (``produce --shards``).

    A row whose envelope does not decode (missing key or caption, ...) or whose bytes are not a
    PNG/JPEG/WebP image at all cannot be published as a record: it is logged with its reason and
    counted in ``skipped`` (reason -> rows). Image bytes are not decoded here; the consumer's
    pipeline checks them. Ends when every shard is read (or failed: see ``source.state_dict()``).
    """
    limits = limits or RecordLimits()
    while not source.finished:
        for msg in source.poll(0.2):
            try:
                rec = decode_message(msg.value, msg.headers, limits)
                sniff_content_type(rec.image)
            except RecordError as err:
                if skipped is not None:
                    skipped[err.reason] += 1
                log.warning(
                    "shard row skipped",
                    extra={"shard": msg.topic, "row": msg.offset, "reason": err.reason, "detail": err.detail},
                )
                continue
            yield rec
