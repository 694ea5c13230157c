"""Embedding drift per served version: how far a new model moved the embeddings users stored.

Users who store embeddings need to know when to re-embed. On each publish the training thread
only hands the snapshot over (:meth:`DriftMonitor.notify`, a reference swap); a low-priority
thread embeds a fixed probe set (reserved test images and their captions) with it and compares
with the embeddings of the same probes under

- the previous measured version (``against="previous"``), and
- the oldest version still served for pinning (``against="oldest"``, ``serve.keep_versions``),

per modality, as the mean cosine of each probe's two embeddings (1: nothing moved) and the mean
share of each probe's 10 nearest probe neighbours the two versions have in common (1: the same
neighbourhoods, so nearest-neighbour search over stored embeddings still finds the same things).
A new generation is measured at once; within a generation at most every ``interval_s``.

The first measurement of each generation against the last of the generation before is kept per
generation (``by_generation``), so the growth history shows how far each growth moved things.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import torch

from growclip_daemon.metrics import Metrics
from growclip_daemon.service import Service
from growclip_stream.data.records import RecordLimits
from growclip_stream.serving import ModelSnapshot, SnapshotStore

log = logging.getLogger(__name__)

NEIGHBOURS = 10
_NICE = 10  # the drift thread yields the CPU to training and serving


@dataclass(frozen=True)
class Probes:
    """The fixed probe set: encoded images and captions, the same for every version."""

    images: tuple[bytes, ...]
    texts: tuple[str, ...]

    @classmethod
    def from_dataset(cls, name: str, size: int, seed: int = 0) -> Probes:
        """The first ``size`` records of a dataset's reserved test split (never trained on)."""
        from growclip_stream.data.datasets import iter_records

        records = []
        for record in iter_records(name, split="test", seed=seed):
            records.append(record)
            if len(records) >= size:
                break
        return cls(tuple(r.image for r in records), tuple(r.caption for r in records))


@dataclass(frozen=True)
class ProbeEmbeddings:
    version: str
    generation: int
    image: torch.Tensor  # (P, D), L2-normalised
    text: torch.Tensor  # (P, D)


def embed_probes(snap: ModelSnapshot, probes: Probes, limits: RecordLimits) -> ProbeEmbeddings:
    """The probe set's embeddings under ``snap``, in batches of 64."""
    images, texts = [], []
    for at in range(0, len(probes.images), 64):
        images.append(snap.embed_images(probes.images[at : at + 64], limits))
    for at in range(0, len(probes.texts), 64):
        texts.append(snap.embed_texts(probes.texts[at : at + 64]))
    return ProbeEmbeddings(snap.version, snap.generation, torch.cat(images), torch.cat(texts))


def neighbour_sets(emb: torch.Tensor, k: int = NEIGHBOURS) -> torch.Tensor:
    """(P, k) indices of each probe's k nearest other probes by cosine."""
    sims = emb @ emb.T
    sims.fill_diagonal_(-float("inf"))
    return sims.topk(min(k, len(emb) - 1), dim=1).indices


def compare(new: torch.Tensor, old: torch.Tensor, k: int = NEIGHBOURS) -> dict[str, float]:
    """Mean cosine of the same probes and mean neighbour overlap@k between two embeddings of them."""
    cosine = float((new * old).sum(dim=1).mean())
    a, b = neighbour_sets(new, k), neighbour_sets(old, k)
    shared = (a.unsqueeze(2) == b.unsqueeze(1)).any(dim=2).sum(dim=1)  # (P,) neighbours in common
    overlap = float(shared.float().mean() / a.shape[1])
    return {"mean_cosine": round(cosine, 6), f"neighbour_overlap_at_{k}": round(overlap, 6)}


def drift_between(new: ProbeEmbeddings, old: ProbeEmbeddings) -> dict[str, Any]:
    return {
        "version": old.version,
        "generations": new.generation - old.generation,
        "image": compare(new.image, old.image),
        "text": compare(new.text, old.text),
    }


class DriftMonitor(Service):
    """Measures drift off the training thread (see the module docstring)."""

    name = "drift"

    def __init__(
        self,
        store: SnapshotStore,
        metrics: Metrics,
        probes: Probes,
        limits: RecordLimits,
        *,
        interval_s: float = 30.0,
        history: int = 50,
    ) -> None:
        super().__init__()
        self.store = store
        self.metrics = metrics
        self.probes = probes
        self.limits = limits
        self.interval_s = interval_s
        self._pending: ModelSnapshot | None = None
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._cache: OrderedDict[str, ProbeEmbeddings] = OrderedDict()  # version -> probes' embeddings
        self._last: ProbeEmbeddings | None = None
        self._last_at = 0.0
        self._latest: dict[str, Any] | None = None
        self._history: deque[dict[str, Any]] = deque(maxlen=history)
        self._by_generation: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.measurements = 0

    # -- service --------------------------------------------------------------------------------

    def on_start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="drift", daemon=True)
        self._thread.start()

    def on_stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    # -- what the trainer and the API call ------------------------------------------------------

    def notify(self, snap: ModelSnapshot) -> None:
        """A new snapshot is published. Cheap: the training thread only leaves a reference."""
        with self._wake:
            self._pending = snap
            self._wake.notify_all()

    def wait_measured(self, version: str, timeout_s: float) -> bool:
        """Whether ``version`` has been measured within ``timeout_s`` (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            latest = self._latest
            if latest is not None and latest["version"] == version:
                return True
            time.sleep(0.05)
        return False

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "probes": {"images": len(self.probes.images), "texts": len(self.probes.texts)},
                "neighbours": NEIGHBOURS,
                "latest": self._latest,
                "by_generation": dict(self._by_generation),
                "history": list(self._history),
            }

    # -- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # not Linux or not permitted: normal priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._stopping and not self._due():
                    self._wake.wait(self._wait_s())
                if self._stopping:
                    return
                snap, self._pending = self._pending, None
            if snap is None:
                continue
            try:
                self._measure(snap)
            except Exception:  # drift is a report: a failure is logged, serving and training go on
                log.exception("drift measurement failed", extra={"version": snap.version})

    def _due(self) -> bool:
        snap = self._pending
        if snap is None:
            return False
        last = self._last
        if last is None or snap.generation != last.generation:
            return True
        return time.monotonic() - self._last_at >= self.interval_s

    def _wait_s(self) -> float | None:
        if self._pending is None:
            return None
        return max(0.01, self.interval_s - (time.monotonic() - self._last_at))

    def _embeddings(self, snap: ModelSnapshot) -> ProbeEmbeddings:
        cached = self._cache.get(snap.version)
        if cached is None:
            cached = embed_probes(snap, self.probes, self.limits)
        self._cache[snap.version] = cached
        held = {s.version for s in self.store.held()}
        keep = held | {snap.version}
        for version in [v for v in self._cache if v not in keep]:
            del self._cache[version]
        return cached

    def _measure(self, snap: ModelSnapshot) -> None:
        start = time.monotonic()
        new = self._embeddings(snap)
        previous = self._last
        held = self.store.held()
        oldest_snap = held[0] if held else snap
        oldest = new if oldest_snap.version == snap.version else self._embeddings(oldest_snap)
        record: dict[str, Any] = {
            "version": snap.version,
            "generation": snap.generation,
            "computed_at": time.time(),
            "seconds": 0.0,
            "against_previous": drift_between(new, previous) if previous is not None else None,
            "against_oldest": drift_between(new, oldest),
        }
        record["seconds"] = round(time.monotonic() - start, 3)
        with self._lock:
            self._latest = record
            self._history.append(record)
            if previous is not None and previous.generation < snap.generation:
                self._by_generation[str(snap.generation)] = record["against_previous"]
        self._last, self._last_at = new, time.monotonic()
        self.measurements += 1
        self._export(record)
        log.info(
            "embedding drift measured",
            extra={
                "version": snap.version,
                "against_previous": record["against_previous"],
                "against_oldest": record["against_oldest"],
            },
        )

    def _export(self, record: dict[str, Any]) -> None:
        m = self.metrics
        for against in ("previous", "oldest"):
            found = record[f"against_{against}"]
            if found is None:
                continue
            m.drift_versions.labels(against=against).set(found["generations"])
            for modality in ("image", "text"):
                m.drift_cosine.labels(modality=modality, against=against).set(found[modality]["mean_cosine"])
                m.drift_overlap.labels(modality=modality, against=against).set(
                    found[modality][f"neighbour_overlap_at_{NEIGHBOURS}"]
                )
        m.drift_computed.set(record["computed_at"])


def load_probes(dataset: str, size: int) -> Probes | None:
    """The probe set, or None (drift off, logged) when ``size`` is 0 or the dataset is missing."""
    if size <= 0:
        return None
    try:
        return Probes.from_dataset(dataset, size)
    except (FileNotFoundError, ValueError) as err:
        log.warning("embedding drift is off: no probe set", extra={"dataset": dataset, "error": str(err)})
        return None
