"""The unit of work between ingest, training and growth: a batch of decoded image-text pairs.

It lives below data/, train/ and growth/ so that each of them can use it without importing the
others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor  # (B, C, H, W) float32 in [-1, 1], or uint8 pixels (normalised on the device)
    tokens: torch.Tensor  # (B, T) int64
    ids: tuple[str, ...]
    replayed: int = 0  # how many of the samples (at the end) are replayed, not fresh from the stream

    def __len__(self) -> int:
        return len(self.ids)
