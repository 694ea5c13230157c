"""Checkpoints on any fsspec URL: weights, optimizer state, architecture and source positions.

Layout (DESIGN §4): ``<root>/<step>/`` holds ``model.safetensors``, ``optimizer.safetensors`` and
``manifest.json`` (format version, step, samples, full architecture, growth state, source
positions, RNG state, SHA-256 of every file); ``<root>/LATEST`` names the newest complete step and
is written last, by an atomic rename where the filesystem has one (an object store's PUT is atomic
on its own). A reader therefore never sees a half-written checkpoint. Tensors are stored with
safetensors and everything else as JSON, so loading never unpickles anything.

The checkpoint carries the architecture: resuming rebuilds the grown shape from the manifest,
never from the config the daemon was started with.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from growclip_stream.model import ArchConfig, GrowCLIP

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_ADAM_KEYS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class Checkpoint:
    """What `Checkpointer.load` gives back."""

    path: str
    model: GrowCLIP
    optimizer_state: dict[str, dict[str, torch.Tensor]]  # parameter name -> {"exp_avg", "exp_avg_sq", "step"}
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def samples(self) -> int:
        return int(self.manifest["samples"])


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing file, bad checksum, unknown format)."""


def optimizer_tensors(model: GrowCLIP, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state keyed by parameter name (``<param>::exp_avg``), the way safetensors stores it."""
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        state = optimizer.state.get(param, {})
        for key in (*_ADAM_KEYS, "step"):
            if key in state:
                out[f"{name}::{key}"] = torch.as_tensor(state[key]).detach().cpu().contiguous()
    return out


def restore_optimizer(
    model: GrowCLIP, optimizer: torch.optim.Optimizer, state: dict[str, dict[str, torch.Tensor]]
) -> int:
    """Put saved AdamW state back on the matching parameters; returns how many were restored."""
    restored = 0
    for name, param in model.named_parameters():
        saved = state.get(name)
        if not saved or any(saved[k].shape != param.shape for k in _ADAM_KEYS if k in saved):
            continue
        optimizer.state[param] = {k: v.to(param.device) for k, v in saved.items()}
        restored += 1
    return restored


class Checkpointer:
    """Saves and loads checkpoints under one fsspec root URL, keeping the newest ``keep``."""

    def __init__(self, root: str, keep: int = 3) -> None:
        self.url = root
        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.keep = keep

    def _join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def save(
        self,
        model: GrowCLIP,
        optimizer: torch.optim.Optimizer | None,
        *,
        step: int,
        samples: int,
        growth: dict[str, Any],
        source: dict[str, Any],
    ) -> str:
        """Write one checkpoint and then point LATEST at it; returns the checkpoint's path."""
        start = time.monotonic()
        name = f"{step:012d}"
        directory = self._join(name)
        files = {
            "model.safetensors": st_save(
                {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            )
        }
        if optimizer is not None:
            files["optimizer.safetensors"] = st_save(optimizer_tensors(model, optimizer))
        self.fs.makedirs(directory, exist_ok=True)
        for fname, data in files.items():
            self.fs.pipe_file(f"{directory}/{fname}", data)
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "samples": samples,
            "architecture": model.arch.to_dict(),
            "growth": growth,
            "source": source,
            "rng": {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()},
            "files": {fname: hashlib.sha256(data).hexdigest() for fname, data in files.items()},
            "saved_at": time.time(),
        }
        self.fs.pipe_file(f"{directory}/manifest.json", json.dumps(manifest, indent=1).encode())
        self._write_latest(name)
        self._retain()
        log.info(
            "checkpoint saved",
            extra={"path": directory, "step": step, "seconds": round(time.monotonic() - start, 3)},
        )
        return directory

    def _write_latest(self, name: str) -> None:
        latest, tmp = self._join("LATEST"), self._join(f"LATEST.{name}.tmp")
        self.fs.pipe_file(tmp, name.encode())
        self.fs.mv(tmp, latest)  # a rename on local filesystems: readers see the old or the new name

    def _retain(self) -> None:
        steps = sorted(p for p in self._step_dirs())
        for old in steps[: max(0, len(steps) - self.keep)]:
            self.fs.rm(self._join(old), recursive=True)

    def _step_dirs(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        return [n for n in names if n.isdigit()]

    def latest(self) -> str | None:
        """Path of the newest complete checkpoint, or None when there is none."""
        path = self._join("LATEST")
        if not self.fs.exists(path):
            return None
        return self._join(self.fs.cat_file(path).decode().strip())

    def load(self, path: str | None = None) -> Checkpoint:
        path = path or self.latest()
        if path is None:
            raise CheckpointError(f"no checkpoint under {self.url}")
        try:
            manifest = json.loads(self.fs.cat_file(f"{path}/manifest.json"))
        except FileNotFoundError as err:
            raise CheckpointError(f"{path}: manifest.json missing") from err
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: unknown format version {manifest.get('format_version')!r}")
        blobs = {}
        for fname, digest in manifest["files"].items():
            data = self.fs.cat_file(f"{path}/{fname}")
            if hashlib.sha256(data).hexdigest() != digest:
                raise CheckpointError(f"{path}/{fname}: checksum mismatch")
            blobs[fname] = data
        model = GrowCLIP(ArchConfig.from_dict(manifest["architecture"]))
        model.load_state_dict(st_load(blobs["model.safetensors"]), strict=True)
        opt_state: dict[str, dict[str, torch.Tensor]] = {}
        if "optimizer.safetensors" in blobs:
            for key, tensor in st_load(blobs["optimizer.safetensors"]).items():
                pname, field = key.rsplit("::", 1)
                opt_state.setdefault(pname, {})[field] = tensor
        return Checkpoint(path=path, model=model, optimizer_state=opt_state, manifest=manifest)
