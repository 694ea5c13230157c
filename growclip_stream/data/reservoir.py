"""A bounded, uniform reservoir sample of a stream (Algorithm R), at most `capacity` samples.

Two uses: the **replay** buffer (TiC-CLIP's finding for continual CLIP training: replaying past
data keeps the model from forgetting it as the stream drifts), whose samples the loop adds to each
training batch, and the **held-out** buffer, a fixed-size unbiased view of the held-out records.
Memory stays bounded however long the stream runs, and every past sample is equally likely to be in
it. Replayed samples never repeat within a batch and never duplicate an id already in it (a
duplicate pair would be its own false negative in the contrastive loss).

A checkpoint keeps the reservoir (:meth:`Reservoir.state_dict`): the kept samples as one ``uint8``
pixel tensor plus their ids and captions as UTF-8 bytes, the count seen and the generator state, so
a restart replays and evaluates on the same samples and draws the same replacements.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch

from growclip_stream.checkpoint.state import (
    pack_strings,
    python_rng_state,
    restore_python_rng,
    unpack_strings,
)
from growclip_stream.data.pipeline import Sample

__all__ = ["Reservoir", "samples_from_state", "samples_state"]


def samples_state(samples: list[Sample]) -> dict[str, Any]:
    """Samples as tensors for a checkpoint: pixels stacked, ids and captions packed (empty: {})."""
    if not samples:
        return {}
    return {
        "images": torch.stack([s.image for s in samples]),
        "ids": pack_strings([s.id for s in samples]),
        "captions": pack_strings([s.caption for s in samples]),
    }


def samples_from_state(state: Mapping[str, Any]) -> list[Sample]:
    """The samples of a :func:`samples_state`."""
    if "images" not in state:
        return []
    images = state["images"]
    ids, captions = unpack_strings(state["ids"]), unpack_strings(state["captions"])
    if not (len(images) == len(ids) == len(captions)):
        raise ValueError("samples state: images, ids and captions differ in length")
    return [Sample(i, images[k], c) for k, (i, c) in enumerate(zip(ids, captions, strict=True))]


class Reservoir:
    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity!r}")
        self.capacity = capacity
        self.samples: list[Sample] = []
        self.seen = 0  # samples offered so far
        self._rng = random.Random(seed)

    def add(self, sample: Sample) -> None:
        """Offer one sample: kept with probability capacity / seen, replacing a random kept one."""
        self.seen += 1
        if len(self.samples) < self.capacity:
            self.samples.append(sample)
            return
        j = self._rng.randrange(self.seen)
        if j < self.capacity:
            self.samples[j] = sample

    def __len__(self) -> int:
        return len(self.samples)

    def sample(self, n: int, exclude_ids: frozenset[str] | set[str] = frozenset()) -> list[Sample]:
        """Up to `n` distinct kept samples drawn uniformly, skipping ids in `exclude_ids`."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n!r}")
        pool = [s for s in self.samples if s.id not in exclude_ids] if exclude_ids else self.samples
        return self._rng.sample(pool, min(n, len(pool)))

    def state_dict(self) -> dict[str, Any]:
        """Kept samples as tensors (pixels stacked, ids and captions packed), ``seen`` and the RNG."""
        return {"seen": self.seen, "rng": python_rng_state(self._rng), **samples_state(self.samples)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; a smaller capacity keeps the first ``capacity`` samples."""
        samples = samples_from_state(state)
        self.samples = samples[: self.capacity]
        self.seen = max(int(state.get("seen", len(samples))), len(self.samples))
        if "rng" in state:
            restore_python_rng(self._rng, state["rng"])
