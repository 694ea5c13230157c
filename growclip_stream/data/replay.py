"""A bounded replay reservoir of past training samples, mixed into batches against forgetting.

TiC-CLIP's finding for continual CLIP training: replaying past data keeps the model from forgetting
it as the stream drifts. `ReplayBuffer` keeps a uniform reservoir sample (Algorithm R) of every
training sample it was offered, at most `capacity` of them, so memory stays bounded however long
the stream runs and every past sample is equally likely to be in it.

`mix(batch, fraction)` keeps the batch size: it keeps the first n − k fresh samples in order and
replaces up to k = round(fraction·n) of the rest with replayed ones (fewer while the reservoir is
small; fresh samples fill the gap). The displaced fresh samples (those of the batch missing from the
result) are not trained in this batch: offer them to the reservoir (`add`) so they may be replayed
later, or carry them into the next batch. Replayed samples
never repeat within a batch and never duplicate an id already in it (a duplicate pair would be its
own false negative in the contrastive loss). Call `mix` before `add`-ing the batch's samples.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from growclip_stream.data.pipeline import Sample

__all__ = ["ReplayBuffer"]


class ReplayBuffer:
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

    def mix(self, batch_samples: Sequence[Sample], fraction: float) -> list[Sample]:
        """The batch with its last round(fraction·n) samples replaced by replayed ones (same size at most)."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
        n = len(batch_samples)
        k = round(fraction * n)
        if k == 0 or not self.samples:
            return list(batch_samples)
        keep = list(batch_samples[: n - k])
        replayed = self.sample(k, exclude_ids={s.id for s in batch_samples})
        return keep + replayed + list(batch_samples[n - k + len(replayed) :])
