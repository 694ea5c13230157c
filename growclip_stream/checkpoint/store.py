"""Checkpoints on any fsspec URL: a new folder per save, never rewritten; LATEST moved last.

Layout::

    <root>/<seq>-g<generation>-s<step>/   model.safetensors, optimizer.safetensors,
                                          loop.safetensors (reservoirs), manifest.json
    <root>/LATEST                         the name of the newest complete folder

``seq`` counts saves under the root (8 digits, one more than the highest name found), so two
saves at the same step (an idle stream, a paused trainer, a save on request right after a
periodic one, the save at stop) go to two folders and a published folder is never written again.
Names sort in save order.

Durability: on a local filesystem a save is written into ``.<name>.partial/``, every file and
the folder are fsynced, the folder is renamed to its name and the root fsynced, and only then is
``LATEST`` replaced (temp file, fsync, rename, fsync). An object store has no rename and no fsync:
there ``manifest.json`` is written after the files it lists, and ``LATEST`` is written last (one
PUT, atomic on its own). A kill at any moment therefore leaves either the old or the new
checkpoint complete, and ``LATEST`` never names a folder that was being written.

Loading verifies every file's SHA-256 from the manifest. Without an explicit path it tries the
folder ``LATEST`` names, then every other folder newest first, and logs each one it skips, so a
damaged or missing ``LATEST`` or a damaged newest folder costs the progress since the previous
checkpoint, not the start. Tensors are safetensors and everything else JSON: loading never
unpickles anything.

Retention after each save keeps the newest ``keep`` folders, the one ``LATEST`` names, and the
newest folder of every earlier generation (the last checkpoint before each growth).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from growclip_stream.checkpoint.state import TrainingState, capture, join_tensors, split_tensors
from growclip_stream.model import ArchConfig, GrowCLIP

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)  # 1: ``<root>/<step>/``, files as {name: sha256}
_NAME = re.compile(r"^(?P<seq>\d{8})-g(?P<gen>\d+)-s(?P<step>\d+)$")
_LEGACY_NAME = re.compile(r"^\d{12}$")
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial$")
LATEST = "LATEST"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing file, bad checksum, unknown format)."""


class CheckpointFormatError(CheckpointError):
    """A checkpoint in a format this version cannot read (written by a newer one): not damage, so
    loading stops here instead of falling back to an older checkpoint and losing the newer progress."""


@dataclass(frozen=True)
class Checkpoint:
    """What :meth:`CheckpointStore.load` gives back."""

    path: str
    model: GrowCLIP
    optimizer_state: dict[str, dict[str, torch.Tensor]]  # parameter name -> {"exp_avg", "exp_avg_sq", "step"}
    manifest: dict[str, Any]
    loop_state: dict[str, Any]  # the loop's state with its tensors (reservoirs) restored

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def samples(self) -> int:
        return int(self.manifest["samples"])

    @property
    def generation(self) -> int:
        if "generation" in self.manifest:
            return int(self.manifest["generation"])
        return _generation(self.manifest.get("growth", {}))

    @property
    def run_id(self) -> str:
        """The run that saved it ("" when unknown): the last part of the version it served."""
        run = self.manifest.get("run", {})
        return str(run.get("id") or "") if isinstance(run, Mapping) else ""

    @property
    def source(self) -> dict[str, Any]:
        return dict(self.manifest.get("source", {}))

    @property
    def rng(self) -> dict[str, Any]:
        return dict(self.manifest.get("rng", {}))


@dataclass(frozen=True)
class Saved:
    """One completed save: where, how many bytes, how long the write took."""

    path: str
    name: str
    nbytes: int
    seconds: float


@dataclass(frozen=True, order=True)
class _Entry:
    seq: int  # -1 for the old ``<step>/`` layout, which sorts before every new folder
    step: int
    generation: int | None
    name: str


def _parse_name(name: str) -> _Entry | None:
    m = _NAME.match(name)
    if m:
        return _Entry(int(m["seq"]), int(m["step"]), int(m["gen"]), name)
    if _LEGACY_NAME.match(name):
        return _Entry(-1, int(name), None, name)
    return None


class CheckpointStore:
    """Writes, loads and prunes checkpoints under one fsspec root URL."""

    def __init__(self, root: str, keep: int = 3, *, storage_options: Mapping[str, Any] | None = None) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.url = root
        self.fs, self.root = fsspec.core.url_to_fs(root, **dict(storage_options or {}))
        self.root = self.root.rstrip("/")
        self.keep = keep
        self.local = isinstance(self.fs, LocalFileSystem)

    def _join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # -- listing ---------------------------------------------------------------------------------

    def _names(self) -> list[str]:
        try:
            paths = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in paths]

    def entries(self) -> list[_Entry]:
        """Checkpoint folders under the root, oldest first (complete or not: loading verifies)."""
        return sorted(e for n in self._names() if (e := _parse_name(n)) is not None)

    def latest(self) -> str | None:
        """The path ``LATEST`` names, or None when there is no ``LATEST``."""
        name = self._latest_name()
        return None if name is None else self._join(name)

    def _latest_name(self) -> str | None:
        try:
            raw = self.fs.cat_file(self._join(LATEST))
        except FileNotFoundError:
            return None
        name = raw.decode("utf-8", errors="replace").strip()
        return name if _parse_name(name) is not None else None

    def has_checkpoint(self) -> bool:
        """Whether the root holds anything a start could resume from (valid or not)."""
        return self._latest_name() is not None or bool(self.entries())

    # -- writing ---------------------------------------------------------------------------------

    def save(
        self,
        model: GrowCLIP,
        optimizer: torch.optim.Optimizer | None,
        *,
        step: int,
        samples: int,
        growth: Mapping[str, Any],
        source: Mapping[str, Any],
        generation: int | None = None,
    ) -> str:
        """Capture and write in the caller's thread (tests, tools); returns the checkpoint's path."""
        gen = _generation(growth) if generation is None else generation
        state = capture(
            model, optimizer, step=step, samples=samples, generation=gen, growth=growth, source=source
        )
        return self.write(state).path

    def write(self, state: TrainingState, *, reason: str = "") -> Saved:
        """Serialise, write durably, move ``LATEST``, prune; safe to call from a background thread."""
        start = time.monotonic()
        entries = self.entries()
        partial_seqs = [
            e.seq for n in self._names() if (m := _PARTIAL.match(n)) and (e := _parse_name(m["name"]))
        ]
        seq = max([e.seq for e in entries] + partial_seqs + [0]) + 1
        name = f"{seq:08d}-g{state.generation}-s{state.step:012d}"
        files: dict[str, bytes] = {"model.safetensors": st_save(state.model)}
        if state.optimizer:
            files["optimizer.safetensors"] = st_save(state.optimizer)
        loop_skeleton, loop_tensors = split_tensors(state.loop)
        if loop_tensors:
            files["loop.safetensors"] = st_save(loop_tensors)
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "step": state.step,
            "samples": state.samples,
            "generation": state.generation,
            "architecture": state.architecture,
            "growth": state.growth,
            "source": state.source,
            "loop": loop_skeleton,
            "rng": state.rng,
            "run": {**state.run, **({"reason": reason} if reason else {})},
            "captured_at": state.captured_at,
            "saved_at": time.time(),
            "files": {
                f: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for f, b in files.items()
            },
        }
        files["manifest.json"] = json.dumps(manifest, indent=1).encode()  # written last
        if self.local:
            self._write_local(name, files)
        else:
            self._write_remote(name, files)
        self._retain(name)
        seconds = time.monotonic() - start
        nbytes = sum(len(b) for b in files.values())
        log.info(
            "checkpoint saved",
            extra={
                "path": self._join(name),
                "step": state.step,
                "bytes": nbytes,
                "seconds": round(seconds, 3),
            },
        )
        return Saved(path=self._join(name), name=name, nbytes=nbytes, seconds=seconds)

    def _write_local(self, name: str, files: Mapping[str, bytes]) -> None:
        root = self.root
        os.makedirs(root, exist_ok=True)
        partial = os.path.join(root, f".{name}.partial")
        os.makedirs(partial)
        for fname, data in files.items():
            _write_fsynced(os.path.join(partial, fname), data)
        _fsync_dir(partial)
        os.rename(partial, os.path.join(root, name))
        _fsync_dir(root)
        tmp = os.path.join(root, f".{LATEST}.{name}.tmp")
        _write_fsynced(tmp, name.encode())
        os.replace(tmp, os.path.join(root, LATEST))
        _fsync_dir(root)

    def _write_remote(self, name: str, files: Mapping[str, bytes]) -> None:
        directory = self._join(name)
        self.fs.makedirs(directory, exist_ok=True)
        for fname, data in files.items():  # manifest.json last: a folder without it is incomplete
            self.fs.pipe_file(f"{directory}/{fname}", data)
        self.fs.pipe_file(self._join(LATEST), name.encode())  # one PUT: atomic

    def _retain(self, newest: str) -> None:
        entries = self.entries()
        keep = {e.name for e in entries[-self.keep :]} | {newest}
        latest = self._latest_name()
        if latest is not None:
            keep.add(latest)
        last_of_generation: dict[int, str] = {}
        for e in entries:  # oldest first: the last one seen of each generation wins
            if e.generation is not None:
                last_of_generation[e.generation] = e.name
        current = max(last_of_generation, default=0)
        keep |= {n for g, n in last_of_generation.items() if g < current}
        for e in entries:
            if e.name not in keep:
                self._remove(e.name)
        for n in self._names():  # folders a killed writer left behind
            m = _PARTIAL.match(n)
            if m and m["name"] != newest:
                self._remove(n)

    def _remove(self, name: str) -> None:
        try:
            self.fs.rm(self._join(name), recursive=True)
        except FileNotFoundError:
            pass
        except OSError as err:  # pruning is best effort; the next save tries again
            log.warning(
                "could not remove an old checkpoint", extra={"path": self._join(name), "error": repr(err)}
            )

    # -- loading ---------------------------------------------------------------------------------

    def load(self, path: str | None = None) -> Checkpoint:
        """The checkpoint at ``path`` (verified, no fallback), or the newest usable one under the root.

        Without a path: the folder ``LATEST`` names first, then every other folder newest first;
        each unusable one is logged and skipped. Raises :class:`CheckpointError` when none is usable,
        and :class:`CheckpointFormatError` at once for one written in a newer format.
        """
        if path is not None:
            return self._load(path)
        tried: list[str] = []
        for name in self._candidates():
            try:
                ckpt = self._load(self._join(name))
            except CheckpointFormatError:
                raise
            except CheckpointError as err:
                log.warning(
                    "checkpoint unusable, trying the previous one",
                    extra={"path": self._join(name), "error": str(err)},
                )
                tried.append(f"{name}: {err}")
                continue
            if tried:
                log.warning(
                    "resuming from an older checkpoint: newer ones are unusable",
                    extra={"path": ckpt.path, "step": ckpt.step, "skipped": tried},
                )
            return ckpt
        if not tried:
            raise CheckpointError(f"no checkpoint under {self.url}")
        raise CheckpointError(f"no usable checkpoint under {self.url}: " + "; ".join(tried))

    def load_latest(self) -> Checkpoint | None:
        """The newest usable checkpoint, or None when the root holds none at all."""
        if not self.has_checkpoint():
            return None
        return self.load()

    def _candidates(self) -> list[str]:
        names = [e.name for e in reversed(self.entries())]
        latest = self._latest_name()
        if latest is None:
            if names:
                log.warning("no valid LATEST pointer; scanning checkpoint folders", extra={"root": self.url})
            return names
        if latest not in names:
            log.warning(
                "LATEST names a missing checkpoint folder", extra={"root": self.url, "latest": latest}
            )
            return names
        return [latest, *(n for n in names if n != latest)]

    def _load(self, path: str) -> Checkpoint:
        try:
            raw = self.fs.cat_file(f"{path}/manifest.json")
        except FileNotFoundError as err:
            raise CheckpointError(f"{path}: manifest.json missing") from err
        try:
            manifest = json.loads(raw)
        except ValueError as err:
            raise CheckpointError(f"{path}: manifest.json is not valid JSON ({err})") from err
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise CheckpointFormatError(
                f"{path}: format version {version} is newer than this version reads ({FORMAT_VERSION}); "
                "run the version that wrote it"
            )
        if version not in _READABLE_VERSIONS:
            raise CheckpointError(f"{path}: unknown format version {version!r}")
        blobs: dict[str, bytes] = {}
        for fname, meta in dict(manifest.get("files", {})).items():
            digest = meta["sha256"] if isinstance(meta, Mapping) else meta
            try:
                data = self.fs.cat_file(f"{path}/{fname}")
            except FileNotFoundError as err:
                raise CheckpointError(f"{path}/{fname}: missing") from err
            if hashlib.sha256(data).hexdigest() != digest:
                raise CheckpointError(f"{path}/{fname}: checksum mismatch")
            blobs[fname] = data
        if "model.safetensors" not in blobs:
            raise CheckpointError(f"{path}: the manifest lists no model.safetensors")
        try:
            model = GrowCLIP(ArchConfig.from_dict(manifest["architecture"]))
            model.load_state_dict(st_load(blobs["model.safetensors"]), strict=True)
            opt_state: dict[str, dict[str, torch.Tensor]] = {}
            if "optimizer.safetensors" in blobs:
                for key, tensor in st_load(blobs["optimizer.safetensors"]).items():
                    pname, field = key.rsplit("::", 1)
                    opt_state.setdefault(pname, {})[field] = tensor
            loop_tensors = st_load(blobs["loop.safetensors"]) if "loop.safetensors" in blobs else {}
            loop_state = join_tensors(manifest.get("loop", {}), loop_tensors)
        except (KeyError, ValueError, RuntimeError, TypeError) as err:
            raise CheckpointError(f"{path}: does not load ({err})") from err
        return Checkpoint(
            path=path, model=model, optimizer_state=opt_state, manifest=manifest, loop_state=loop_state
        )


Checkpointer = CheckpointStore  # the name the daemon has used


def load_checkpoint(url: str) -> Checkpoint:
    """One checkpoint folder (it holds manifest.json), or the newest usable one under a root: what
    the command line's ``--checkpoint`` accepts (``eval``, ``export``)."""
    store = CheckpointStore(url)
    if store.fs.exists(f"{store.root}/manifest.json"):
        return store.load(store.root)
    if not store.fs.exists(store.root):
        raise FileNotFoundError(f"no checkpoint at {url}")
    return store.load()


def _generation(growth: Mapping[str, Any]) -> int:
    """Growths (and roll-backs) in a growth history; declined growths changed nothing."""
    return sum(
        1
        for e in growth.get("history", [])
        if not (isinstance(e, Mapping) and e.get("outcome") == "declined")
    )


def _write_fsynced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    """Makes a folder's entries (new files, renames) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory
    finally:
        os.close(fd)
