"""From raw stream messages to training batches: decode, validate, split off held-out records, collate.

Every message ends in exactly one place: a training batch, the held-out buffer, or the dead
letter (with its reason). Nothing is dropped silently.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from growclip_stream.batch import Batch
from growclip_stream.data.images import ImageTransform, normalize
from growclip_stream.data.records import RecordError, RecordLimits, decode_message, is_held_out
from growclip_stream.model.tokenizer import ByteTokenizer


class RawMessage(Protocol):
    """What the pipeline needs of a source's message (Kafka messages and shard rows both fit)."""

    @property
    def value(self) -> bytes: ...
    @property
    def headers(self) -> tuple[tuple[str, bytes], ...]: ...


@dataclass(frozen=True)
class Sample:
    id: str
    image: torch.Tensor  # (C, H, W) uint8 pixels; collate() normalises a whole batch at once
    caption: str


class Decoder:
    """Decodes one message into a sample or raises RecordError with a stable reason."""

    def __init__(self, transform: ImageTransform, limits: RecordLimits) -> None:
        self.transform = transform
        self.limits = limits

    def __call__(self, msg: RawMessage) -> Sample:
        record = decode_message(msg.value, msg.headers, self.limits)
        image = torch.from_numpy(self.transform.pixels(record.image, self.limits))
        return Sample(record.id, image, record.caption)


def collate(
    samples: Sequence[Sample], tokenizer: ByteTokenizer, *, uint8: bool = False, pin_memory: bool = False
) -> Batch:
    """One batch: images normalised to float32, or with `uint8` the raw pixels (a quarter of the bytes
    to copy to an accelerator, which normalises them there: `OnlineTrainer.to_device`).

    `pin_memory` stacks the uint8 pixels straight into page-locked memory, so the batch crosses to
    a CUDA device in one asynchronous copy (pinning each sample before the stack would not help:
    the stack makes a new, unpinned tensor). It needs a CUDA device.
    """
    if pin_memory and not uint8:
        raise ValueError(
            "pin_memory needs uint8=True: normalising on the CPU would make a new, unpinned tensor"
        )
    first = samples[0].image
    out = None
    if pin_memory:
        out = torch.empty((len(samples), *first.shape), dtype=first.dtype, pin_memory=True)
    images = torch.stack([s.image for s in samples], out=out)  # (B, C, H, W) uint8
    return Batch(
        images=images if uint8 else normalize(images),  # (B, C, H, W) uint8, or float32 in [-1, 1]
        tokens=tokenizer.encode([s.caption for s in samples]),  # (B, T)
        ids=tuple(s.id for s in samples),
    )


def full_batches(samples: Sequence[Sample], batch_size: int, tokenizer: ByteTokenizer) -> Iterator[Batch]:
    """Full batches only, so that contrastive losses are comparable across evaluations."""
    for i in range(0, len(samples) - batch_size + 1, batch_size):
        yield collate(samples[i : i + batch_size], tokenizer)


class Batcher:
    """Accumulates decoded training samples and hands out full batches in arrival order."""

    def __init__(self, batch_size: int, tokenizer: ByteTokenizer) -> None:
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        self._pending: deque[Sample] = deque()

    def add(self, sample: Sample) -> None:
        self._pending.append(sample)

    def pending(self) -> int:
        return len(self._pending)

    def drain(self) -> list[Sample]:
        """Take every pending sample (at shutdown, for a last, smaller batch)."""
        out = list(self._pending)
        self._pending.clear()
        return out

    def take(self) -> list[Sample] | None:
        """The next full batch of samples in arrival order, or None while fewer are pending."""
        if len(self._pending) < self.batch_size:
            return None
        return [self._pending.popleft() for _ in range(self.batch_size)]


def route(decoder: Decoder, msg: RawMessage, holdout_fraction: float) -> tuple[str, Sample | RecordError]:
    """Decode one message and say where it goes: ("trained" | "held_out", sample) or (reason, error)."""
    try:
        sample = decoder(msg)
    except RecordError as err:
        return err.reason, err
    if is_held_out(sample.id, holdout_fraction):
        return "held_out", sample
    return "trained", sample
